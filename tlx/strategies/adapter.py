"""adapter (Houlsby et al. 2019, "Parameter-efficient transfer learning for NLP"): a bottleneck
adapter x + up(gelu(down(x))) after the attention and after the MLP of every encoder block
(before each residual add), `up` zero-initialised so the run starts as the base model; the
adapters and the head train, the backbone is frozen. `dim`: the bottleneck width. Houlsby et al.
also train the LayerNorms: norms=True. ViTs only (the hook `tlx.models.vit.ViT.adapter_dim`).
"""

import re

import jax
import jax.numpy as jnp

from tlx import freeze
from tlx.models import vit
from tlx.strategies.base import Strategy, register

NAMES = ("adapter_attn", "adapter_mlp")


def _check(k):
    if int(k.dim) < 1:
        raise ValueError(f"strategy.adapter.dim={k.dim}: use a bottleneck width >= 1")


def encoder_blocks(params, strategy: str) -> list[tuple[str, str]]:
    """(stage, 'encoderblock_N') of every encoder block, or a ValueError for a non-ViT."""
    out = [
        (s, b)
        for s, sub in params.items()
        if isinstance(sub, dict)
        for b in sub
        if re.fullmatch(r"encoderblock_\d+", b)
    ]
    if not out:
        raise ValueError(
            f"strategy {strategy!r} needs a ViT (tlx.models.vit): this backbone has no "
            f"encoder blocks (stages {freeze.stage_names(params)})"
        )
    return sorted(out, key=lambda sb: int(sb[1].split("_")[1]))


def _init(ctx, params, rng):
    dim = int(ctx.knobs.dim)
    out = {s: dict(sub) for s, sub in params.items()}
    for stage, block in encoder_blocks(params, "adapter"):
        b = dict(out[stage][block])
        width = b["LayerNorm_0"]["scale"].shape[0]
        i = int(block.split("_")[1])
        for j, name in enumerate(NAMES):
            key = jax.random.fold_in(rng, 2 * i + j)
            b[name] = vit.Adapter(dim).init(key, jnp.zeros((1, width)))["params"]
        out[stage][block] = b
    return out


def _frozen(ctx):
    keep = "adapter_(?:attn|mlp)/" + ("|LayerNorm_\\d+/|encoder_norm/" if ctx.knobs.norms else "")
    return [rf"^(?!head/)(?!.*/(?:{keep}))"]


def trainable_count(params, knobs) -> int:
    """2 adapters per block, each D x dim + dim + dim x D + D (without the head)."""
    blocks = encoder_blocks(params, "adapter")
    width = params[blocks[0][0]][blocks[0][1]]["LayerNorm_0"]["scale"].shape[0]
    d = int(knobs.dim)
    return len(blocks) * 2 * (2 * width * d + d + width)


ADAPTER = register(
    Strategy(
        "adapter",
        "Houlsby bottleneck adapters after attention and MLP train, the backbone is frozen",
        knobs={"dim": 8, "norms": False},
        check=_check,
        frozen=_frozen,
        init_params=_init,
        model_fields=lambda ctx: {"adapter_dim": int(ctx.knobs.dim)},
        tags=("peft",),
    )
)
