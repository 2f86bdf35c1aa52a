"""Optimizers and learning-rate schedules from config, one `optax.multi_transform` per run.

Each leaf gets a group label: `frozen` (updates set to zero, no optimizer state), `head` (the
newly initialised leaves of a fine-tuning run, with their own larger LR) or `backbone`.
Clipping and weight decay live inside each trainable branch, so they never touch frozen leaves.
"""

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
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if cfg.warmup_steps else peak_lr,
            peak_value=peak_lr,
            warmup_steps=cfg.warmup_steps,
            decay_steps=max(total_steps, cfg.warmup_steps + 1),
            end_value=peak_lr * cfg.end_lr_factor,
        )
    raise ValueError(f"unknown optim.schedule {cfg.schedule!r}; use 'warmup_cosine' or 'constant'")


def group_labels(params, frozen_mask, new_patterns=()) -> dict:
    """One label per leaf: 'frozen', 'head' (path matches one of `new_patterns`) or 'backbone'."""

    def label(path, is_frozen):
        if is_frozen:
            return freeze.FROZEN
        if any(re.search(p, freeze.path_str(path)) for p in new_patterns):
            return "head"
        return "backbone"

    return jax.tree_util.tree_map_with_path(label, frozen_mask)


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


def make(cfg, labels, total_steps: int):
    """(optax transform, {group: schedule}) for the groups present in `labels`."""
    present = set(jax.tree.leaves(labels))
    lrs = group_lrs(cfg)
    schedules = {g: schedule(cfg, lrs[g], total_steps) for g in lrs if g in present}
    transforms = {freeze.FROZEN: optax.set_to_zero()}
    for group, sched in schedules.items():
        base = _base(cfg, sched)
        transforms[group] = (
            optax.chain(optax.clip_by_global_norm(cfg.clip_norm), base) if cfg.clip_norm else base
        )
    return optax.multi_transform(transforms, labels), schedules
