"""surgical (Lee et al. 2023, "Surgical fine-tuning"): tune one stage (with the new head) and
freeze the rest. stage1 suits input-level shifts, the last stages output-level ones; 'head' is a
linear probe."""

from tlx import freeze
from tlx.strategies.base import Strategy, register


def _frozen(ctx):
    stage = ctx.knobs.stage
    if stage not in (*ctx.stages, "head"):
        raise ValueError(f"strategy.surgical.stage={stage!r}: use one of {[*ctx.stages, 'head']}")
    return freeze.stage_patterns([s for s in ctx.stages if s != stage])


SURGICAL = register(
    Strategy("surgical", "one stage and the head train", knobs={"stage": "stage1"}, frozen=_frozen)
)
