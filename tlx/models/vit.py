"""Vision Transformers (Dosovitskiy et al. 2021) with big_vision's parameter names inside tlx's
stage vocabulary: `stem` (patch embedding, position embedding, cls token), `stage1`..`stageK`
(groups of encoder blocks, the last ending with the encoder's final LayerNorm), `head` (a Dense).

A big_vision key maps to a tlx path by a rename of the top level only (see `tlx.convert.vit`):

  embedding/kernel, pos_embedding, cls       -> stem/embedding/kernel, stem/pos_embedding, stem/cls
  Transformer/encoderblock_N/...             -> stage{k}/encoderblock_N/...  (N counts globally)
  Transformer/encoder_norm/{scale,bias}      -> stage{K}/encoder_norm/{scale,bias}
  head/{kernel,bias}                         -> head/{kernel,bias}

Inside a block the names are big_vision's: LayerNorm_0, MultiHeadDotProductAttention_1
(query/key/value kernels (D, heads, D/heads), out (heads, D/heads, D)), LayerNorm_2,
MlpBlock_3/{Dense_0, Dense_1}. There is no BatchNorm: `frozen_bn` and `axis_name` are accepted
for the backbone contract and change nothing (a frozen stage behaves the same in train mode).

Hooks for parameter-efficient fine-tuning (`tlx.strategies.adapter`, `tlx.strategies.vpt`), off
by default (the tree is then big_vision's): `adapter_dim` > 0 adds Houlsby adapters
`encoderblock_N/adapter_attn` and `adapter_mlp`; `num_prompts` > 0 adds prompt tokens
`encoderblock_0/prompts` (every block's with `deep_prompts`).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Table 2 of Zhai et al. 2022 (big_vision's `decode_variant`): width, depth, MLP width, heads.
VARIANTS = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
}

# big_vision's initialisers.
xavier = nn.initializers.xavier_uniform()
tiny_bias = nn.initializers.normal(1e-6)


def stage_blocks(depth: int, num_stages: int) -> list[range]:
    """Global block indices of each stage: `depth` blocks split as evenly as possible, the
    earlier stages taking the remainder (12 blocks, 4 stages: 0-2, 3-5, 6-8, 9-11)."""
    if not 1 <= num_stages <= depth:
        raise ValueError(f"num_stages={num_stages} must be between 1 and depth={depth}")
    sizes = [len(a) for a in np.array_split(np.arange(depth), num_stages)]
    starts = np.cumsum([0, *sizes])
    return [range(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True)]


class MlpBlock(nn.Module):
    """Dense_0 (D -> mlp_dim), GELU, Dense_1 (mlp_dim -> D)."""

    mlp_dim: int
    approximate_gelu: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        kw = dict(kernel_init=xavier, bias_init=tiny_bias, dtype=self.dtype)
        x = nn.Dense(self.mlp_dim, name="Dense_0", **kw)(x)
        x = nn.gelu(x, approximate=self.approximate_gelu)
        return nn.Dense(d, name="Dense_1", **kw)(x)


class Adapter(nn.Module):
    """Houlsby et al. 2019's bottleneck adapter: x + up(gelu(down(x))), `up` zero-initialised so
    that the block starts as the identity."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.dim, kernel_init=xavier, dtype=self.dtype, name="down")(x)
        y = nn.gelu(y)
        up = nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros, dtype=self.dtype, name="up")
        return x + up(y)


