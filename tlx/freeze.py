"""Freeze specs: which parameters a run trains, compiled to labels on the parameter tree.

A spec (`config.freeze`) names a preset from the seed's table or explicit regexes over
'/'-joined parameter paths; `labels()` turns it into one label per leaf, which `tlx.optim` maps
to one `optax.multi_transform` with `optax.set_to_zero()` for the frozen leaves.
"""

import re

import jax
import ml_collections

FROZEN = "frozen"
PRESETS = ("none", "linear_probe", "freeze_most", "freeze_early", "freeze_stages")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            # none | linear_probe | freeze_most | freeze_early | freeze_stages
            "strategy": "none",
            # with strategy='freeze_stages': freeze the stem and stage1..stageK.
            "stages": 0,
            # extra regexes (re.search over 'stage2/block0/conv1/kernel'-style paths) to freeze.
            "patterns": [],
            # BatchNorm layers in fully frozen stages run on (and keep) their running statistics.
            "freeze_bn_stats": True,
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


def preset_patterns(spec, params) -> list[str]:
    """The regexes a preset freezes, on this backbone's stages."""
    stages = stage_names(params)[:-1]  # everything but the head
    strategy = spec.strategy
    if strategy == "none":
        chosen = []
    elif strategy == "linear_probe":
        chosen = stages
    elif strategy == "freeze_most":  # all but the last stage (and the head)
        chosen = stages[:-1]
    elif strategy == "freeze_early":  # the stem and the first stage
        chosen = stages[:2]
    elif strategy == "freeze_stages":
        k = int(spec.stages)
        if not 0 <= k <= len(stages) - 1:
            raise ValueError(
                f"freeze.stages={k} is out of range: this backbone has stages "
                f"stage1..stage{len(stages) - 1}; use 0..{len(stages) - 1}"
            )
        chosen = stages[: k + 1] if k > 0 else []
    else:
        raise ValueError(
            f"unknown freeze strategy {strategy!r}; use one of {list(PRESETS)} "
            "(or strategy='none' with freeze.patterns=[regex, ...])"
        )
    return [f"^{s}/" for s in chosen]


def frozen_patterns(spec, params) -> list[str]:
    return preset_patterns(spec, params) + list(spec.patterns)


def frozen_mask(spec, params) -> dict:
    """A tree of bools (True = frozen). A pattern that matches no parameter is an error."""
    patterns = frozen_patterns(spec, params)
    paths = leaf_paths(params)
    unmatched = [p for p in patterns if not any(re.search(p, path) for path in paths)]
    if unmatched:
        listing = "\n  ".join(paths)
        raise ValueError(
            f"freeze pattern(s) {unmatched} match no parameter. Patterns are Python regexes "
            f"searched in '/'-joined paths; the parameters are:\n  {listing}"
        )
    return jax.tree_util.tree_map_with_path(
        lambda p, _: any(re.search(pat, path_str(p)) for pat in patterns), params
    )


def frozen_stages(spec, params) -> tuple[str, ...]:
    """Top-level stages all of whose parameters are frozen (their BatchNorm statistics too)."""
    if not spec.freeze_bn_stats:
        return ()
    mask = frozen_mask(spec, params)
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
