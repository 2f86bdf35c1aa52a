"""Freeze specs: which parameters a run trains, compiled to labels on the parameter tree.

A spec (`config.freeze`) names a strategy (a preset from the seed's table or one of the toolbox's)
and explicit regexes over '/'-joined parameter paths; `phases()` turns it into the frozen patterns
of each step range, and `frozen_mask()` into one bool per leaf, which `tlx.optim` maps to one
`optax.multi_transform` with `optax.set_to_zero()` for the frozen leaves.
"""

import dataclasses
import re

import jax
import ml_collections

FROZEN = "frozen"
PRESETS = ("none", "linear_probe", "freeze_most", "freeze_early", "freeze_stages")
# Strategies of the fine-tuning toolbox (`tlx.strategies` says what each does besides freezing).
TOOLBOX = ("gradual_unfreeze", "layer_decay", "lp_ft", "l2_sp", "surgical", "auto_rgn", "scratch")
STRATEGIES = PRESETS + TOOLBOX

# BatchNorm policy for the frozen parts: mode -> (running statistics frozen, scale/bias frozen).
BN_MODES = {
    "frozen": (True, True),  # Keras' rule for a frozen BatchNormalization layer
    "train_affine": (True, False),  # statistics frozen, scale and bias trained
    "train_stats": (False, True),  # PyTorch's requires_grad=False in train mode
    "train": (False, False),  # fastai's train_bn
}


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            # see STRATEGIES; each toolbox strategy reads its knobs from the sub-dict of its name
            "strategy": "none",
            # with strategy='freeze_stages': freeze the stem and stage1..stageK.
            "stages": 0,
            # extra regexes (re.search over 'stage2/block0/conv1/kernel'-style paths) to freeze.
            "patterns": [],
            # BatchNorm in frozen stages: frozen | train_affine | train_stats | train (BN_MODES).
            "bn": "frozen",
            # False: statistics train in any bn mode (the older switch; bn='train_stats' says it).
            "freeze_bn_stats": True,
            # surgical (Lee et al. 2023): the one stage tuned (with the new head): stem,
            # stage1..stageN, or head (= a linear probe). stage1 suits input-level shifts.
            "surgical": {"stage": "stage1"},
            # gradual_unfreeze (ULMFiT, Howard & Ruder 2018): start with the head, unfreeze one
            # stage (top down) every `every_epochs` epochs, or every `every_steps` steps if > 0.
            "gradual_unfreeze": {"every_epochs": 1.0, "every_steps": 0},
            # lp_ft (Kumar et al. 2022): linear probe for this fraction of the steps (head at
            # optim.head_lr), then fine-tune everything, head included, from it at optim.lr with a
            # fresh optimizer and schedule.
            "lp_ft": {"lp_fraction": 0.5},
            # layer_decay (timm; ULMFiT's discriminative rates 1/2.6 per group): the LR of a
            # backbone stage k stages below the top one is optim.lr * decay**k.
            "layer_decay": {"decay": 1 / 2.6},
            # l2_sp (Li et al. 2018): alpha/2 ||w - w0||^2 over transferred trainable leaves plus
            # beta/2 ||w||^2 over new ones. form='loss': a term of the loss (the paper);
            # 'proximal': after each update, the exact proximal step of the same penalty
            # (w <- w0 + (w - w0) / (1 + lr * alpha)), stable for any alpha under Adam.
            "l2_sp": {"alpha": 0.1, "beta": 0.01, "form": "loss"},
            # auto_rgn (Lee et al. 2023): per-tensor LR multiplier (||g||/||w||) / max, the gradient
            # averaged over `batches` training batches, re-estimated at the start of each epoch.
            "auto_rgn": {"batches": 4},
            # A frozen backbone with no augmentation trains its head on backbone features
            # computed once and cached on disk (tlx.features); False: on images every step.
            "feature_cache": True,
        }
    )


