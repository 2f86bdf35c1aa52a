"""l2_sp (Li et al. 2018, "Explicit inductive bias for transfer learning"): instead of weight
decay, alpha/2 ||w - w0||^2 over the transferred trainable leaves (w0: the pre-trained weights)
plus beta/2 ||w||^2 over the new ones.

form='loss': the penalty's gradient added to the gradient before the base optimizer (the paper's
loss term, as `tlx.transforms.add_decay_to_init`); 'proximal': after each update, the exact
proximal step of the same penalty (w <- w0 + (w - w0) / (1 + lr * alpha)), stable for any alpha
under Adam. w0 lives in the branch's optimizer state. alpha = beta = 0 adds nothing at all.
"""

import jax
import jax.numpy as jnp
import optax

from tlx import freeze, transforms
from tlx.strategies.base import Strategy, register


def _check(k):
    if k.alpha < 0 or k.beta < 0:
        raise ValueError(f"strategy.l2_sp alpha={k.alpha}, beta={k.beta}: both must be >= 0")
    if k.form not in ("loss", "proximal"):
        raise ValueError(f"strategy.l2_sp.form={k.form!r}: use 'loss' or 'proximal'")


def penalty(params, ref, labels, alpha: float, beta: float):
    """alpha/2 ||w - w0||^2 over trainable transferred leaves + beta/2 ||w||^2 over new ones: the
    loss-form term whose gradient `_wrap` adds (for reading a run's regulariser value)."""
    total = jnp.float32(0.0)
    for w, w0, lbl in zip(
        jax.tree.leaves(params), jax.tree.leaves(ref), jax.tree.leaves(labels), strict=True
    ):
        if lbl == freeze.FROZEN:
            continue
        if lbl.split(":")[0] == "head":
            total = total + 0.5 * beta * jnp.sum(jnp.square(w))
        else:
            total = total + 0.5 * alpha * jnp.sum(jnp.square(w - w0))
    return total


def _wrap(ctx, branch):
    k = ctx.knobs
    new = branch.role == "head"
    rate = k.beta if new else k.alpha
    if not rate:
        return branch.tx
    if k.form == "loss":
        before = optax.add_decayed_weights(rate) if new else transforms.add_decay_to_init(rate)
        return optax.chain(before, branch.tx)
    prox = transforms.proximal_to_init(rate, branch.schedule, branch.lr_mult, to_zero=new)
    return optax.chain(branch.tx, prox)


L2_SP = register(
    Strategy(
        "l2_sp",
        "pull transferred weights towards w0 instead of weight decay",
        knobs={"alpha": 0.1, "beta": 0.01, "form": "loss"},
        check=_check,
        wrap=_wrap,
        config_defaults={"optim.weight_decay": 0.0},  # the penalty replaces weight decay
    )
)
