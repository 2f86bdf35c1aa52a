"""The freezing presets, by how many stages they freeze, and the rule of thumb that prescribes
one from the target's size and its similarity to the source.

none           fine-tune everything
linear_probe   freeze every stage (the rule's "freeze all conv layers"): only the new head trains
freeze_most    freeze all stages but the last one
freeze_early   freeze the stem and the first stage (the rule's "freeze some (early) layers")
freeze_stages  freeze the stem and stage1..stageK (`stages`=K; 0: none)

The rule of thumb is the table of Stanford's CS231n lectures on transfer learning with CNNs
(notes: https://cs231n.github.io/transfer-learning/): little data similar to the source: a
linear classifier on the top layer; little data, different: classifiers from earlier stages;
lots of data, similar: fine-tune a few layers; lots, different: fine-tune many (here: all).
Yosinski et al. 2014 ("How transferable are features in deep neural networks?") measure why:
early layers are general, later ones specific to the source.
"""

from tlx import freeze
from tlx.strategies.base import Strategy, register

# The rule of thumb as BiT's hyperrule is (Kolesnikov et al. 2020, big_transfer's
# bit_hyperrule.py): a pure function of the target's (size, similarity) quadrant.
# "Freeze all conv layers" = linear_probe.
RULE_OF_THUMB = {
    ("large", "similar"): "freeze_most",
    ("large", "different"): "none",
    ("small", "similar"): "linear_probe",
    ("small", "different"): "freeze_early",
}


def rule_of_thumb(size: str, similarity: str) -> str:
    """The strategy the rule of thumb prescribes: size 'small' | 'large', similarity 'similar' |
    'different'."""
    if (size, similarity) not in RULE_OF_THUMB:
        raise ValueError(
            f"rule of thumb: size={size!r}, similarity={similarity!r}; use small|large, "
            "similar|different"
        )
    return RULE_OF_THUMB[(size, similarity)]


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


PRESET = ("preset",)  # a fixed number of frozen stages: the x axis of the frozen-stage plot
NONE = register(Strategy("none", "fine-tune everything", tags=PRESET))
LINEAR_PROBE = register(
    Strategy("linear_probe", "only the new head trains", frozen=_stages(lambda s: s), tags=PRESET)
)
FREEZE_MOST = register(
    Strategy(
        "freeze_most",
        "all stages but the last frozen",
        frozen=_stages(lambda s: s[:-1]),
        tags=PRESET,
    )
)
FREEZE_EARLY = register(
    Strategy(
        "freeze_early", "the stem and stage1 frozen", frozen=_stages(lambda s: s[:2]), tags=PRESET
    )
)
FREEZE_STAGES = register(
    Strategy(
        "freeze_stages",
        "the stem and stage1..stageK frozen",
        knobs={"stages": 0},
        frozen=_freeze_stages,
        tags=PRESET,
    )
)
