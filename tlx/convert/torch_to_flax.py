"""PyTorch state dicts -> tlx variables (`params` + `batch_stats`): one explicit name map a family.

A map is a list of `Entry(source, target, kind)`: the torch tensor name, the '/'-joined tlx path
(with its collection) and how to lay the tensor out. `convert` applies a map strictly: every
source tensor used exactly once (BatchNorm's `num_batches_tracked` is consumed), every target leaf
filled, every shape equal to the model's (`jax.eval_shape` of its init); anything else raises a
`ConversionError` that lists the names.
"""

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tlx import models

# How a torch tensor becomes a flax leaf.
LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    # Conv2d (O, I, kh, kw) -> (kh, kw, I, O); a depthwise (C, 1, kh, kw) -> (kh, kw, 1, C).
    "conv": lambda w: np.transpose(w, (2, 3, 1, 0)),
    # Linear (O, I) -> Dense (I, O).
    "linear": lambda w: np.transpose(w, (1, 0)),
    "copy": lambda w: w,
}

# torch BatchNorm2d tensor -> (collection, flax leaf).
BN_LEAVES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    source: str  # torch state-dict name, e.g. 'features.1.conv.0.0.weight'
    target: str  # collection + path, e.g. 'params/stem/block0/depthwise_conv/kernel'
    kind: str  # a key of LAYOUTS


class ConversionError(ValueError):
    """A state dict that does not fit the model; the lists say exactly where."""

    def __init__(self, backbone, unused=(), missing=(), unfilled=(), shapes=(), duplicates=()):
        self.unused, self.missing, self.unfilled = list(unused), list(missing), list(unfilled)
        self.shapes, self.duplicates = list(shapes), list(duplicates)
        parts = [f"the state dict does not fit tlx's {backbone!r} (strict conversion):"]
        for title, items in (
            ("source tensors the map does not use", self.unused),
            ("source tensors the map needs but the file lacks", self.missing),
            ("model leaves no source tensor fills", self.unfilled),
            ("shape mismatches (source -> target: converted vs expected)", self.shapes),
            ("source tensors mapped more than once", self.duplicates),
        ):
            if items:
                shown = "\n    ".join(map(str, items[:40]))
                more = f"\n    ... and {len(items) - 40} more" if len(items) > 40 else ""
                parts.append(f"  {len(items)} {title}:\n    {shown}{more}")
        super().__init__("\n".join(parts))


def _conv(source, target):
    return [Entry(f"{source}.weight", f"params/{target}/kernel", "conv")]


def _bn(source, target):
    return [
        Entry(f"{source}.{t}", f"{col}/{target}/{leaf}", "copy")
        for t, (col, leaf) in BN_LEAVES.items()
    ]


def _linear(source, target):
    return [
        Entry(f"{source}.weight", f"params/{target}/kernel", "linear"),
        Entry(f"{source}.bias", f"params/{target}/bias", "copy"),
    ]


def _blocks(params) -> list[tuple[str, dict]]:
    """('stage2/block1', subtree) for every block of an inverted-residual net, in network order."""
    stages = ["stem"] + sorted(
        (s for s in params if s.startswith("stage")), key=lambda s: int(s[5:])
    )
    return [
        (f"{stage}/{b}", params[stage][b])
        for stage in stages
        for b in sorted(
            (k for k in params[stage] if k.startswith("block")), key=lambda k: int(k[5:])
        )
    ]


def _last_stage(params) -> str:
    return max((s for s in params if s.startswith("stage")), key=lambda s: int(s[5:]))


def mobilenet_v2_map(params) -> list[Entry]:
    """torchvision `MobileNetV2`: features.0 (stem conv), features.1..17 (blocks; `conv` holds
    [expand ConvBNReLU,] depthwise ConvBNReLU, project Conv2d, BatchNorm), features.18 (1x1 conv),
    classifier.1 (Linear)."""
    entries = _conv("features.0.0", "stem/conv") + _bn("features.0.1", "stem/bn")
    for i, (path, block) in enumerate(_blocks(params), start=1):
        src = f"features.{i}.conv"
        j = 0
        if "expand_conv" in block:
            entries += _conv(f"{src}.0.0", f"{path}/expand_conv") + _bn(
                f"{src}.0.1", f"{path}/expand_bn"
            )
            j = 1
        entries += _conv(f"{src}.{j}.0", f"{path}/depthwise_conv")
        entries += _bn(f"{src}.{j}.1", f"{path}/depthwise_bn")
        entries += _conv(f"{src}.{j + 1}", f"{path}/project_conv")
        entries += _bn(f"{src}.{j + 2}", f"{path}/project_bn")
    n = len(_blocks(params)) + 1
    last = _last_stage(params)
    entries += _conv(f"features.{n}.0", f"{last}/last_conv") + _bn(
        f"features.{n}.1", f"{last}/last_bn"
    )
    return entries + _linear("classifier.1", "head")


