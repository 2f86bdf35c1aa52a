"""Backbones by name. Every model is a Flax module called as `model.apply(vars, x, train=...)`
whose top-level submodules are `stem`, `stage1`..`stageN`, `head` and which takes the fields
`num_classes`, `frozen_bn` (stages that run BatchNorm on running statistics) and `axis_name`.
"""

import functools

import jax.numpy as jnp

from tlx.models import efficientnet, mobilenet_v2, resnet, vit

MODELS = {
    # About 0.17M parameters: for tests and demos on 2 CPU cores.
    "resnet_tiny": functools.partial(
        resnet.ResNet,
        stage_sizes=(2, 2, 2),
        block=resnet.BasicBlock,
        widths=(16, 32, 64),
        stem_width=16,
        stem="cifar",
    ),
    "resnet18": functools.partial(resnet.ResNet, stage_sizes=(2, 2, 2, 2), block=resnet.BasicBlock),
    "resnet34": functools.partial(resnet.ResNet, stage_sizes=(3, 4, 6, 3), block=resnet.BasicBlock),
    "resnet50": functools.partial(resnet.ResNet, stage_sizes=(3, 4, 6, 3), block=resnet.Bottleneck),
    # ImageNet-pretrained weights convert from PyTorch files: see tlx.convert.
    "mobilenet_v2": mobilenet_v2.mobilenet_v2,
    "efficientnet_lite0": efficientnet.efficientnet_lite0,
    # ViTs in big_vision's layout (tlx.models.vit); weights convert from big_vision/AugReg .npz
    # and timm files (tlx.convert.vit). vit_ti4: ViT-Ti, patch 4, average pooling, for 32 px.
    "vit_ti4": functools.partial(vit.vit, variant="Ti", patch_size=4, pool_type="gap"),
    "vit_ti16": functools.partial(vit.vit, variant="Ti", patch_size=16),
    "vit_s16": functools.partial(vit.vit, variant="S", patch_size=16),
    "vit_b16": functools.partial(vit.vit, variant="B", patch_size=16),
}


def compute_dtype(name: str):
    """config.model.dtype -> the `dtype` field of a backbone (None: its float32 default)."""
    dtypes = {"float32": None, "bfloat16": jnp.bfloat16}
    if name not in dtypes:
        raise ValueError(f"model.dtype={name!r}: use 'float32' or 'bfloat16'")
    return dtypes[name]


def build(name: str, num_classes: int, **kwargs):
    """The backbone `name` with a `num_classes` head; kwargs override module fields (e.g. stem)."""
    if name not in MODELS:
        raise ValueError(f"unknown backbone {name!r}; available: {sorted(MODELS)}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return MODELS[name](num_classes=num_classes, **kwargs)
