"""vpt (Jia et al. 2022, "Visual prompt tuning"): `prompts` learned tokens inserted after the cls
token at the input of the first encoder block (shallow), or at every block's input, replacing
the previous block's prompt outputs (deep=True); the prompts and the head train, the backbone is
frozen. Pooling ignores the prompt tokens. ViTs only (hooks `tlx.models.vit.ViT.num_prompts`,
`deep_prompts`); prompts start as VPT's (uniform, Xavier's range for the patch embedding).
"""

import jax

from tlx.models import vit
from tlx.strategies.adapter import encoder_blocks
from tlx.strategies.base import Strategy, register


def _check(k):
    if int(k.prompts) < 1:
        raise ValueError(f"strategy.vpt.prompts={k.prompts}: use 1 or more prompt tokens")


def _init(ctx, params, rng):
    n = int(ctx.knobs.prompts)
    blocks = encoder_blocks(params, "vpt")
    p, _, channels, width = params["stem"]["embedding"]["kernel"].shape
    init = vit.prompt_init(p, channels, width)
    out = {s: dict(sub) for s, sub in params.items()}
    for k, (stage, block) in enumerate(blocks):
        if k and not ctx.knobs.deep:
            break
        i = int(block.split("_")[1])
        out[stage][block] = {
            **out[stage][block],
            "prompts": init(jax.random.fold_in(rng, i), (1, n, width)),
        }
    return out


def trainable_count(params, knobs) -> int:
    """prompts x width, once (shallow) or per block (deep), without the head."""
    blocks = encoder_blocks(params, "vpt")
    width = params["stem"]["embedding"]["kernel"].shape[-1]
    return int(knobs.prompts) * width * (len(blocks) if knobs.deep else 1)


VPT = register(
    Strategy(
        "vpt",
        "learned prompt tokens (shallow or deep) train, the backbone is frozen",
        knobs={"prompts": 10, "deep": False},
        check=_check,
        frozen=lambda ctx: [r"^(?!head/)(?!.*/prompts$)"],
        init_params=_init,
        model_fields=lambda ctx: {
            "num_prompts": int(ctx.knobs.prompts),
            "deep_prompts": bool(ctx.knobs.deep),
        },
        tags=("peft",),
    )
)
