"""Optimizers and learning-rate schedules from config, one `optax.multi_transform` per run phase.

Each leaf gets a group label: `frozen` (updates set to zero, no optimizer state), `head` (the
newly initialised leaves of a fine-tuning run, with their own larger LR) or `backbone`; a leaf
first unfrozen in a later phase of the run gets a group of its own (`backbone:p2`), so that it
starts with zero optimizer state while the others carry theirs on. Clipping, weight decay, LR
multipliers and whatever a strategy adds live inside each trainable branch, so they never touch
frozen leaves.
"""

import math
import re

import jax
import ml_collections
import optax

from tlx import freeze


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "name": "adamw",  # adamw | sgd
            "lr": 1e-3,  # peak LR of the backbone (every trainable leaf when pre-training)
            # peak LR of the re-initialised leaves (the new head) when fine-tuning; 0 = same as lr
            "head_lr": 0.0,
            "schedule": "warmup_cosine",  # warmup_cosine | constant
            "warmup_steps": 0,
            "end_lr_factor": 0.0,  # cosine decays to lr * end_lr_factor
            "weight_decay": 1e-4,
            "decay_kernels_only": True,  # no decay on biases and BatchNorm scale/bias
            "momentum": 0.9,  # sgd momentum / adam b1
            "b2": 0.999,
            "nesterov": False,
            "clip_norm": 0.0,  # >0: clip each trainable group's gradient by its global norm
            "label_smoothing": 0.0,
            # [(regex, multiplier), ...]: LR multiplier of the leaves whose path a regex matches
            # (first match wins; composes with any strategy and multiplies layer decay/Auto-RGN).
            "lr_mults": [],
        }
    )


def schedule(cfg, peak_lr: float, total_steps: int) -> optax.Schedule:
    if cfg.schedule == "constant":
        if cfg.warmup_steps:
            return optax.join_schedules(
                [
                    optax.linear_schedule(0.0, peak_lr, cfg.warmup_steps),
                    optax.constant_schedule(peak_lr),
                ],
                [cfg.warmup_steps],
            )
        return optax.constant_schedule(peak_lr)
    if cfg.schedule == "warmup_cosine":
        warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup else peak_lr,
            peak_value=peak_lr,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=peak_lr * cfg.end_lr_factor,
        )
    raise ValueError(f"unknown optim.schedule {cfg.schedule!r}; use 'warmup_cosine' or 'constant'")


def role(label: str) -> str:
    """'backbone:p2' -> 'backbone': the group a label's LR comes from."""
    return label.split(":")[0]


def group_labels(params, frozen_mask, new_patterns=(), since=None) -> dict:
    """One label per leaf: 'frozen', 'head' (path matches one of `new_patterns`) or 'backbone';
    with `since` (a tree of ints), a leaf first trainable in phase k > 0 gets ':p{k}' appended."""

    def label(path, is_frozen, k=0):
        if is_frozen:
            return freeze.FROZEN
        name = (
            "head"
            if any(re.search(p, freeze.path_str(path)) for p in new_patterns)
            else ("backbone")
        )
        return f"{name}:p{k}" if k else name

    if since is None:
        return jax.tree_util.tree_map_with_path(label, frozen_mask)
    return jax.tree_util.tree_map_with_path(label, frozen_mask, since)


def group_lrs(cfg) -> dict[str, float]:
    return {"backbone": cfg.lr, "head": cfg.head_lr or cfg.lr}


def _base(cfg, lr: optax.Schedule) -> optax.GradientTransformation:
    decay_mask = (
        (lambda p: jax.tree.map(lambda x: x.ndim > 1, p)) if cfg.decay_kernels_only else None
    )
    if cfg.name == "adamw":
        return optax.adamw(
            lr, b1=cfg.momentum, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    if cfg.name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
            optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov),
        )
    raise ValueError(f"unknown optim.name {cfg.name!r}; use 'adamw' or 'sgd'")


def base_branch(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """A trainable branch before anything is added to it: clip (if optim.clip_norm), then the
    base optimizer at `schedule`."""
    base = _base(cfg, schedule)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), base) if cfg.clip_norm else base


def build(cfg, labels, schedules: dict, branch=None) -> optax.GradientTransformation:
    """One multi_transform: set_to_zero for 'frozen', the base optimizer at `schedules[label]`
    (a function of the branch's own step count) for each trainable label; `branch(label, tx)`,
    when given, returns what that branch runs instead (multipliers, a strategy's transforms)."""
    transforms = {freeze.FROZEN: optax.set_to_zero()}
    for group in sorted(set(jax.tree.leaves(labels)) - {freeze.FROZEN}):
        tx = base_branch(cfg, schedules[group])
        transforms[group] = branch(group, tx) if branch else tx
    return optax.multi_transform(transforms, labels)


def carry_state(new_state, old_state):
    """`new_state` (a fresh init of the next phase's transform) with the state of every trainable
    group that both phases have taken over from `old_state`. A group's leaves never change
    between phases (a newly unfrozen leaf gets a new group), so the two states fit."""
    inner = dict(new_state.inner_states)
    for group, state in old_state.inner_states.items():
        if group != freeze.FROZEN and group in inner:
            inner[group] = state
    return new_state._replace(inner_states=inner)


# -- per-leaf LR multipliers ---------------------------------------------------------------------
def regex_multipliers(params, lr_mults) -> dict:
    """The multiplier of the first (regex, multiplier) pair whose regex matches a leaf's path, 1
    where none does. A regex that matches nothing, or a multiplier <= 0, is an error."""
    pairs = [(str(r), float(m)) for r, m in lr_mults]
    paths = freeze.leaf_paths(params)
    for r, m in pairs:
        if not m > 0:
            raise ValueError(f"optim.lr_mults ({r!r}, {m}): use a multiplier > 0 (freeze instead)")
        if not any(re.search(r, p) for p in paths):
            raise ValueError(f"optim.lr_mults regex {r!r} matches no parameter of {paths}")

    def mult(path, _):
        s = freeze.path_str(path)
        return next((m for r, m in pairs if re.search(r, s)), 1.0)

    return jax.tree_util.tree_map_with_path(mult, params)


def is_trivial(mults) -> bool:
    return all(isinstance(m, float) and m == 1.0 for m in jax.tree.leaves(mults))


def combine(*trees) -> dict:
    """The leafwise product of multiplier trees of Python floats."""
    return jax.tree.map(lambda *ms: math.prod(ms), *trees)
