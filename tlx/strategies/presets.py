"""The seed's presets, by how many stages they freeze, and the seed's table that prescribes them.

none           fine-tune everything
linear_probe   freeze every stage (the seed's "freeze all conv layers"): only the new head trains
freeze_most    freeze all stages but the last one
freeze_early   freeze the stem and the first stage (the seed's "freeze some (early) layers")
freeze_stages  freeze the stem and stage1..stageK (`stages`=K; 0: none)
"""

from tlx import freeze
from tlx.strategies.base import Strategy, register

# The seed's rule (DESIGN.md), as BiT's hyperrule is: a pure function of the target's
# (size, similarity) quadrant. "Freeze all conv layers" = linear_probe.
SEED_TABLE = {
    ("large", "similar"): "freeze_most",
    ("large", "different"): "none",
    ("small", "similar"): "linear_probe",
    ("small", "different"): "freeze_early",
}


def seed_prescription(size: str, similarity: str) -> str:
    """The strategy the seed's table prescribes: size 'small' | 'large', similarity 'similar' |
    'different'."""
    if (size, similarity) not in SEED_TABLE:
        raise ValueError(
            f"seed table: size={size!r}, similarity={similarity!r}; use small|large, "
            "similar|different"
        )
    return SEED_TABLE[(size, similarity)]


def _stages(pick):
    return lambda ctx: freeze.stage_patterns(pick(ctx.stages))


def _freeze_stages(ctx):
    k = int(ctx.knobs.stages)
    if not 0 <= k <= len(ctx.stages) - 1:
        raise ValueError(
            f"strategy.freeze_stages.stages={k} is out of range: this backbone has stages "
            f"stage1..stage{len(ctx.stages) - 1}; use 0..{len(ctx.stages) - 1}"
        )
    return freeze.stage_patterns(ctx.stages[: k + 1] if k > 0 else [])


NONE = register(Strategy("none", "fine-tune everything"))
LINEAR_PROBE = register(
    Strategy("linear_probe", "only the new head trains", frozen=_stages(lambda s: s))
)
FREEZE_MOST = register(
    Strategy("freeze_most", "all stages but the last frozen", frozen=_stages(lambda s: s[:-1]))
)
FREEZE_EARLY = register(
    Strategy("freeze_early", "the stem and stage1 frozen", frozen=_stages(lambda s: s[:2]))
)
FREEZE_STAGES = register(
    Strategy(
        "freeze_stages",
        "the stem and stage1..stageK frozen",
        knobs={"stages": 0},
        frozen=_freeze_stages,
    )
)