def efficientnet_lite_map(params) -> list[Entry]:
    """lukemelas `EfficientNet` (Lite: no SE): _conv_stem/_bn0, _blocks.i.{_expand_conv, _bn0,
    _depthwise_conv, _bn1, _project_conv, _bn2}, _conv_head/_bn1, _fc."""
    entries = _conv("_conv_stem", "stem/conv") + _bn("_bn0", "stem/bn")
    for i, (path, block) in enumerate(_blocks(params)):
        src = f"_blocks.{i}"
        if "expand_conv" in block:
            entries += _conv(f"{src}._expand_conv", f"{path}/expand_conv")
            entries += _bn(f"{src}._bn0", f"{path}/expand_bn")
        entries += _conv(f"{src}._depthwise_conv", f"{path}/depthwise_conv")
        entries += _bn(f"{src}._bn1", f"{path}/depthwise_bn")
        entries += _conv(f"{src}._project_conv", f"{path}/project_conv")
        entries += _bn(f"{src}._bn2", f"{path}/project_bn")
    last = _last_stage(params)
    entries += _conv("_conv_head", f"{last}/last_conv") + _bn("_bn1", f"{last}/last_bn")
    return entries + _linear("_fc", "head")


def resnet_map(params) -> list[Entry]:
    """torchvision `ResNet`: conv1/bn1 (stem), layerK.i.{conv1..3, bn1..3, downsample.0/.1}, fc."""
    entries = _conv("conv1", "stem/conv1") + _bn("bn1", "stem/bn1")
    for stage in sorted((s for s in params if s.startswith("stage")), key=lambda s: int(s[5:])):
        k = int(stage[5:])
        for block in sorted(params[stage], key=lambda b: int(b[5:])):
            src, dst = f"layer{k}.{int(block[5:])}", f"{stage}/{block}"
            for name in sorted(params[stage][block]):
                if name.startswith("conv"):
                    entries += _conv(f"{src}.{name}", f"{dst}/{name}")
                elif name.startswith("bn"):
                    entries += _bn(f"{src}.{name}", f"{dst}/{name}")
            if "downsample_conv" in params[stage][block]:
                entries += _conv(f"{src}.downsample.0", f"{dst}/downsample_conv")
                entries += _bn(f"{src}.downsample.1", f"{dst}/downsample_bn")
    return entries + _linear("fc", "head")


NAME_MAPS: dict[str, Callable[[dict], list[Entry]]] = {
    "mobilenet_v2": mobilenet_v2_map,
    "efficientnet_lite0": efficientnet_lite_map,
    "resnet18": resnet_map,
    "resnet34": resnet_map,
    "resnet50": resnet_map,
}


def target_shapes(backbone: str, num_classes: int = 1000, **model_kwargs) -> dict:
    """`{'params': ..., 'batch_stats': ...}` of ShapeDtypeStructs for the tlx model (no compute)."""
    model = models.build(backbone, num_classes, **model_kwargs)
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32), train=False)
    )


def convert(
    backbone: str, state_dict: Mapping[str, np.ndarray], num_classes: int = 1000, **model_kwargs
) -> dict:
    """Strictly converts a torch state dict (name -> array) for `backbone` into
    `{'params': ..., 'batch_stats': ...}` of float32 numpy arrays. Raises ConversionError."""
    if backbone not in NAME_MAPS:
        raise ValueError(f"no converter for {backbone!r}; available: {sorted(NAME_MAPS)}")
    shapes = target_shapes(backbone, num_classes, **model_kwargs)
    expected = traverse_util.flatten_dict(dict(shapes), sep="/")
    entries = NAME_MAPS[backbone](shapes["params"])

    sources = [e.source for e in entries]
    duplicates = sorted({s for s in sources if sources.count(s) > 1})
    used = set(sources)
    # num_batches_tracked carries no information the flax model keeps: consumed by its BN.
    bn_modules = {e.source.rsplit(".", 1)[0] for e in entries if e.source.endswith(".running_var")}
    consumed = {f"{m}.num_batches_tracked" for m in bn_modules}
    unused = [k for k in state_dict if k not in used and k not in consumed]
    missing = [s for s in sources if s not in state_dict]
    targets = {e.target for e in entries}
    unfilled = [t for t in expected if t not in targets]
    unknown_targets = [e.target for e in entries if e.target not in expected]

    out, mismatched = {}, []
    for e in entries:
        if e.source not in state_dict or e.target not in expected:
            continue
        value = LAYOUTS[e.kind](np.asarray(state_dict[e.source], dtype=np.float32))
        if value.shape != tuple(expected[e.target].shape):
            mismatched.append(
                f"{e.source} -> {e.target}: {value.shape} vs {tuple(expected[e.target].shape)}"
            )
            continue
        out[e.target] = np.ascontiguousarray(value)
    if unused or missing or unfilled or unknown_targets or mismatched or duplicates:
        raise ConversionError(
            backbone,
            unused,
            missing,
            unfilled + [f"(map bug) {t}" for t in unknown_targets],
            mismatched,
            duplicates,
        )
    return traverse_util.unflatten_dict(out, sep="/")


def read_torch_file(path: str) -> dict[str, np.ndarray]:
    """A .pth/.pt state dict as name -> numpy (imports torch; `weights_only`, so no code runs).
    Unwraps the usual {'state_dict': ...} / {'model': ...} checkpoint wrappers."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise ImportError(
            f"reading {path} needs torch, the optional extra: see requirements-pretrained.txt "
            "(.venv/bin/pip install torch==2.13.0)"
        ) from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}