def prompt_init(patch_size: int, channels: int, width: int):
    """VPT's prompt initialiser (Jia et al. 2022): uniform in +-sqrt(6 / (patch area x channels +
    width)), Xavier's range for the patch embedding."""
    bound = float(np.sqrt(6.0 / (patch_size * patch_size * channels + width)))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class EncoderBlock(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + MLP(LN(x)).

    Hooks (off by default): `adapter_dim` > 0: an `Adapter` on the attention's and on the MLP's
    output, before each residual add (`adapter_attn`, `adapter_mlp`). `num_prompts` > 0:
    `prompts` (1, n, D) inserted after the first `prompt_offset` tokens (the cls token), or, with
    `prompt_insert` False (VPT-deep's later blocks), replacing the n prompt tokens there."""

    num_heads: int
    mlp_dim: int
    approximate_gelu: bool = True
    dtype: Any = jnp.float32
    adapter_dim: int = 0
    num_prompts: int = 0
    prompt_insert: bool = True
    prompt_offset: int = 0
    prompt_init: Any = None

    @nn.compact
    def __call__(self, x):
        if self.num_prompts:
            n, c = self.num_prompts, self.prompt_offset
            p = self.param("prompts", self.prompt_init, (1, n, x.shape[-1]), jnp.float32)
            p = jnp.tile(p.astype(x.dtype), (x.shape[0], 1, 1))
            rest = x[:, c:] if self.prompt_insert else x[:, c + n :]
            x = jnp.concatenate([x[:, :c], p, rest], axis=1)
        y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_0")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            kernel_init=xavier,
            deterministic=True,
            dtype=self.dtype,
            name="MultiHeadDotProductAttention_1",
        )(y, y)
        if self.adapter_dim:
            y = Adapter(self.adapter_dim, self.dtype, name="adapter_attn")(y)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_2")(x)
        y = MlpBlock(self.mlp_dim, self.approximate_gelu, self.dtype, name="MlpBlock_3")(y)
        if self.adapter_dim:
            y = Adapter(self.adapter_dim, self.dtype, name="adapter_mlp")(y)
        return x + y


class Stem(nn.Module):
    """Patches -> tokens: `embedding` (a patch x patch convolution, stride patch), plus
    `pos_embedding` (1, h*w, D), then `cls` (1, 1, D) prepended when pool_type='tok'
    (position embedding added before the cls token, as big_vision does)."""

    width: int
    patch_size: int
    pool_type: str = "tok"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        height, width = x.shape[1:3]
        if height % p or width % p:  # a VALID patch convolution would drop the remainder
            sizes = sorted({max(p, height // p * p), -(-height // p) * p})
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the ViT's patch size {p}: "
                f"its patches would drop the last {height % p} rows and {width % p} columns; "
                f"use data.image_size={' or '.join(map(str, sizes))}"
            )
        x = nn.Conv(
            self.width, (p, p), (p, p), padding="VALID", dtype=self.dtype, name="embedding"
        )(x)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        posemb = self.param(
            "pos_embedding", nn.initializers.normal(1 / np.sqrt(c)), (1, h * w, c), jnp.float32
        )
        x = x + posemb.astype(self.dtype)
        if self.pool_type == "tok":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
            x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), (n, 1, 1)), x], axis=1)
        return x


class Stage(nn.Module):
    """Encoder blocks `encoderblock_{i}` for i in `blocks` (global indices, as in big_vision's
    `Transformer`); the last stage ends with `encoder_norm`."""

    blocks: Sequence[int]
    num_heads: int
    mlp_dim: int
    final_norm: bool = False
    approximate_gelu: bool = True
    dtype: Any = jnp.float32
    adapter_dim: int = 0
    num_prompts: int = 0
    deep_prompts: bool = False
    prompt_offset: int = 0
    prompt_init: Any = None

    @nn.compact
    def __call__(self, x):
        for i in self.blocks:
            x = EncoderBlock(
                self.num_heads,
                self.mlp_dim,
                self.approximate_gelu,
                self.dtype,
                adapter_dim=self.adapter_dim,
                num_prompts=self.num_prompts if i == 0 or self.deep_prompts else 0,
                prompt_insert=i == 0,
                prompt_offset=self.prompt_offset,
                prompt_init=self.prompt_init,
                name=f"encoderblock_{i}",
            )(x)
        if self.final_norm:
            x = nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x)
        return x


