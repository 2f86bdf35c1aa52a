"""MobileNetV2 (Sandler et al. 2018) in torchvision's layout, with tlx's stage names.

`InvertedResidualNet` is the network family (MobileNetV2, EfficientNet-Lite): stem convolution,
inverted-residual blocks, a last 1x1 convolution, average pooling, classifier. Stages split where
the resolution halves, so `stageK` works at 1/2^(K+1) of the input as in tlx's ResNets: `stem`
(conv + first block, 1/2), `stage1`..`stage4`; the last 1x1 convolution sits in the last stage so
that `head` is the classifier alone (a linear probe trains only it).
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlx.models.depthwise import DepthwiseConv, PointwiseConv

# torchvision: kaiming_normal(mode='fan_out') for convolutions, N(0, 0.01) for the classifier.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
head_init = nn.initializers.normal(0.01)

# (expand ratio t, output channels c, repeats n, stride s) as in the paper's Table 2, grouped
# into tlx stages by resolution: stem, stage1..stage4.
MOBILENET_V2_STAGES = (
    ((1, 16, 1, 1),),
    ((6, 24, 2, 2),),
    ((6, 32, 3, 2),),
    ((6, 64, 4, 2), (6, 96, 3, 1)),
    ((6, 160, 3, 2), (6, 320, 1, 1)),
)

# A block row: (expand ratio, output channels, repeats, stride of the first, kernel size).
Row = tuple[int, int, int, int, int]


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's `_make_divisible`: round to a multiple of `divisor`, losing at most 10%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class BatchNorm(nn.Module):
    """flax's `nn.BatchNorm` (same variables and running-average rule) computed as x * a + b.

    a = scale / sqrt(var + eps), b = bias - mean * a. flax normalises as (x - mean) * a + bias,
    which keeps x - mean as an extra activation-sized buffer for the backward pass.
    """

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean, mean2 = xf.mean(axes), (xf * xf).mean(axes)
            if self.axis_name is not None and not self.is_initializing():
                mean, mean2 = jax.lax.pmean((mean, mean2), self.axis_name)
            var = jnp.maximum(mean2 - mean * mean, 0.0)
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        a = scale * jax.lax.rsqrt(var + self.epsilon)
        b = bias - mean * a
        return (x * a.astype(self.dtype) + b.astype(self.dtype)).astype(self.dtype)


def relu6(x):
    return jnp.clip(x, 0, 6)


class _ConvBNMixin:
    """Convolution + BatchNorm (+ ReLU6) as the family builds it: `{prefix}conv`, `{prefix}bn`."""

    def conv_bn(self, x, prefix, train, features, k, strides=1, depthwise=False, act=True):
        pad = "SAME" if self.padding == "same" else k // 2
        if depthwise:
            x = DepthwiseConv(
                (k, k),
                strides,
                pad,
                self.depthwise_impl,
                kernel_init=conv_init,
                dtype=self.dtype,
                name=f"{prefix}conv",
            )(x)
        elif k == 1 and strides == 1 and self.depthwise_impl != "grouped":
            x = PointwiseConv(features, conv_init, self.dtype, name=f"{prefix}conv")(x)
        else:
            x = nn.Conv(
                features,
                (k, k),
                (strides, strides),
                padding=pad,
                use_bias=False,
                kernel_init=conv_init,
                dtype=self.dtype,
                name=f"{prefix}conv",
            )(x)
        x = BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_eps,
            axis_name=self.axis_name,
            dtype=self.dtype,
            name=f"{prefix}bn",
        )(x)
        return relu6(x) if act else x


class InvertedResidual(_ConvBNMixin, nn.Module):
    """Expand (1x1) -> depthwise (kxk, stride) -> project (1x1, linear), identity skip when the
    shape is kept: MobileNetV2's block, and EfficientNet-Lite's MBConv (which has no SE).

    `padding`: 'torch' (symmetric k//2) or 'same' (TensorFlow's SAME, extra pixel after).
    """

    features: int
    strides: int
    expand_ratio: int
    kernel_size: int = 3
    padding: str = "torch"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    depthwise_impl: str = "shifted"
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        in_features = x.shape[-1]
        y = x
        if self.expand_ratio != 1:
            y = self.conv_bn(y, "expand_", train, in_features * self.expand_ratio, 1)
        y = self.conv_bn(
            y, "depthwise_", train, None, self.kernel_size, self.strides, depthwise=True
        )
        y = self.conv_bn(y, "project_", train, self.features, 1, act=False)
        if self.strides == 1 and in_features == self.features:
            y = x + y
        return y


class Stage(_ConvBNMixin, nn.Module):
    """Blocks `block0`..; the stem stage starts with `conv`/`bn`, the last ends with
    `last_conv`/`last_bn`."""

    rows: Sequence[Row]
    stem_features: int = 0  # > 0: this stage starts with a 3x3/2 convolution
    last_features: int = 0  # > 0: this stage ends with a 1x1 convolution
    padding: str = "torch"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    depthwise_impl: str = "shifted"
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        if self.stem_features:
            x = self.conv_bn(x, "", train, self.stem_features, 3, 2)
        block = functools.partial(
            InvertedResidual,
            padding=self.padding,
            bn_eps=self.bn_eps,
            bn_momentum=self.bn_momentum,
            depthwise_impl=self.depthwise_impl,
            axis_name=self.axis_name,
            dtype=self.dtype,
        )
        i = 0
        for t, c, n, s, k in self.rows:
            for j in range(n):
                x = block(c, s if j == 0 else 1, t, k, name=f"block{i}")(x, train)
                i += 1
        if self.last_features:
            x = self.conv_bn(x, "last_", train, self.last_features, 1)
        return x


class InvertedResidualNet(nn.Module):
    """A network of inverted residual blocks with submodules `stem`, `stage1`..`stageN`, `head`.

    `stages[0]` is the stem's rows. `frozen_bn`: top-level stages whose BatchNorm layers always
    use their running statistics. `depthwise_impl`: 'shifted' (fast on CPU) or 'grouped' (XLA's
    grouped convolution); the parameters are the same.
    """

    num_classes: int
    stages: Sequence[Sequence[Row]]
    stem_features: int = 32
    last_features: int = 1280
    padding: str = "torch"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    frozen_bn: Sequence[str] = ()
    axis_name: str | None = None
    depthwise_impl: str = "shifted"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        common = dict(
            padding=self.padding,
            bn_eps=self.bn_eps,
            bn_momentum=self.bn_momentum,
            depthwise_impl=self.depthwise_impl,
            axis_name=self.axis_name,
            dtype=self.dtype,
        )
        last = len(self.stages) - 1
        for i, rows in enumerate(self.stages):
            name = f"stage{i}" if i else "stem"
            x = Stage(
                rows,
                self.stem_features if i == 0 else 0,
                self.last_features if i == last else 0,
                name=name,
                **common,
            )(x, train and name not in self.frozen_bn)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=head_init, dtype=self.dtype, name="head")(
            x
        ).astype(jnp.float32)


def check_stem(backbone: str, kwargs: dict) -> None:
    """These nets have one stem (3x3/2 conv); ResNet's `stem='cifar'` has no equivalent here."""
    stem = kwargs.pop("stem", None)
    if stem not in (None, "", "imagenet"):
        raise ValueError(
            f"{backbone} has a single stem (3x3 stride-2 convolution, as pretrained); stem={stem!r}"
            " applies to ResNets only: leave model.stem empty (or 'imagenet')"
        )


def mobilenet_v2(num_classes: int, width: float = 1.0, **kwargs) -> InvertedResidualNet:
    """torchvision's MobileNetV2 (BN eps 1e-5, torch momentum 0.1) at width multiplier `width`;
    kwargs set other `InvertedResidualNet` fields (frozen_bn, axis_name, depthwise_impl, dtype)."""
    check_stem("mobilenet_v2", kwargs)
    stages = tuple(
        tuple((t, make_divisible(c * width), n, s, 3) for t, c, n, s in rows)
        for rows in MOBILENET_V2_STAGES
    )
    return InvertedResidualNet(
        num_classes,
        stages,
        stem_features=make_divisible(32 * width),
        last_features=make_divisible(1280 * max(1.0, width)),
        padding="torch",
        bn_eps=1e-5,
        bn_momentum=0.9,
        **kwargs,
    )
