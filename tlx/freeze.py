"""Which parameters a run trains: regexes over '/'-joined parameter paths, compiled to one bool per
leaf (True = frozen), which `tlx.optim` maps to one `optax.multi_transform` with
`optax.set_to_zero()` for the frozen leaves, and the BatchNorm policy of the frozen parts.

A strategy (`tlx.strategies`) says what is frozen when: its phases, each a step range with its
frozen patterns. `config.freeze` adds what every strategy shares: extra patterns and the bn mode.
"""

import dataclasses
import re

import jax
import ml_collections

FROZEN = "frozen"

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
            # extra regexes (re.search over 'stage2/block0/conv1/kernel'-style paths) to freeze,
            # on top of what the strategy freezes, in every phase.
            "patterns": [],
            # BatchNorm in frozen stages: frozen | train_affine | train_stats | train (BN_MODES).
            "bn": "frozen",
        }
    )


def check(spec) -> None:
    if spec.bn not in BN_MODES:
        raise ValueError(f"freeze.bn={spec.bn!r}: use one of {list(BN_MODES)}")
    for p in spec.patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"freeze.patterns: {p!r} is not a valid regex ({e})") from None


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


def phase_at(phases: list[Phase], done_steps: int) -> int:
    """Index of the phase in which the update after `done_steps` updates happens."""
    return max(i for i, p in enumerate(phases) if p.start <= done_steps)


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


def stage_patterns(stages) -> list[str]:
    """The regexes that freeze whole top-level stages: ['stem', 'stage1'] -> ['^stem/', ...]."""
    return [f"^{s}/" for s in stages]


def bn_leaves(params, batch_stats) -> dict:
    """A tree of bools: True for BatchNorm scale/bias (leaves of a module with batch_stats)."""
    bn_modules = {path_str(p[:-1]) for p, _ in jax.tree_util.tree_leaves_with_path(batch_stats)}
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p[:-1]) in bn_modules, params)


def frozen_mask(params, patterns, bn: str = "frozen", batch_stats=None) -> dict:
    """A tree of bools (True = frozen). A pattern that matches no parameter is an error.

    With `batch_stats` and a bn mode that trains scale/bias, the BatchNorm scale/bias leaves of
    frozen parts are trainable."""
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
    if batch_stats is not None and not BN_MODES[bn][1]:
        mask = jax.tree.map(lambda m, b: m and not b, mask, bn_leaves(params, batch_stats))
    return mask


def frozen_stages(params, patterns, bn: str = "frozen") -> tuple[str, ...]:
    """Top-level stages all of whose (non-BatchNorm) parameters are frozen and whose BatchNorm
    statistics the bn mode freezes: the model runs them on running statistics."""
    if not BN_MODES[bn][0]:
        return ()
    mask = frozen_mask(params, patterns)
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
