"""gradual_unfreeze (ULMFiT, Howard & Ruder 2018): start with the head, then unfreeze one stage
more, top down, every `every_epochs` epochs (or every `every_steps` steps when > 0). One optimizer
throughout: a newly unfrozen stage joins with zero optimizer state (its own group), the others
carry theirs on."""

from tlx import freeze
from tlx.strategies.base import Strategy, register


def _check(k):
    if k.every_steps < 0 or (k.every_steps == 0 and not k.every_epochs > 0):
        raise ValueError(
            "gradual_unfreeze needs strategy.gradual_unfreeze.every_epochs > 0 or every_steps > 0;"
            f" got every_epochs={k.every_epochs}, every_steps={k.every_steps}"
        )


def _phases(ctx):
    k = ctx.knobs
    every = k.every_steps or max(1, round(k.every_epochs * ctx.steps_per_epoch))
    frozen = freeze.stage_patterns(ctx.stages)  # stem .. stageN
    out = []
    for n in range(len(frozen) + 1):
        start = n * every
        if start >= ctx.total_steps:
            break
        out.append((start, tuple(frozen[: len(frozen) - n])))
    ends = [s for s, _ in out[1:]] + [ctx.total_steps]
    return [
        freeze.Phase(s, e, p, fresh=n == 0)
        for n, ((s, p), e) in enumerate(zip(out, ends, strict=True))
    ]


GRADUAL_UNFREEZE = register(
    Strategy(
        "gradual_unfreeze",
        "head first, then one stage more every epoch, top down",
        knobs={"every_epochs": 1.0, "every_steps": 0},
        check=_check,
        phases=_phases,
    )
)
