"""The optax transforms that fine-tuning strategies put inside the trainable branches.

Each is one `optax.GradientTransformation` with its formula; a strategy chains them around the
branch's base optimizer (see `tlx.strategies.base.Strategy.wrap`). Inside `optax.multi_transform`
a branch sees `optax.MaskedNode` at the leaves of the other branches; the transforms keep those as
they are, so frozen leaves hold no state here either.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

_MASKED = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731


def _like_params(params, tree, fn):
    """fn(param, value) at the leaves `params` holds, MaskedNode where it holds one."""
    return jax.tree.map(lambda p, v: p if _MASKED(p) else fn(p, v), params, tree, is_leaf=_MASKED)


class MultiplierState(NamedTuple):
    mult: optax.Params  # one f32 scalar per leaf


def scale_by_multipliers(multipliers) -> optax.GradientTransformation:
    """u <- m * u, with one multiplier m per leaf (a tree of floats over the whole parameter tree).

    After a base optimizer whose update is -lr * direction (SGD, momentum, Adam, AdamW with its
    decoupled decay), `m * u` is exactly the update at learning rate `m * lr` (timm's `lr_scale`).
    The multipliers are data in the state, not constants: a hook (Auto-RGN) changes them between
    steps with `set_multipliers`, with no recompilation, and they are checkpointed."""

    def init(params):
        return MultiplierState(
            _like_params(params, multipliers, lambda _, m: jnp.asarray(m, jnp.float32))
        )

    def update(updates, state, params=None):
        del params
        out = jax.tree.map(
            lambda u, m: u if _MASKED(u) else (u * m).astype(u.dtype),
            updates,
            state.mult,
            is_leaf=_MASKED,
        )
        return out, state

    return optax.GradientTransformation(init, update)


def set_multipliers(opt_state, multipliers):
    """`opt_state` with every `MultiplierState` holding `multipliers` (a whole-tree of floats) at
    its own leaves."""

    def replace(s):
        if not isinstance(s, MultiplierState):
            return s
        return MultiplierState(
            _like_params(s.mult, multipliers, lambda m, v: jnp.asarray(v, m.dtype))
        )

    return jax.tree.map(replace, opt_state, is_leaf=lambda s: isinstance(s, MultiplierState))


def get_multipliers(opt_state) -> list:
    """The multiplier trees of `opt_state` (one per trainable branch that has one)."""
    found = []
    jax.tree.map(
        lambda s: found.append(s.mult) if isinstance(s, MultiplierState) else None,
        opt_state,
        is_leaf=lambda s: isinstance(s, MultiplierState),
    )
    return found


class ToInitState(NamedTuple):
    count: jax.Array  # updates done (for the schedule of the proximal step)
    init: optax.Params  # w0: the parameters at init (the pre-trained weights)


def add_decay_to_init(rate: float) -> optax.GradientTransformation:
    """g <- g + rate * (w - w0): the gradient of rate/2 ||w - w0||^2, added before the base
    optimizer (coupled, as a loss term would be). With w0 = 0 this is plain L2 (`rate/2 ||w||^2`);
    kauldron's `decay_to_init` is the same formula."""

    def init(params):
        return ToInitState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.array, params))

    def update(updates, state, params):
        out = jax.tree.map(
            lambda u, w, w0: u if _MASKED(u) else u + rate * (w - w0),
            updates,
            params,
            state.init,
            is_leaf=_MASKED,
        )
        return out, state

    return optax.GradientTransformation(init, update)


def proximal_to_init(rate: float, schedule: optax.Schedule, multipliers=None, to_zero=False):
    """The exact proximal step of rate/2 ||w - w0||^2 after the base optimizer's update u:

        w' = w0 + (w + u - w0) / (1 + lr_t m rate)     (returned as the update w' - w)

    with lr_t = schedule(t) the branch's LR at this update and m the leaf's static LR multiplier
    (1 without). Stable for any rate under Adam, where the loss form is not. `to_zero`: w0 = 0
    (plain L2 towards the origin, L2-SP's beta term over new leaves)."""
    mults = multipliers

    def init(params):
        w0 = jax.tree.map(jnp.zeros_like if to_zero else jnp.array, params)
        return ToInitState(jnp.zeros([], jnp.int32), w0)

    def update(updates, state, params):
        lr = schedule(state.count)
        m_tree = (
            mults if mults is not None else jax.tree.map(lambda _: 1.0, params, is_leaf=_MASKED)
        )

        def prox(u, w, w0, m):
            if _MASKED(u):
                return u
            new = w + u
            new = w0 + (new - w0) / (1 + lr * m * rate)
            return (new - w).astype(u.dtype)

        out = jax.tree.map(prox, updates, params, state.init, m_tree, is_leaf=_MASKED)
        return out, ToInitState(optax.safe_int32_increment(state.count), state.init)

    return optax.GradientTransformation(init, update)
