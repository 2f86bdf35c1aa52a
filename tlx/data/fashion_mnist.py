"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, arXiv:1708.07747; MIT): 70000 28x28 grey images
of 10 kinds of clothing, as a TFDS builder over the four idx files that `make fashion-mnist`
unpacks from Debian's ``dataset-fashion-mnist`` package.

The files live in ``DATA_DIR/downloads/manual/fashion_mnist/`` (TFDS' place for files a user
fetches by hand; DATA_DIR is ``$TLX_DATA_DIR``, else ``~/.cache/tlx/tensorflow_datasets``). They
are read with numpy (gzip + the idx header, no TensorFlow) and checked before anything is built:
the sha256 of each file's decompressed bytes, then 60000 train and 10000 test images of 28x28 with
exactly 6000 (train) and 1000 (test) per class. Anything else is refused with one line. The splits
are the dataset's own: its train set (the pipeline carves the validation split from it, as for
every dataset) and its test set.

    python -m tlx.data.fashion_mnist where           # the directory the files go to
    python -m tlx.data.fashion_mnist install SRC     # check SRC's four files, copy them there
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sys
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from tlx.data import builders

MAKE_TARGET = "make fashion-mnist"
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SHAPE = (28, 28, 1)
# split -> (images file, labels file), as zalandoresearch/fashion-mnist names them.
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# sha256 of each file's decompressed idx bytes, measured on Debian's dataset-fashion-mnist
# 0.0~git20200523.55506a9-1 (the content, not the gzip stream: a re-compressed copy of the same
# files passes).
SHA256 = {
    "train-images-idx3-ubyte.gz": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
    ),
    "train-labels-idx1-ubyte.gz": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
    ),
}
# split -> examples per class (10 classes): 60000 train, 10000 test.
PER_CLASS = {"train": 6000, "test": 1000}
STAMP = ".complete"  # written by `install` once the four files are checked and in place
_IDX_UBYTE = 0x08  # the idx type code of unsigned bytes (the third byte of the magic number)


def files_dir(data_dir: str | None = None) -> str:
    """Where the four idx files are read from: ``DATA_DIR/downloads/manual/fashion_mnist``."""
    return os.path.join(
        data_dir or builders.default_data_dir(), "downloads", "manual", "fashion_mnist"
    )


def missing_files(where: str) -> list[str]:
    """The names of the four files that are not in ``where``."""
    return [
        f for pair in FILES.values() for f in pair if not os.path.isfile(os.path.join(where, f))
    ]


def check_present(where: str) -> None:
    """A one-line `builders.DatasetNotPreparedError` naming the make target if a file is missing."""
    missing = missing_files(where)
    if missing:
        raise builders.DatasetNotPreparedError(
            f"fashion_mnist: {len(missing)} of its 4 idx files missing in {where} "
            f"({', '.join(missing)}): run `{MAKE_TARGET}` (Debian's dataset-fashion-mnist, 31 MB)"
        )


