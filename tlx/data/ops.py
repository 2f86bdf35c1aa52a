"""Preprocessing ops on uint8 images (numpy + Pillow), as big_vision names them, and the one
definition of input normalisation.

Per example: `decode`, `inception_crop` (train), `resize_small` + `central_crop` (eval),
`to_model_format` (centre square + resize: what the in-memory path stores). Per batch:
`pad_crop`, `flip`, `normalize`.
Every op takes and returns uint8 [H, W, C] (or [B, H, W, C]) except `normalize` (-> float32).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

# name -> (mean, std) over RGB in [0, 1]: x -> (x / 255 - mean) / std.
NORMALIZATION = {
    # x / 255 * 2 - 1: [-1, 1], tlx's default for models trained here.
    "unit": ((0.5,) * 3, (0.5,) * 3),
    # torchvision's ImageNet statistics (MobileNetV2, ResNets).
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # (x - 127) / 128 on 0..255: TensorFlow's EfficientNet-Lite (and Inception-style) models.
    "tf_lite": ((127.0 / 255,) * 3, (128.0 / 255,) * 3),
}
_INV_255 = np.float32(1.0 / 255.0)


def normalize(x: np.ndarray, name: str = "unit") -> np.ndarray:
    """uint8 [..., C] -> float32 ``(x / 255 - mean) / std`` (C = 1: the channel-mean statistics).

    ``x / 255`` is computed as ``x * float32(1 / 255)``, and 'unit' as ``* 2 - 1``: the arithmetic
    the training pipeline has always used, so stored runs read bit-identical inputs.
    """
    if name not in NORMALIZATION:
        raise ValueError(f"unknown normalization {name!r}; use one of {list(NORMALIZATION)}")
    x = np.asarray(x).astype(np.float32) * _INV_255
    if name == "unit":
        return x * np.float32(2.0) - np.float32(1.0)
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATION[name])
    if x.shape[-1] == 1:  # grey: the channel average of the statistics
        mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------------
# Per example.


def decode(value) -> Image.Image:
    """A stored image (encoded bytes, or a uint8 array [H, W] / [H, W, C]) as a Pillow image.

    Raises ValueError if the bytes are not an image Pillow can read to the end.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            image = Image.open(io.BytesIO(value))
            image.load()  # decode now: a truncated file fails here, not later
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
            raise ValueError(f"cannot decode image ({len(value)} bytes): {e}") from e
        return image
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(np.ascontiguousarray(array))


def to_array(image: Image.Image, channels: int) -> np.ndarray:
    """Pillow image -> uint8 [H, W, channels]; grey repeated to RGB, RGB to luminance (601)."""
    image = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(image, np.uint8)
    return array.reshape(*array.shape[:2], channels)


def to_model_format(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Any uint8 image [H, W] or [H, W, 1|3|4] -> [size, size, channels] uint8.

    Grey is repeated to RGB and RGB reduced to luminance (ITU-R 601, Pillow's 'L'); a non-square
    image is centre-cropped to a square first; resizing is Pillow bilinear (antialiased when
    shrinking). What the in-memory path stores, and the streaming path's default.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.shape[:2] == (size, size) and (image.ndim == 2) == (channels == 1):
        if image.ndim == 2 or image.shape[-1] == 3:
            return image.reshape(size, size, channels)
    h, w = image.shape[:2]
    if h != w:
        m = min(h, w)
        top, left = (h - m) // 2, (w - m) // 2
        image = image[top : top + m, left : left + m]
    pil = Image.fromarray(np.ascontiguousarray(image)).convert("L" if channels == 1 else "RGB")
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(pil, np.uint8).reshape(size, size, channels)


def inception_crop(
    image: Image.Image,
    rng: np.random.Generator,
    size: int,
    channels: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """A random box of area ``scale`` x the image and aspect ``ratio`` (w/h, log-uniform),
    resized to ``size`` x ``size`` (bilinear); 10 tries, then a central box of the nearest
    allowed aspect (torchvision's RandomResizedCrop; big_vision's `inception_crop` draws from
    tf's `sample_distorted_bounding_box` with the same ranges).
    """
    w, h = image.size
    box = _inception_box(w, h, rng, scale, ratio)
    image = image.convert("L" if channels == 1 else "RGB")
    out = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out, np.uint8).reshape(size, size, channels)


def _inception_box(w, h, rng, scale, ratio) -> tuple[int, int, int, int]:
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return left, top, left + cw, top + ch
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif aspect > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return left, top, left + cw, top + ch


def resize_small(image: Image.Image, smaller_size: int) -> Image.Image:
    """Resize (bilinear, antialiased) so the shorter side is ``smaller_size``, aspect kept."""
    w, h = image.size
    if w <= h:
        size = (smaller_size, max(1, int(round(smaller_size * h / w))))
    else:
        size = (max(1, int(round(smaller_size * w / h))), smaller_size)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)


def central_crop(image: Image.Image, size: int) -> Image.Image:
    """The central ``size`` x ``size`` box (the image must be at least that large)."""
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"central_crop({size}) of a {w}x{h} image")
    top, left = (h - size) // 2, (w - size) // 2
    return image.crop((left, top, left + size, top + size))


# ------------------------------------------------------------------------------------------------
# Per batch.


def pad_crop(x: np.ndarray, offsets: np.ndarray, padding: int) -> np.ndarray:
    """Per-example crops of size H x W from ``x`` [B, H, W, C] zero-padded by ``padding``, at
    ``offsets`` [B, 2] (rows, cols) in 0..2 * padding."""
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    r = offsets[:, 0, None] + np.arange(h)  # [B, H]
    c = offsets[:, 1, None] + np.arange(w)  # [B, W]
    return padded[np.arange(b)[:, None, None], r[:, :, None], c[:, None, :]]


def flip(x: np.ndarray, which: np.ndarray) -> np.ndarray:
    """``x`` [B, H, W, C] with the rows where ``which`` [B] is true mirrored left-right."""
    return np.where(which[:, None, None, None], x[:, :, ::-1], x)