class ViT(nn.Module):
    """A ViT whose top-level submodules are `stem`, `stage1`..`stage{num_stages}` and `head`.

    `pool_type`: 'tok' (the cls token's output, as the original ViT, AugReg and timm) or 'gap'
    (the mean of all tokens after the final LayerNorm, big_vision's default). The head is a
    zero-initialised Dense, as big_vision's. `approximate_gelu`: True is big_vision's tanh GELU;
    timm's weights were trained with the exact (erf) GELU. `frozen_bn`, `axis_name`: no-ops.
    `adapter_dim`, `num_prompts`, `deep_prompts`: the PEFT hooks (module docstring); pooling
    ignores the prompt tokens.
    """

    num_classes: int
    patch_size: int = 16
    width: int = 192
    depth: int = 12
    mlp_dim: int = 768
    num_heads: int = 3
    pool_type: str = "tok"
    num_stages: int = 4
    approximate_gelu: bool = True
    frozen_bn: Sequence[str] = ()
    axis_name: str | None = None
    dtype: Any = jnp.float32
    adapter_dim: int = 0
    num_prompts: int = 0
    deep_prompts: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no dropout, no BatchNorm: train and eval compute the same function
        if self.pool_type not in ("tok", "gap"):
            raise ValueError(f"pool_type={self.pool_type!r}: use 'tok' (cls token) or 'gap'")
        channels = x.shape[-1]
        x = Stem(self.width, self.patch_size, self.pool_type, self.dtype, name="stem")(
            x.astype(self.dtype)
        )
        offset = 1 if self.pool_type == "tok" else 0
        groups = stage_blocks(self.depth, self.num_stages)
        for k, blocks in enumerate(groups, start=1):
            x = Stage(
                tuple(blocks),
                self.num_heads,
                self.mlp_dim,
                final_norm=k == len(groups),
                approximate_gelu=self.approximate_gelu,
                dtype=self.dtype,
                adapter_dim=self.adapter_dim,
                num_prompts=self.num_prompts,
                deep_prompts=self.deep_prompts,
                prompt_offset=offset,
                prompt_init=prompt_init(self.patch_size, channels, self.width),
                name=f"stage{k}",
            )(x)
        if self.num_prompts:  # pooling sees the image's tokens (and the cls token) only
            x = jnp.concatenate([x[:, :offset], x[:, offset + self.num_prompts :]], axis=1)
        x = x[:, 0] if self.pool_type == "tok" else jnp.mean(x, axis=1)
        head = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head"
        )
        return head(x).astype(jnp.float32)


def vit(num_classes: int, variant: str = "Ti", patch_size: int = 16, **kwargs: Any) -> ViT:
    """ViT-`variant`/`patch_size` (variant Ti, S or B); kwargs set other `ViT` fields (pool_type,
    num_stages, approximate_gelu, frozen_bn, axis_name, dtype). `stem` is a ResNet option: only
    empty or None is accepted."""
    stem = kwargs.pop("stem", None)
    if stem not in (None, ""):
        raise ValueError(
            f"ViTs have one stem (the patch embedding); stem={stem!r} applies to ResNets only: "
            "leave model.stem empty"
        )
    if variant not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; use one of {sorted(VARIANTS)}")
    return ViT(num_classes, patch_size, **{**VARIANTS[variant], **kwargs})


def param_count(
    variant: str, patch_size: int, image_size: int, num_classes: int, pool_type: str = "tok"
) -> int:
    """big_vision's parameter count of ViT-variant/patch at a square image size, by formula."""
    v = VARIANTS[variant]
    d, m, depth = v["width"], v["mlp_dim"], v["depth"]
    tokens = (image_size // patch_size) ** 2
    stem = patch_size * patch_size * 3 * d + d + tokens * d + (d if pool_type == "tok" else 0)
    block = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)
    return stem + depth * block + 2 * d + d * num_classes + num_classes
