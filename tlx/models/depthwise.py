"""Depthwise and 1x1 convolutions written for XLA:CPU, equal to XLA's own to float32 rounding.

XLA:CPU runs a depthwise convolution (`feature_group_count=C`) about 10x slower than torch, and
its weight gradient far slower still. Here the forward pass is k*k shifted multiply-adds over the
padded input, with a custom backward pass: the input gradient one stride phase at a time (no
zero-dilated gradient), the kernel gradient as one variadic reduce that reads each input once.
A 1x1 convolution is a 2D matrix product with a 2D-matrix-product backward pass. Parameters keep
flax's layouts, (kh, kw, 1, C) and (1, 1, C_in, C_out), so converted weights and checkpoints are
the same whichever implementation runs. (Forward-mode autodiff, `jax.jvp`, is not defined through
the custom backward passes; reverse mode, jit, vmap, pmap and sharding are.)
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Padding = str | int | Sequence[tuple[int, int]]


def _pairs(padding: Padding, spatial, window, strides) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        return [tuple(p) for p in lax.padtype_to_pads(spatial, window, strides, padding)]
    if isinstance(padding, int):
        return [(padding, padding)] * len(spatial)
    return [tuple(int(v) for v in p) for p in padding]


def _geometry(x_shape, kernel_shape, strides, padding):
    kh, kw, one, c = kernel_shape
    if one != 1 or x_shape[-1] != c:
        raise ValueError(f"depthwise kernel {kernel_shape} does not fit input {x_shape}")
    sh, sw = (strides, strides) if isinstance(strides, int) else tuple(strides)
    pads = _pairs(padding, x_shape[1:3], (kh, kw), (sh, sw))
    hp, wp = x_shape[1] + sum(pads[0]), x_shape[2] + sum(pads[1])
    return (sh, sw), pads, ((hp - kh) // sh + 1, (wp - kw) // sw + 1)


def _windows(xp, kernel_shape, strides, out_hw):
    """The kh*kw strided views of the padded input that meet each kernel tap."""
    kh, kw = kernel_shape[:2]
    (sh, sw), (ho, wo) = strides, out_hw
    n, _, _, c = xp.shape
    return [
        lax.slice(
            xp, (0, a, b, 0), (n, a + (ho - 1) * sh + 1, b + (wo - 1) * sw + 1, c), (1, sh, sw, 1)
        )
        for a in range(kh)
        for b in range(kw)
    ]


def _forward(xp, kernel, strides, out_hw):
    """The k*k multiply-adds over the padded input."""
    taps = kernel.reshape(-1, kernel.shape[-1])
    y = None
    for t, window in enumerate(_windows(xp, kernel.shape, strides, out_hw)):
        term = window * taps[t]
        y = term if y is None else y + term
    return y


def _input_grad(g, kernel, strides, pads, x_shape):
    """dx of the depthwise convolution, one stride phase at a time.

    dx[u] = sum_a g[(u + lo - a) / s] * kernel[a] over the taps a where s divides u + lo - a.
    Autodiff pads g with s-1 zeros between pixels and visits all k*k taps for each output;
    splitting dx by (u + lo) mod s leaves a stride-1 correlation of g with the taps of that
    phase (k*k / s^2 on average), whose results interleave back by a reshape.
    """
    _, h, w, _ = x_shape
    kh, kw = kernel.shape[:2]
    (sh, sw), ((lo_h, _), (lo_w, _)) = strides, pads
    ho, wo = g.shape[1:3]
    th, tw = -(-(h + lo_h) // sh), -(-(w + lo_w) // sw)
    phases = []
    for rh in range(sh):
        row = []
        for rw in range(sw):
            taps_h, taps_w = range(rh, kh, sh), range(rw, kw, sw)
            ah, aw = len(taps_h), len(taps_w)
            # gp[t + ah - 1 - i] = g[t - i]: zeros before, cut or zero-fill to th + ah - 1 rows.
            gp = lax.pad(
                g,
                jnp.zeros((), g.dtype),
                ((0, 0, 0), (ah - 1, th - ho, 0), (aw - 1, tw - wo, 0), (0, 0, 0)),
            )
            z = None
            for i, a in enumerate(taps_h):
                for j, b in enumerate(taps_w):
                    window = lax.slice(
                        gp,
                        (0, ah - 1 - i, aw - 1 - j, 0),
                        (gp.shape[0], ah - 1 - i + th, aw - 1 - j + tw, gp.shape[3]),
                    )
                    term = window * kernel[a, b, 0]
                    z = term if z is None else z + term
            row.append(jnp.zeros((g.shape[0], th, tw, g.shape[3]), g.dtype) if z is None else z)
        phases.append(jnp.stack(row, axis=3))  # (n, th, tw, sw, c)
    d = jnp.stack(phases, axis=2)  # (n, th, sh, tw, sw, c): d[s*t + r] = phase r at t
    d = d.reshape(g.shape[0], th * sh, tw * sw, g.shape[3])
    return d[:, lo_h : lo_h + h, lo_w : lo_w + w]


def _sum_many(arrays, axes):
    """One variadic reduce: XLA:CPU emits a single loop over the inputs for all outputs."""
    zero = jnp.zeros((), arrays[0].dtype)
    return lax.reduce(
        tuple(arrays),
        (zero,) * len(arrays),
        lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)),
        axes,
    )


def depthwise_conv(x, kernel, strides=1, padding: Padding = "SAME"):
    """y[n, i, j, c] = sum_{a, b} xpad[n, i*s + a, j*s + b, c] * kernel[a, b, 0, c].

    x: (N, H, W, C); kernel: (kh, kw, 1, C); strides: int or (sh, sw); padding: 'SAME' (TF's
    rule, extra pixel after), 'VALID', an int (symmetric, as torch) or ((lo, hi), (lo, hi)).
    Equals `lax.conv_general_dilated(x, kernel, strides, padding, feature_group_count=C)`.
    """
    strides, pads, _ = _geometry(x.shape, kernel.shape, strides, padding)
    return _depthwise(x, kernel, strides, tuple(pads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, strides, pads):
    return _depthwise_fwd(x, kernel, strides, pads)[0]


def _depthwise_fwd(x, kernel, strides, pads):
    _, _, out_hw = _geometry(x.shape, kernel.shape, strides, pads)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    # The padded input is the residual: the backward pass reads the same windows, and x itself
    # need not be kept (it is usually a BatchNorm + ReLU6 output nothing else reads).
    return _forward(xp, kernel, strides, out_hw), (xp, kernel)


def _depthwise_bwd(strides, pads, res, g):
    xp, kernel = res
    (lo_h, hi_h), (lo_w, hi_w) = pads
    x_shape = (xp.shape[0], xp.shape[1] - lo_h - hi_h, xp.shape[2] - lo_w - hi_w, xp.shape[3])
    dx = _input_grad(g, kernel, strides, pads, x_shape)
    # The kernel gradient sums window * g over (n, h, w) for each tap. Summed per tap, XLA
    # materialises every window and reduces it column-wise (slow); one variadic reduce over h
    # alone reads each input once, and the small (n, w, c) partials are summed after.
    out_hw = g.shape[1:3]
    partial_sums = _sum_many([w * g for w in _windows(xp, kernel.shape, strides, out_hw)], (1,))
    dk = jnp.stack([p.sum(axis=(0, 1)) for p in partial_sums]).reshape(kernel.shape)
    return dx, dk.astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def grouped_conv(x, kernel, strides=1, padding: Padding = "SAME"):
    """The same depthwise convolution through XLA's grouped convolution (the slow reference)."""
    kh, kw, _, c = kernel.shape
    sh, sw = (strides, strides) if isinstance(strides, int) else tuple(strides)
    pads = _pairs(padding, x.shape[1:3], (kh, kw), (sh, sw))
    return lax.conv_general_dilated(
        x,
        kernel,
        (sh, sw),
        pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
    )


