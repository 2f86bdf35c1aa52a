"""lp_ft (Kumar et al. 2022, "Fine-tuning can distort pretrained features"): a linear probe for
`lp_fraction` of the steps (head at optim.head_lr), then everything, head included, from that
head at optim.lr, with a fresh optimizer and schedule."""

from tlx import freeze
from tlx.strategies.base import Strategy, register


def _check(k):
    if not 0.0 < k.lp_fraction < 1.0:
        raise ValueError(f"strategy.lp_ft.lp_fraction={k.lp_fraction}: use 0 < f < 1")


def _phases(ctx):
    total = ctx.total_steps
    lp_steps = max(1, min(total - 1, round(ctx.knobs.lp_fraction * total)))
    return [
        freeze.Phase(0, lp_steps, tuple(freeze.stage_patterns(ctx.stages)), fresh=True),
        freeze.Phase(lp_steps, total, (), fresh=True, head_is_new=False),
    ]


LP_FT = register(
    Strategy(
        "lp_ft",
        "linear probe, then fine-tune everything from that head",
        knobs={"lp_fraction": 0.5},
        check=_check,
        phases=_phases,
    )
)