def path_str(path) -> str:
    """'/'-joined names of a pytree key path: ('stage1', 'block0', 'conv1', 'kernel') -> str."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def leaf_paths(tree) -> list[str]:
    return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def stage_names(params) -> list[str]:
    """Top-level stages in network order: stem, stage1..stageN, head."""
    names = list(params)
    stages = sorted((n for n in names if re.fullmatch(r"stage\d+", n)), key=lambda n: int(n[5:]))
    missing = [n for n in ("stem", "head") if n not in names]
    others = [n for n in names if n not in stages and n not in ("stem", "head")]
    if missing or others or not stages:
        raise ValueError(
            f"a tlx backbone has top-level modules stem, stage1..stageN, head; got {names}"
        )
    return ["stem", *stages, "head"]


def check(spec) -> None:
    """Clear errors for a strategy name or knob value that cannot work."""
    if spec.strategy not in STRATEGIES:
        raise ValueError(
            f"unknown freeze strategy {spec.strategy!r}; use one of {list(STRATEGIES)} "
            "(or strategy='none' with freeze.patterns=[regex, ...])"
        )
    if spec.bn not in BN_MODES:
        raise ValueError(f"freeze.bn={spec.bn!r}: use one of {list(BN_MODES)}")
    s = spec.strategy
    if s == "gradual_unfreeze":
        g = spec.gradual_unfreeze
        if g.every_steps < 0 or (g.every_steps == 0 and not g.every_epochs > 0):
            raise ValueError(
                "gradual_unfreeze needs freeze.gradual_unfreeze.every_epochs > 0 or "
                f"every_steps > 0; got every_epochs={g.every_epochs}, every_steps={g.every_steps}"
            )
    if s == "lp_ft" and not 0.0 < spec.lp_ft.lp_fraction < 1.0:
        raise ValueError(f"freeze.lp_ft.lp_fraction={spec.lp_ft.lp_fraction}: use 0 < f < 1")
    if s == "layer_decay" and not 0.0 < spec.layer_decay.decay <= 1.0:
        raise ValueError(f"freeze.layer_decay.decay={spec.layer_decay.decay}: use 0 < decay <= 1")
    if s == "l2_sp":
        p = spec.l2_sp
        if p.alpha < 0 or p.beta < 0:
            raise ValueError(f"freeze.l2_sp alpha={p.alpha}, beta={p.beta}: both must be >= 0")
        if p.form not in ("loss", "proximal"):
            raise ValueError(f"freeze.l2_sp.form={p.form!r}: use 'loss' or 'proximal'")
    if s == "auto_rgn" and spec.auto_rgn.batches < 1:
        raise ValueError(f"freeze.auto_rgn.batches={spec.auto_rgn.batches}: use >= 1")


def preset_patterns(spec, params) -> list[str]:
    """The regexes a strategy freezes at its start, on this backbone's stages."""
    check(spec)
    stages = stage_names(params)[:-1]  # everything but the head
    strategy = spec.strategy
    if strategy in ("none", "layer_decay", "l2_sp", "auto_rgn", "scratch"):
        chosen = []
    elif strategy in ("linear_probe", "gradual_unfreeze", "lp_ft"):
        chosen = stages
    elif strategy == "freeze_most":  # all but the last stage (and the head)
        chosen = stages[:-1]
    elif strategy == "freeze_early":  # the stem and the first stage
        chosen = stages[:2]
    elif strategy == "surgical":
        stage = spec.surgical.stage
        if stage not in (*stages, "head"):
            raise ValueError(f"freeze.surgical.stage={stage!r}: use one of {[*stages, 'head']}")
        chosen = [s for s in stages if s != stage]
    else:  # freeze_stages
        k = int(spec.stages)
        if not 0 <= k <= len(stages) - 1:
            raise ValueError(
                f"freeze.stages={k} is out of range: this backbone has stages "
                f"stage1..stage{len(stages) - 1}; use 0..{len(stages) - 1}"
            )
        chosen = stages[: k + 1] if k > 0 else []
    return [f"^{s}/" for s in chosen]


@dataclasses.dataclass(frozen=True)
class Phase:
    """A step range [start, end) in which the frozen patterns are fixed.

    `fresh`: the phase starts a new optimizer (all state zero, its own schedule over the phase);
    otherwise it carries on the optimizer of the phase before, and leaves it newly trains get a
    branch of their own, with zero state (see `tlx.optim.carry_state`)."""

    start: int
    end: int
    patterns: tuple[str, ...]
    fresh: bool = False
    # lp_ft's fine-tuning phase: the probed head is no longer new, it trains at the backbone LR.
    head_is_new: bool = True


