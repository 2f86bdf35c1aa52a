"""Fine-tuning strategies, one module each, registered by name, and the plan that turns the
selected one into a run's phases, optimizer and train step.

    from tlx import strategies
    strategies.register(strategies.Strategy("bitfit", frozen=lambda ctx: [r"^(?!head/).*kernel$"]))
    # then configs/finetune.py:strategy=bitfit

`Strategy` (base.py) says what a strategy may contribute; `plan` (planning.py) is generic.
"""

from tlx.strategies import (  # noqa: F401 - each module registers its strategies
    adapter,
    auto_rgn,
    bitfit,
    gradual_unfreeze,
    l2_sp,
    layer_decay,
    lora,
    lp_ft,
    presets,
    scratch,
    surgical,
    vpt,
)
from tlx.strategies.base import (
    REGISTRY,
    Branch,
    Context,
    Strategy,
    get,
    knobs_of,
    register,
    tagged,
)
from tlx.strategies.planning import PhaseSetup, Plan, StepInfo, StrategyModel, plan
from tlx.strategies.presets import RULE_OF_THUMB, rule_of_thumb

__all__ = [
    "REGISTRY",
    "RULE_OF_THUMB",
    "Branch",
    "Context",
    "Plan",
    "PhaseSetup",
    "StepInfo",
    "Strategy",
    "StrategyModel",
    "get",
    "knobs_of",
    "names",
    "plan",
    "register",
    "rule_of_thumb",
    "tagged",
]


def names() -> list[str]:
    """The registered strategies, in registration order (built-in ones first)."""
    return list(REGISTRY)
