"""Classify images with a pretrained backbone: one JSON line per image.

    python -m tlx.predict --backbone=mobilenet_v2 chelsea.png coffee.png
    {"image": "chelsea.png", "top5": [[285, 0.71], [282, 0.15], ...]}

Weights come from `tlx.convert.load_pretrained` (or --weights=FILE: a PyTorch .pth, or an .npz
tree as tlx caches them); preprocessing is torchvision's (shorter side to image_size / 0.875,
center crop) with the normalisation the weights were trained with.
"""

import argparse
import json
import os
import sys

import jax
import numpy as np

from tlx import compiler, imagenet, models
from tlx.convert import pretrained


def load_variables(backbone: str, source: str = "imagenet", weights: str = "") -> dict:
    if weights.endswith(".npz"):
        variables, _ = pretrained.load_tree(weights)
        return variables
    return pretrained.load_pretrained(backbone, source, weights_path=weights)


def predict(
    backbone: str,
    images,
    variables: dict,
    image_size: int = 224,
    normalization: str = "imagenet",
    crop_fraction: float = imagenet.CROP_FRACTION,
    topk: int = 5,
) -> list[list[tuple[int, float]]]:
    """The top-k (class id, probability) of each image (paths, PIL images or uint8 arrays)."""
    num_classes = variables["params"]["head"]["kernel"].shape[-1]
    model = models.build(backbone, num_classes)
    x = np.stack(
        [imagenet.preprocess(im, image_size, normalization, crop_fraction) for im in images]
    )
    forward = compiler.jit(lambda v, x: model.apply(v, x, train=False))
    probs = np.asarray(jax.nn.softmax(forward(variables, x), axis=-1))
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :topk]
    return [[(int(c), float(p[c])) for c in row] for row, p in zip(top, probs, strict=True)]


def one_line(message: str) -> str:
    """A multi-line message (`tlx.convert`'s "looked for ... in\n  PATH\nTo get the file:\n  ...")
    as one line: a line that starts with a capital starts a sentence."""
    out = ""
    for line in (line.strip() for line in message.splitlines()):
        if line and out:
            out += ". " if line[0].isupper() and not out.endswith((":", ".")) else " "
        out += line
    return out


def unreadable(path: str) -> str:
    """Why `path` is not an image Pillow can read ('' when it is one)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        return "no such file"
    if os.path.isdir(path):
        return "a directory, not an image file"
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # SyntaxError: PIL's bad PNGs
        return f"not an image Pillow can read ({e})"
    return ""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tlx.predict", description=__doc__.split("\n")[0]
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--backbone", required=True, choices=sorted(models.MODELS))
    parser.add_argument("--source", default="imagenet", help="pretrained source name")
    parser.add_argument("--weights", default="", help="a .pth to convert or an .npz tlx tree")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument(
        "--crop_fraction",
        type=float,
        default=imagenet.CROP_FRACTION,
        help="center crop / resized shorter side (torchvision: 224/256)",
    )
    parser.add_argument(
        "--normalization",
        default="",
        choices=["", *imagenet.NORMALIZATION],
        help="default: what the pretrained weights expect",
    )
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--names", action="store_true", help="add the class names to each line")
    args = parser.parse_args(argv)
    for path in args.images:  # before the weights: a typo should not wait for a conversion
        problem = unreadable(path)
        if problem:
            parser.exit(1, f"tlx.predict: {path}: {problem}\n")
    try:
        variables = load_variables(args.backbone, args.source, args.weights)
        norm = args.normalization or pretrained.normalization(args.backbone, args.source)
    except (FileNotFoundError, ValueError) as e:  # no weights for this backbone, or none found
        parser.exit(1, f"tlx.predict: {one_line(str(e))}\n")
    names = imagenet.class_names() if args.names else None
    for start in range(0, len(args.images), args.batch_size):
        batch = args.images[start : start + args.batch_size]
        results = predict(
            args.backbone, batch, variables, args.image_size, norm, args.crop_fraction, args.topk
        )
        for path, top in zip(batch, results, strict=True):
            line = {"image": path, "top5": [[c, round(p, 6)] for c, p in top]}
            if names is not None:
                line["names"] = [names[c] for c, _ in top]
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
