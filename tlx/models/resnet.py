"""ResNets (He et al. 2016) with tlx's stage names: `stem`, `stage1`..`stageN`, `head`.

Parameter paths follow torchvision's block layout (`stage2/block0/conv1/kernel`,
`.../downsample_conv/kernel`) so converted weights map one to one.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tlx.models.conv import Conv

# torchvision initialises convolutions with kaiming_normal(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(name, train, axis_name, dtype):
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        axis_name=axis_name,
        dtype=dtype,
        name=name,
    )


class BasicBlock(nn.Module):
    features: int
    strides: int = 1
    axis_name: str | None = None
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool):
        conv = lambda f, k, s, name: Conv(  # noqa: E731
            f,
            (k, k),
            s,
            padding=k // 2,
            impl=self.conv,
            kernel_init=conv_init,
            dtype=self.dtype,
            name=name,
        )
        y = conv(self.features, 3, self.strides, "conv1")(x)
        y = nn.relu(batch_norm("bn1", train, self.axis_name, self.dtype)(y))
        y = conv(self.features, 3, 1, "conv2")(y)
        y = batch_norm("bn2", train, self.axis_name, self.dtype)(y)
        if x.shape[-1] != self.features or self.strides != 1:
            x = conv(self.features, 1, self.strides, "downsample_conv")(x)
            x = batch_norm("downsample_bn", train, self.axis_name, self.dtype)(x)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    features: int
    strides: int = 1
    axis_name: str | None = None
    dtype: Any = jnp.float32
    conv: str = "auto"
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        conv = lambda f, k, s, name: Conv(  # noqa: E731
            f,
            (k, k),
            s,
            padding=k // 2,
            impl=self.conv,
            kernel_init=conv_init,
            dtype=self.dtype,
            name=name,
        )
        out = self.features * self.expansion
        y = conv(self.features, 1, 1, "conv1")(x)
        y = nn.relu(batch_norm("bn1", train, self.axis_name, self.dtype)(y))
        # torchvision (ResNet v1.5) puts the stride on the 3x3 convolution.
        y = conv(self.features, 3, self.strides, "conv2")(y)
        y = nn.relu(batch_norm("bn2", train, self.axis_name, self.dtype)(y))
        y = conv(out, 1, 1, "conv3")(y)
        y = batch_norm("bn3", train, self.axis_name, self.dtype)(y)
        if x.shape[-1] != out or self.strides != 1:
            x = conv(out, 1, self.strides, "downsample_conv")(x)
            x = batch_norm("downsample_bn", train, self.axis_name, self.dtype)(x)
        return nn.relu(x + y)


class Stem(nn.Module):
    """'cifar': one 3x3 convolution, stride 1 (small images); 'imagenet': 7x7/2 + 3x3/2 max-pool."""

    width: int
    kind: str = "cifar"
    axis_name: str | None = None
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool):
        if self.kind == "cifar":
            x = Conv(
                self.width,
                (3, 3),
                padding=1,
                impl=self.conv,
                kernel_init=conv_init,
                dtype=self.dtype,
                name="conv1",
            )(x)
        elif self.kind == "imagenet":
            x = Conv(
                self.width,
                (7, 7),
                2,
                padding=3,
                impl=self.conv,
                kernel_init=conv_init,
                dtype=self.dtype,
                name="conv1",
            )(x)
        else:
            raise ValueError(f"unknown stem {self.kind!r}: use 'cifar' or 'imagenet'")
        x = nn.relu(batch_norm("bn1", train, self.axis_name, self.dtype)(x))
        if self.kind == "imagenet":
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        return x


class Stage(nn.Module):
    block: Any
    features: int
    num_blocks: int
    strides: int
    axis_name: str | None = None
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool):
        for i in range(self.num_blocks):
            x = self.block(
                self.features,
                self.strides if i == 0 else 1,
                self.axis_name,
                self.dtype,
                conv=self.conv,
                name=f"block{i}",
            )(x, train)
        return x


class ResNet(nn.Module):
    """A ResNet whose top-level submodules are `stem`, `stage1`..`stageN` and `head`.

    `frozen_bn`: names of top-level stages whose BatchNorm layers always use (and so never
    update) their running statistics, even with `train=True`: how a frozen stage behaves.
    `conv`: 'auto' (tlx.models.conv where it was measured faster: CPU), 'fast' or 'xla'
    (XLA's own convolution); the parameters are the same either way.
    """

    stage_sizes: Sequence[int]
    block: Any
    num_classes: int
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    stem: str = "imagenet"
    frozen_bn: Sequence[str] = ()
    axis_name: str | None = None
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        def stage_train(name):
            return train and name not in self.frozen_bn

        x = Stem(
            self.stem_width, self.stem, self.axis_name, self.dtype, conv=self.conv, name="stem"
        )(x, stage_train("stem"))
        for i, (n, w) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            name = f"stage{i + 1}"
            x = Stage(
                self.block,
                w,
                n,
                1 if i == 0 else 2,
                self.axis_name,
                self.dtype,
                conv=self.conv,
                name=name,
            )(x, stage_train(name))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)