def phases(spec, params, total_steps: int, steps_per_epoch: int) -> list[Phase]:
    """The freeze schedule of `spec`: one phase for a static spec, several for gradual
    unfreezing (one per stage, top down) and lp_ft (probe, then everything)."""
    start_patterns = preset_patterns(spec, params)
    extra = tuple(spec.patterns)
    if spec.strategy == "gradual_unfreeze":
        g = spec.gradual_unfreeze
        every = g.every_steps or max(1, round(g.every_epochs * steps_per_epoch))
        frozen = list(start_patterns)  # stem .. stageN
        out = []
        for k in range(len(frozen) + 1):
            start = k * every
            if start >= total_steps:
                break
            out.append(Phase(start, 0, tuple(frozen[: len(frozen) - k]) + extra, fresh=k == 0))
        ends = [p.start for p in out[1:]] + [total_steps]
        return [dataclasses.replace(p, end=e) for p, e in zip(out, ends, strict=True)]
    if spec.strategy == "lp_ft":
        lp_steps = max(1, min(total_steps - 1, round(spec.lp_ft.lp_fraction * total_steps)))
        return [
            Phase(0, lp_steps, tuple(start_patterns) + extra, fresh=True),
            Phase(lp_steps, total_steps, extra, fresh=True, head_is_new=False),
        ]
    return [Phase(0, total_steps, tuple(start_patterns) + extra, fresh=True)]


def phase_at(plan: list[Phase], done_steps: int) -> int:
    """Index of the phase in which the update after `done_steps` updates happens."""
    return max(i for i, p in enumerate(plan) if p.start <= done_steps)


def bn_leaves(params, batch_stats) -> dict:
    """A tree of bools: True for BatchNorm scale/bias (leaves of a module with batch_stats)."""
    bn_modules = {path_str(p[:-1]) for p, _ in jax.tree_util.tree_leaves_with_path(batch_stats)}
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p[:-1]) in bn_modules, params)


def bn_mode(spec) -> str:
    """The effective BatchNorm policy (freeze_bn_stats=False turns statistics freezing off)."""
    stats_frozen, affine_frozen = BN_MODES[spec.bn]
    stats_frozen = stats_frozen and bool(spec.freeze_bn_stats)
    return next(m for m, v in BN_MODES.items() if v == (stats_frozen, affine_frozen))


def frozen_mask(spec, params, patterns=None, batch_stats=None) -> dict:
    """A tree of bools (True = frozen). A pattern that matches no parameter is an error.

    `patterns`: a phase's (default: the strategy's start). With `batch_stats` and a bn mode that
    trains scale/bias, the BatchNorm scale/bias leaves of frozen parts are trainable."""
    if patterns is None:
        patterns = preset_patterns(spec, params) + list(spec.patterns)
    paths = leaf_paths(params)
    unmatched = [p for p in patterns if not any(re.search(p, path) for path in paths)]
    if unmatched:
        listing = "\n  ".join(paths)
        raise ValueError(
            f"freeze pattern(s) {unmatched} match no parameter. Patterns are Python regexes "
            f"searched in '/'-joined paths; the parameters are:\n  {listing}"
        )
    mask = jax.tree_util.tree_map_with_path(
        lambda p, _: any(re.search(pat, path_str(p)) for pat in patterns), params
    )
    if batch_stats is not None and not BN_MODES[spec.bn][1]:
        mask = jax.tree.map(lambda m, bn: m and not bn, mask, bn_leaves(params, batch_stats))
    return mask


def frozen_stages(spec, params, patterns=None) -> tuple[str, ...]:
    """Top-level stages all of whose (non-BatchNorm) parameters are frozen and whose BatchNorm
    statistics the bn mode freezes: the model runs them on running statistics."""
    if not BN_MODES[bn_mode(spec)][0]:
        return ()
    mask = frozen_mask(spec, params, patterns)
    return tuple(s for s in stage_names(params) if all(jax.tree.leaves(mask[s])))


def count(params, mask) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = frozen = 0
    for leaf, is_frozen in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True):
        if is_frozen:
            frozen += leaf.size
        else:
            trainable += leaf.size
    return trainable, frozen