def read_idx(path: str, ndim: int) -> np.ndarray:
    """The uint8 array of a gzipped idx file with ``ndim`` dimensions (LeCun's MNIST format: a
    big-endian magic ``0x0000 08 ndim``, ``ndim`` big-endian int32 sizes, then the bytes), after
    checking the sha256 of its decompressed bytes against `SHA256`."""
    name = os.path.basename(path)
    with gzip.open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    expected = SHA256.get(name, "")
    if digest != expected:
        raise ValueError(
            f"fashion_mnist: {path} has sha256 {digest[:16]}..., not Fashion-MNIST's "
            f"{expected[:16]}...: delete {os.path.dirname(path)} and run `{MAKE_TARGET}`"
        )
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:2] != b"\0\0" or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise ValueError(f"fashion_mnist: {path} is not a {ndim}-d uint8 idx file")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">i4", ndim, 4))
    if len(raw) - header != int(np.prod(shape)):
        raise ValueError(
            f"fashion_mnist: {path} holds {len(raw) - header} bytes after its header, not "
            f"{int(np.prod(shape))} for shape {shape}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def read_split(where: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28, 1], labels int64 [N]) of ``split`` ('train' | 'test'), checked:
    the files' sha256, then N = 10 x `PER_CLASS` and exactly `PER_CLASS` examples of each class."""
    check_present(where)
    image_file, label_file = (os.path.join(where, f) for f in FILES[split])
    images = read_idx(image_file, 3)
    labels = read_idx(label_file, 1).astype(np.int64)
    n = len(CLASSES) * PER_CLASS[split]
    if images.shape != (n, *IMAGE_SHAPE[:2]) or labels.shape != (n,):
        raise ValueError(
            f"fashion_mnist: {split} has images {images.shape} and labels {labels.shape}, "
            f"expected ({n}, 28, 28) and ({n},)"
        )
    counts = np.bincount(labels, minlength=len(CLASSES))
    if len(counts) != len(CLASSES) or (counts != PER_CLASS[split]).any():
        raise ValueError(
            f"fashion_mnist: {split} has {counts.tolist()} examples per label, expected "
            f"{PER_CLASS[split]} for each of labels 0..{len(CLASSES) - 1}"
        )
    return images[..., None], labels


class FashionMnist(builders.PackagedBuilder, skip_registration=True):
    """Fashion-MNIST (Xiao et al. 2017): 60000 train and 10000 test 28x28 grey images, 10
    classes of clothing (6000 and 1000 each), from the idx files `make fashion-mnist` installs.

    Its own train and test splits, in file order.
    """

    # Not registered with tfds: its catalog has a `fashion_mnist` (built with TensorFlow from a
    # download); this one reads local files, so the name is set here rather than registered.
    name = "fashion_mnist"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        info = self.make_info(
            IMAGE_SHAPE,
            len(CLASSES),
            type(self).__doc__,
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )
        info.features["label"].names = list(CLASSES)
        return info

    def _split_generators(self, dl_manager):
        del dl_manager  # the files are local: `make fashion-mnist`
        where = files_dir(os.fspath(self.data_dir_root))
        # Read and checked now, so bad files fail before anything is written.
        splits = {split: read_split(where, split) for split in FILES}
        return {split: self._generate_examples(*arrays) for split, arrays in splits.items()}

    def _generate_examples(self, images, labels):
        for i in range(len(labels)):
            yield i, {"image": images[i], "label": int(labels[i])}


def prepare(data_dir: str) -> tfds.core.DatasetBuilder:
    """The built `FashionMnist` under ``data_dir``: built once from the idx files under
    `files_dir` (a one-line error naming `MAKE_TARGET` where they are missing)."""
    built = epath.Path(data_dir) / FashionMnist.name / str(FashionMnist.VERSION)
    if not (built / "dataset_info.json").exists():
        check_present(files_dir(data_dir))
    return builders.prepare(FashionMnist, data_dir)


def install(source: str, data_dir: str | None = None) -> str:
    """Check the four files in ``source`` (sha256, sizes, classes: `read_split`), copy them to
    `files_dir` and write its `STAMP`; returns that directory. What `make fashion-mnist` runs."""
    for split in FILES:
        read_split(source, split)
    where = files_dir(data_dir)
    os.makedirs(where, exist_ok=True)
    for name in SHA256:
        # Copied beside the target and renamed: an interrupted install leaves no half file.
        fd, tmp = tempfile.mkstemp(dir=where, prefix=f".{name}.")
        os.close(fd)
        shutil.copyfile(os.path.join(source, name), tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the data from other users
        os.replace(tmp, os.path.join(where, name))
    with open(os.path.join(where, STAMP), "w") as f:
        f.write("".join(f"{SHA256[n]}  {n}\n" for n in SHA256))
    return where


def main(argv: list[str]) -> int:
    if argv == ["where"]:
        print(files_dir())
        return 0
    if len(argv) == 2 and argv[0] == "install":
        try:
            print(f"fashion_mnist: checked and installed in {install(argv[1])}")
        except (ValueError, FileNotFoundError) as e:
            print(e, file=sys.stderr)
            return 1
        return 0
    print("usage: python -m tlx.data.fashion_mnist where | install SRC_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
