"""Backbones by name. Every model is a Flax module called as `model.apply(vars, x, train=...)`
whose top-level submodules are `stem`, `stage1`..`stageN`, `head` and which takes the fields
`num_classes`, `frozen_bn` (stages that run BatchNorm on running statistics) and `axis_name`.
"""

import functools

from tlx.models import efficientnet, mobilenet_v2, resnet

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
}


def build(name: str, num_classes: int, **kwargs):
    """The backbone `name` with a `num_classes` head; kwargs override module fields (e.g. stem)."""
    if name not in MODELS:
        raise ValueError(f"unknown backbone {name!r}; available: {sorted(MODELS)}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return MODELS[name](num_classes=num_classes, **kwargs)
