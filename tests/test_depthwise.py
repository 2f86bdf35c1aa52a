"""The fast depthwise and pointwise convolutions equal XLA's convolutions, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from tlx.models.depthwise import (
    DepthwiseConv,
    PointwiseConv,
    depthwise_conv,
    grouped_conv,
    pointwise_conv,
)

CASES = [  # (H, W, C, k, stride, padding)
    (9, 9, 5, 3, 1, 1),  # torch's symmetric padding
    (10, 10, 4, 3, 2, 1),  # MobileNetV2's stride-2 block
    (10, 11, 4, 3, 2, "SAME"),  # TF's SAME: the extra pixel after
    (11, 10, 4, 5, 2, "SAME"),  # EfficientNet's 5x5 stride 2
    (8, 8, 3, 5, 1, "SAME"),
    (8, 8, 3, 3, 1, "VALID"),
    (7, 9, 3, 3, (2, 1), ((0, 1), (2, 0))),  # uneven strides and explicit pads
    (6, 6, 2, 1, 2, 0),  # 1x1 taps, stride 2
]


def _data(h, w, c, k, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 1, c)), jnp.float32)
    return x, kernel


@pytest.mark.parametrize("h,w,c,k,stride,padding", CASES)
def test_depthwise_equals_grouped_conv_forward_and_gradients(h, w, c, k, stride, padding):
    x, kernel = _data(h, w, c, k)
    y = depthwise_conv(x, kernel, stride, padding)
    ref = grouped_conv(x, kernel, stride, padding)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=0, atol=5e-6)

    probe = jnp.asarray(np.random.default_rng(1).standard_normal(ref.shape), jnp.float32)

    def loss(fn):
        return lambda x, kernel: jnp.sum(fn(x, kernel, stride, padding) * probe)

    dx, dk = jax.grad(loss(depthwise_conv), argnums=(0, 1))(x, kernel)
    rx, rk = jax.grad(loss(grouped_conv), argnums=(0, 1))(x, kernel)
    np.testing.assert_allclose(dx, rx, rtol=0, atol=5e-6)
    np.testing.assert_allclose(dk, rk, rtol=0, atol=2e-5)  # sums over n*h*w terms


def test_depthwise_matches_grouped_conv_under_jit_and_second_order():
    x, kernel = _data(12, 12, 8, 3)
    f = jax.jit(lambda x, k: jnp.sum(jnp.tanh(depthwise_conv(x, k, 2, "SAME"))))
    g = jax.jit(lambda x, k: jnp.sum(jnp.tanh(grouped_conv(x, k, 2, "SAME"))))
    np.testing.assert_allclose(f(x, kernel), g(x, kernel), rtol=1e-6)
    # Hessian-vector product through the custom backward pass (its ops are differentiable).
    hvp = lambda fn: jax.jvp(jax.grad(fn, argnums=1), (x, kernel), (x, kernel))[1]  # noqa: E731
    np.testing.assert_allclose(hvp(f), hvp(g), rtol=1e-4, atol=1e-4)


def test_depthwise_module_has_flax_grouped_conv_kernel_layout():
    x, _ = _data(8, 8, 6, 3)
    module = DepthwiseConv((3, 3), strides=2, padding=1)
    variables = module.init(jax.random.key(0), x)
    assert variables["params"]["kernel"].shape == (3, 3, 1, 6)
    # The same parameter drives flax's own grouped convolution to the same output.
    flax_conv = jax.tree.map(lambda v: v, variables)
    ref = lax.conv_general_dilated(
        x,
        flax_conv["params"]["kernel"],
        (2, 2),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=6,
    )
    np.testing.assert_allclose(module.apply(variables, x), ref, rtol=0, atol=5e-6)
    grouped = DepthwiseConv((3, 3), strides=2, padding=1, impl="grouped")
    np.testing.assert_allclose(grouped.apply(variables, x), ref, rtol=0, atol=5e-6)


def test_pointwise_conv_equals_1x1_conv_forward_and_gradients():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 4, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((1, 1, 6, 3)), jnp.float32)

    def conv(x, kernel):
        return lax.conv_general_dilated(
            x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    np.testing.assert_allclose(pointwise_conv(x, kernel), conv(x, kernel), atol=5e-6)
    probe = jnp.asarray(rng.standard_normal((2, 5, 4, 3)), jnp.float32)
    got = jax.grad(lambda x, k: jnp.sum(pointwise_conv(x, k) * probe), argnums=(0, 1))(x, kernel)
    ref = jax.grad(lambda x, k: jnp.sum(conv(x, k) * probe), argnums=(0, 1))(x, kernel)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=5e-6)
    variables = PointwiseConv(3).init(jax.random.key(0), x)
    assert variables["params"]["kernel"].shape == (1, 1, 6, 3)
