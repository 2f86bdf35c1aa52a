"""ImageNet-1k evaluation preprocessing (torchvision's resize + center crop + mean/std) and the
1000 class names, for the pretrained backbones in `tlx.convert.pretrained`.
"""

import ast
import functools
import importlib.util
import os

import numpy as np
from PIL import Image

from tlx.data import ops

# name -> (mean, std) over RGB in [0, 1]: the one definition, shared with the training pipeline.
NORMALIZATION = ops.NORMALIZATION

# torchvision's evaluation crop: resize the shorter side to 256, center-crop 224.
CROP_FRACTION = 224 / 256


def resize_size(image_size: int, crop_fraction: float = CROP_FRACTION) -> int:
    """The shorter-side size to resize to before a center crop of `image_size` (224 -> 256,
    96 -> 110)."""
    return int(round(image_size / crop_fraction))


def to_rgb(image) -> Image.Image:
    """A PIL RGB image from a path, PIL image or uint8 array (grey and RGBA are converted)."""
    if isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return image.convert("RGB")


def center_crop(image: Image.Image, image_size: int, crop_fraction: float = CROP_FRACTION):
    """torchvision's Resize(shorter side) + CenterCrop: bilinear (PIL, antialiased) resize."""
    w, h = image.size
    short = resize_size(image_size, crop_fraction)
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    image = image.resize(size, Image.BILINEAR)
    w, h = image.size
    top = int(round((h - image_size) / 2.0))
    left = int(round((w - image_size) / 2.0))
    return image.crop((left, top, left + image_size, top + image_size))


def normalize(pixels: np.ndarray, normalization: str = "imagenet") -> np.ndarray:
    """uint8 (..., 3) -> float32 (x / 255 - mean) / std (`tlx.data.ops.normalize`)."""
    return ops.normalize(pixels, normalization)


def preprocess(
    image,
    image_size: int = 224,
    normalization: str = "imagenet",
    crop_fraction: float = CROP_FRACTION,
) -> np.ndarray:
    """An image (path, PIL or uint8 array) -> float32 (image_size, image_size, 3), NHWC-ready:
    resize the shorter side to image_size / crop_fraction, center crop, normalise."""
    pixels = np.asarray(center_crop(to_rgb(image), image_size, crop_fraction))
    return normalize(pixels, normalization)


def _tfds_file(*parts) -> str:
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the ImageNet label files come from tensorflow_datasets (requirements.txt)"
        )
    return os.path.join(spec.submodule_search_locations[0], *parts)


@functools.cache
def synsets() -> tuple[str, ...]:
    """The 1000 WordNet ids in class-index order (n01440764 = 0, tench), as TFDS ships them."""
    with open(_tfds_file("datasets", "imagenet2012", "labels.txt")) as f:
        ids = tuple(line.strip() for line in f if line.strip())
    assert len(ids) == 1000, len(ids)
    return ids


@functools.cache
def class_names() -> tuple[str, ...]:
    """The 1000 human-readable class names in index order (285 'Egyptian cat', 967 'espresso').

    Read (not imported, so neither TFDS nor TF loads) from the list TFDS ships in
    `datasets/siscore/labels.py` (IMAGENET_LABELS_LIST)."""
    with open(_tfds_file("datasets", "siscore", "labels.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "IMAGENET_LABELS_LIST" for t in node.targets
        ):
            names = tuple(ast.literal_eval(node.value))
            assert len(names) == 1000, len(names)
            return names
    raise RuntimeError("IMAGENET_LABELS_LIST not found in tensorflow_datasets' siscore labels")
