"""One's own images as a tlx dataset: a folder of class sub-folders, built once into array_record
(no TensorFlow), then read by name like any other dataset.

  python -m tlx.data.folder --src=DIR --name=NAME [--data_dir=DATA_DIR] [--overwrite]
  python -m tlx.main --config=configs/finetune.py:target=NAME,init_from=runs/pre --workdir=...

DIR holds one sub-folder per class (its name is the class name; classes are numbered in sorted
order), each with image files (.jpg, .jpeg, .png, .bmp, .gif, .webp; other files are skipped):

  DIR/cat/1.jpg  DIR/dog/2.png  ...            train; test = a stratified 20% per class
  DIR/test/cat/7.jpg ...                       optional: the test split, as given
  (or DIR/train/CLASS/... beside DIR/test/CLASS/...)

The validation split is carved from train at load time (``data.val_fraction``, stratified, a
fixed seed), as for every other target. Images are stored at their own size as encoded bytes
(JPEG and RGB PNG files as they are, anything else re-encoded as PNG), so the pipeline resizes
them (``data.image_size``) and converts channels (``data.channels``) as for a catalog dataset.

Why not ``tfds.folder_dataset.ImageFolder``: it reads a folder each time through ``as_dataset``
(TensorFlow) and cannot write array_record, which is what tlx reads without TensorFlow.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import sys

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from tlx.data import builders

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLIT_DIRS = ("train", "test")
NAME_PATTERN = r"[a-z][a-z0-9_]*"  # what tfds accepts as a dataset name (snake_case)
VERSION = "1.0.0"


class FolderError(ValueError):
    """An image folder tlx cannot build: the one-line reason names the path and the fix."""


def scan(src: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """(class names, {split: [(file, label), ...]}) of the folder ``src``; 'test' is absent when
    the folder has no test/ sub-folder. Files sorted, so a build is the same on every machine."""
    src = os.path.abspath(os.path.expanduser(src))
    if not os.path.isdir(src):
        raise FolderError(f"--src={src}: no such directory")
    top = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    for name in ("val", "validation"):
        if name in top:
            raise FolderError(
                f"{os.path.join(src, name)}: tlx carves validation from train "
                "(data.val_fraction); move these images into the class folders"
            )
    train_root = os.path.join(src, "train") if "train" in top else src
    train = _classes(train_root, skip=SPLIT_DIRS if train_root == src else ())
    if not train:
        raise FolderError(
            f"{train_root} has no class sub-folders: lay it out as {train_root}/CLASS/IMAGE.jpg"
        )
    classes = sorted(train)
    splits = {"train": _files(train, classes)}
    if "test" in top:
        test = _classes(os.path.join(src, "test"))
        unknown = sorted(set(test) - set(classes))
        if unknown:
            raise FolderError(
                f"{os.path.join(src, 'test')}: classes {unknown} have no training folder; "
                f"the training classes are {classes}"
            )
        splits["test"] = _files(test, classes)
    return classes, splits


def _classes(root: str, skip=()) -> dict[str, list[str]]:
    """{class name: sorted image files} of the class sub-folders of ``root``."""
    out = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith(".") or entry.name in skip:
            continue
        files = sorted(
            os.path.join(dirpath, f)
            for dirpath, _, names in os.walk(entry.path)
            for f in names
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        )
        if not files:
            raise FolderError(
                f"{entry.path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this class folder"
            )
        out[entry.name] = files
    return out


def _files(by_class: dict[str, list[str]], classes: list[str]) -> list[tuple[str, int]]:
    return [(f, classes.index(c)) for c in sorted(by_class) for f in by_class[c]]


def encoded(path: str) -> bytes:
    """The file's bytes if it is a JPEG or an RGB PNG, else its pixels as an RGB PNG (Pillow);
    a file Pillow cannot read is named."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format in ("JPEG", "PNG") and im.mode == "RGB":
                with open(path, "rb") as f:
                    return f.read()
            out = io.BytesIO()
            im.convert("RGB").save(out, format="PNG")
            return out.getvalue()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # SyntaxError: PIL's bad PNGs
        raise FolderError(f"{path}: not an image Pillow can read ({e}); remove it") from None


