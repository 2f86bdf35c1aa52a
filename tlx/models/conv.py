"""Regular (dense) convolutions routed around XLA:CPU's slow cases, equal to XLA's own to rounding.

A 1x1 convolution is a 2D matrix product with a matrix-product backward pass (stride s: the
strided pixels first), as `depthwise.pointwise_conv`; a convolution whose output is a few pixels
(the last stage of a ResNet on small images) is im2col + one matrix product, where XLA:CPU's
convolution is 10-80x slower; every other convolution is XLA's. Parameters keep flax's HWIO
layout, so checkpoints and converted weights are the same whichever implementation runs.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from tlx.models.depthwise import _windows, pointwise_conv

Padding = str | int | Sequence[tuple[int, int]]
IMPLS = ("xla", "fast", "auto")
DIMS = ("NHWC", "HWIO", "NHWC")


# XLA:CPU's convolution is pathological when the output is a few pixels (ResNet-50's last stage
# at 64 px: 2x2): forward 0.5-1 s for a (32, 2, 2, 512) 3x3 convolution that im2col + one
# matrix product does in 10 ms. At 3x3 outputs and more the two are within noise (at 8x8 im2col
# is 2x slower forward), hence the bound.
SMALL_OUTPUT = 9


def resolve(impl: str, backend: str | None = None) -> str:
    """'auto' -> 'fast' on CPU (where it was measured faster), 'xla' elsewhere (cuDNN, TPU)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown conv impl {impl!r}: use one of {IMPLS}")
    if impl == "auto":
        return "fast" if (backend or jax.default_backend()) == "cpu" else "xla"
    return impl


def _pairs(padding: Padding, spatial, window, strides) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return tuple(tuple(p) for p in lax.padtype_to_pads(spatial, window, strides, padding))
    if isinstance(padding, int):
        return ((padding, padding),) * len(spatial)
    return tuple(tuple(int(v) for v in p) for p in padding)


def xla_conv(x, kernel, strides=1, padding: Padding = "SAME"):
    """The reference: `lax.conv_general_dilated` with NHWC inputs and an HWIO kernel."""
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    pads = _pairs(padding, x.shape[1:3], kernel.shape[:2], strides)
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=DIMS)


def conv(x, kernel, strides=1, padding: Padding = "SAME"):
    """y[n, i, j, o] = sum_{a, b, c} xpad[n, i*s + a, j*s + b, c] * kernel[a, b, c, o].

    x: (N, H, W, C); kernel: (kh, kw, C, O); strides: int or (sh, sw); padding: 'SAME', 'VALID',
    an int (symmetric, as torch) or ((lo, hi), (lo, hi)). Equals `xla_conv` (values and
    gradients), computed as the module docstring says.
    """
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    pads = _pairs(padding, x.shape[1:3], kernel.shape[:2], strides)
    if kernel.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0)):
        if strides != (1, 1):
            x = x[:, :: strides[0], :: strides[1]]
        return pointwise_conv(x, kernel)
    ho, wo = _out_hw(x.shape, kernel.shape, strides, pads)
    if ho * wo <= SMALL_OUTPUT:
        return im2col_conv(x, kernel, strides, pads)
    # Larger outputs: XLA's own. A kernel gradient of k*k window products (no transposed
    # copies) was measured 1.0-1.8x slower than XLA's on ResNet-18's 3x3 shapes, the windows'
    # copies costing more than the transposes they save; Winograd F(2x2, 3x3) 0.84-1.6x.
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=DIMS)


def _out_hw(x_shape, kernel_shape, strides, pads):
    return tuple(
        (x_shape[1 + d] + sum(pads[d]) - kernel_shape[d]) // strides[d] + 1 for d in range(2)
    )


def im2col_conv(x, kernel, strides, pads):
    """The patches (P, kh*kw*C) times the kernel (kh*kw*C, O); plain autodiff backward."""
    kh, kw, c, o = kernel.shape
    ho, wo = _out_hw(x.shape, kernel.shape, strides, pads)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    patches = jnp.concatenate(_windows(xp, kernel.shape, strides, (ho, wo)), axis=-1)
    y = jnp.dot(patches.reshape(-1, kh * kw * c), kernel.reshape(kh * kw * c, o))
    return y.reshape(x.shape[0], ho, wo, o)


class Conv(nn.Module):
    """A convolution without bias whose parameter is `kernel` (kh, kw, C_in, features), as
    `nn.Conv(features, kernel_size, strides, padding, use_bias=False)` names and shapes it.

    `impl`: 'fast' (`conv`), 'xla' (`lax.conv_general_dilated` with XLA's autodiff) or 'auto'
    ('fast' on CPU, 'xla' on GPU/TPU).
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int | tuple[int, int] = 1
    padding: Padding = "SAME"
    impl: str = "auto"
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if resolve(self.impl) == "fast":
            return conv(x, kernel, self.strides, self.padding)
        return xla_conv(x, kernel, self.strides, self.padding)
