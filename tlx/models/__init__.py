"""Backbones by name. Every model is a Flax module called as `model.apply(vars, x, train=...)`
whose top-level submodules are `stem`, `stage1`..`stageN`, `head` and which takes the fields
`num_classes`, `frozen_bn` (stages that run BatchNorm on running statistics) and `axis_name`.

Freeze depth is one axis for every backbone: depth k in 0..S freezes the stem and stage1..k
(0: nothing, S: every stage, the linear probe); `stage_names` lists a backbone's stages.
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


def stage_names(name: str, **kwargs) -> tuple[str, ...]:
    """The stages of backbone `name` in network order, without the head: ('stem', 'stage1', ..,
    'stageS'); S = `max_depth`. ResNets: one per block group; MobileNetV2 and EfficientNet-Lite:
    one per resolution (1/4..1/32); ViTs: `num_stages` groups of encoder blocks."""
    model = build(name, 2, **kwargs)
    if isinstance(model, resnet.ResNet):
        s = len(model.stage_sizes)
    elif isinstance(model, mobilenet_v2.InvertedResidualNet):
        s = len(model.stages) - 1  # stages[0] is the stem's rows
    elif isinstance(model, vit.ViT):
        s = model.num_stages
    else:  # pragma: no cover - every entry of MODELS is one of the above
        raise TypeError(f"{name}: no stage list for {type(model).__name__}")
    return ("stem", *(f"stage{k}" for k in range(1, s + 1)))


def max_depth(name: str, **kwargs) -> int:
    """S: the freeze depth that freezes every stage of backbone `name` (a linear probe)."""
    return len(stage_names(name, **kwargs)) - 1


def frozen_at_depth(stages, depth: int) -> list[str]:
    """The stages freeze depth `depth` freezes: [] for 0, else the stem and stage1..depth."""
    if not 0 <= depth <= len(stages) - 1:
        raise ValueError(
            f"freeze depth {depth} is out of range: this backbone has stages stem, "
            f"stage1..stage{len(stages) - 1}; use 0..{len(stages) - 1}"
        )
    return list(stages[: depth + 1]) if depth else []


def depth_of(stages, frozen) -> int:
    """The freeze depth of a run whose frozen stages are `frozen`: the largest k whose stages
    (`frozen_at_depth`) are all frozen."""
    k = 0
    while k < len(stages) - 1 and set(stages[: k + 2]) <= set(frozen):
        k += 1
    return k