def builder_class(name: str, src: str) -> type[tfds.core.GeneratorBasedBuilder]:
    """A builder of the folder ``src`` as the dataset ``name`` (not registered in tfds: once
    built, tlx reads it from its files, `tlx.data.pipeline.open_builder`)."""
    classes, splits = scan(src)

    class Folder(builders.PackagedBuilder, skip_registration=True):
        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Image folder {os.path.abspath(src)} (tlx.data.folder)",
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(names=classes),
                    }
                ),
                supervised_keys=("image", "label"),
                disable_shuffling=True,  # record i of a split is the i-th file, as sorted
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            files = splits["train"]
            if "test" in splits:
                return {s: self._generate_examples(splits[s]) for s in ("train", "test")}
            labels = np.array([label for _, label in files])
            kept, taken = builders.stratified_split(
                labels, builders.TEST_FRACTION, builders.TEST_SPLIT_SEED
            )
            return {
                "train": self._generate_examples([files[i] for i in kept]),
                "test": self._generate_examples([files[i] for i in taken]),
            }

        def _generate_examples(self, files):
            for path, label in files:
                yield os.path.relpath(path, src), {"image": encoded(path), "label": label}

    Folder.name = name
    Folder.VERSION = tfds.core.Version(VERSION)
    Folder.RELEASE_NOTES = {VERSION: "Built by tlx.data.folder."}
    Folder.__qualname__ = Folder.__name__ = f"Folder_{name}"
    return Folder


def build(src: str, name: str, data_dir: str = "", overwrite: bool = False) -> str:
    """Builds the image folder ``src`` as dataset ``name`` under ``data_dir`` ($TLX_DATA_DIR,
    else ~/.cache/tlx/tensorflow_datasets); returns the dataset's directory. An existing build
    of ``name`` is kept (returned as it is) unless ``overwrite``."""
    from tlx.data import pipeline

    if not re.fullmatch(NAME_PATTERN, name):
        raise FolderError(f"--name={name!r}: use lower case letters, digits and _ (e.g. my_photos)")
    if name in pipeline.BUILTIN:
        raise FolderError(f"--name={name!r} is one of tlx's own datasets: choose another name")
    data_dir = os.path.expanduser(data_dir) if data_dir else builders.default_data_dir()
    target = os.path.join(data_dir, name, VERSION)
    cls = builder_class(name, src)  # scans first: a bad folder fails before anything is removed
    if overwrite and os.path.isdir(os.path.join(data_dir, name)):
        shutil.rmtree(os.path.join(data_dir, name))
    builder = builders.prepare(cls, data_dir)
    assert epath.Path(target).exists(), target
    del builder
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tlx.data.folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--src", required=True, help="the image folder: DIR/CLASS/IMAGE")
    ap.add_argument("--name", required=True, help="the dataset's name: target=NAME reads it")
    ap.add_argument("--data_dir", default="", help="default: $TLX_DATA_DIR, else ~/.cache/tlx/...")
    ap.add_argument("--overwrite", action="store_true", help="rebuild an existing NAME")
    a = ap.parse_args(argv)
    data_dir = os.path.expanduser(a.data_dir) if a.data_dir else builders.default_data_dir()
    existing = os.path.join(data_dir, a.name, VERSION, "dataset_info.json")
    if os.path.exists(existing) and not a.overwrite:
        print(
            f"tlx.data.folder: {a.name!r} is built already under {data_dir} (--overwrite rebuilds "
            f"it from {a.src}); use target={a.name}"
        )
        return 0
    try:
        path = build(a.src, a.name, data_dir, a.overwrite)
    except FolderError as e:
        print(f"tlx.data.folder: {e}", file=sys.stderr)
        return 1
    info = tfds.core.read_only_builder.builder_from_files(a.name, data_dir=data_dir).info
    sizes = ", ".join(f"{s} {info.splits[s].num_examples}" for s in sorted(info.splits))
    print(
        f"tlx.data.folder: built {a.name!r} ({info.features['label'].num_classes} classes; "
        f"{sizes}) in {path}; use target={a.name}"
        + (f" --config.data.data_dir={data_dir}" if a.data_dir else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