class DepthwiseConv(nn.Module):
    """A depthwise convolution (no bias) with parameter `kernel` of shape (kh, kw, 1, C).

    `impl`: 'shifted' (k*k multiply-adds, fast on CPU) or 'grouped' (XLA's grouped convolution).
    """

    kernel_size: tuple[int, int]
    strides: int = 1
    padding: Padding = "SAME"
    impl: str = "shifted"
    kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (kh, kw, 1, x.shape[-1]), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.impl == "shifted":
            return depthwise_conv(x, kernel, self.strides, self.padding)
        if self.impl == "grouped":
            return grouped_conv(x, kernel, self.strides, self.padding)
        raise ValueError(f"unknown depthwise impl {self.impl!r}: use 'shifted' or 'grouped'")


def _matmul_channels(x, w):
    """(..., C_in) @ (C_in, C_out) as one 2D matrix product."""
    return jnp.dot(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


@jax.custom_vjp
def pointwise_conv(x, kernel):
    """A 1x1 convolution, x (..., C_in), kernel (1, 1, C_in, C_out), as 2D matrix products.

    Autodiff of the 4D product contracts over (n, h, w) at once, which XLA:CPU answers with a
    transposed copy of the activations; here the weight gradient is x2d^T @ g2d, as BLAS does.
    """
    return _matmul_channels(x, kernel[0, 0])


def _pointwise_fwd(x, kernel):
    return pointwise_conv(x, kernel), (x, kernel)


def _pointwise_bwd(res, g):
    x, kernel = res
    w = kernel[0, 0]
    dx = _matmul_channels(g, w.T)
    g2 = g.reshape(-1, g.shape[-1])
    dw = lax.dot_general(x.reshape(-1, x.shape[-1]), g2, (((0,), (0,)), ((), ())))
    return dx.astype(x.dtype), dw.reshape(kernel.shape).astype(kernel.dtype)


pointwise_conv.defvjp(_pointwise_fwd, _pointwise_bwd)


class PointwiseConv(nn.Module):
    """A 1x1 convolution (no bias) computed by `pointwise_conv` (matrix products).

    Same parameter as `nn.Conv(features, (1, 1), use_bias=False)`: `kernel` (1, 1, C_in, C_out).
    XLA:CPU runs a 1x1 convolution's backward pass as convolutions or dots with transposed
    copies, several times slower than the equivalent 2D matrix products.
    """

    features: int
    kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), self.param_dtype
        )
        return pointwise_conv(x.astype(self.dtype), kernel.astype(self.dtype))
