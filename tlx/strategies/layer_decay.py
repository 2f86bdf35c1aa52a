"""layer_decay (ULMFiT's discriminative rates, timm's `layer_decay` by stage): the LR of a
backbone stage k stages below the top one is optim.lr * decay**k; the head trains at its own
head_lr. ULMFiT's 1/2.6 is the default."""

import jax

from tlx import freeze
from tlx.strategies.base import Strategy, register


def _check(k):
    if not 0.0 < k.decay <= 1.0:
        raise ValueError(f"strategy.layer_decay.decay={k.decay}: use 0 < decay <= 1")


def multipliers(params, decay: float) -> dict:
    """decay**k for a leaf of the backbone stage k stages below the top one; 1 for the head."""
    stages = freeze.stage_names(params)[:-1]
    depth = {s: len(stages) - 1 - i for i, s in enumerate(stages)}
    return jax.tree_util.tree_map_with_path(
        lambda p, _: decay ** depth.get(freeze.path_str(p).split("/")[0], 0), params
    )


LAYER_DECAY = register(
    Strategy(
        "layer_decay",
        "LR decays by `decay` per stage below the top one",
        knobs={"decay": 1 / 2.6},
        check=_check,
        lr_mult=lambda ctx: multipliers(ctx.params, ctx.knobs.decay),
    )
)
