"""From a prepared TFDS dataset to the batches the train loop consumes.

``load(cfg)`` builds the dataset once if it is one of tlx's own (``fractals``, ``digits``,
``mnist5k``, ``lfw_subset``, ``fashion_mnist``) or finds a TFDS catalog dataset the user prepared
in array_record format; reads every split through ``builder.as_data_source`` (what
``tfds.data_source`` returns, random access, no TensorFlow) with a grain pipeline; resizes and
converts channels **once per split, in memory**; carves a validation split and an optional
per-class subsample from train; and returns a `Dataset`.

Why preprocess once in memory: these datasets are small (the default fractals source is 7500 x
32x32x3 uint8 = 23 MB), so decoding and resizing every image every epoch would spend the 2 CPU
cores, which the train step needs, on identical work. Kept as uint8 at the model's resolution,
augmentation (random crop after zero padding, horizontal flip) and normalisation run vectorised
on whole batches inside grain, whose iterators carry a checkpointable position.

Datasets too large for that (``data.in_memory``: 'auto' decides by size) take the streaming path,
`tlx.data.stream`, with the same interface, examples, order and augmentation draws.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Iterator

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from tlx.data import builders, fashion_mnist, fractals, ops
from tlx.data.ops import to_model_format

PACKAGED = {
    "digits": builders.Digits,
    "mnist5k": builders.Mnist5k,
    "lfw_subset": builders.LfwSubset,
}
BUILTIN = ("fractals", "fractaldb", *PACKAGED, "fashion_mnist")
# The real targets: greyscale images, fed to every backbone through `backbone_input`.
REAL_TARGETS = (*PACKAGED, "fashion_mnist")
VAL_SPLIT_SEED = 1_000_003  # fixed: the val carve never depends on a run's seed
VAL_SUBSET_OFFSET = 7_919  # data.val_examples_per_class draws with subset_seed + this
IMAGENET_MEAN, IMAGENET_STD = (np.array(v, np.float32) for v in ops.NORMALIZATION["imagenet"])
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


DatasetNotPreparedError = builders.DatasetNotPreparedError


# ------------------------------------------------------------------------------------------------
# The dataset.


@dataclasses.dataclass
class Dataset:
    """Preprocessed uint8 splits in memory, and the iterators the train loop uses."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C) after preprocessing
    num_examples: dict[str, int]  # 'train', 'val', 'test'
    normalize: str = "unit"
    crop_padding: int = 4
    flip: bool = True
    data_dir: str = ""
    images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    labels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    # Where each example comes from: 'train' and 'val' index the source's train split, 'test' its
    # test split (or 'validation' for a catalog dataset without a test split).
    indices: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    # Which input path this is and why (`tlx.data.stream.choose_path`), for summary.json.
    input: dict = dataclasses.field(default_factory=lambda: {"path": "memory", "reason": ""})
    fingerprint: str = ""  # of the source as built (`tlx.data.loading.fingerprint`)

    @property
    def augments(self) -> bool:
        """Whether training batches are augmented (so features can't be cached)."""
        return bool(self.crop_padding or self.flip)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "num_examples": dict(self.num_examples),
            "image_shape": list(self.image_shape),
            "data_dir": self.data_dir,
            "input": dict(self.input),
            "fingerprint": self.fingerprint,
        }

    def train_iter(
        self, batch_size: int, seed: int, *, process_index: int = 0, process_count: int = 1
    ) -> grain.DatasetIterator:
        """Infinite shuffled, augmented batches {'image': f32 [B,H,W,C], 'label': i32 [B]}.

        Each epoch is reshuffled and its last incomplete batch dropped. The iterator is
        deterministic for ``seed`` and checkpointable: ``it.get_state()`` is a JSON-serialisable
        dict, and after ``it.set_state(state)`` it yields what an uninterrupted one would.

        ``batch_size`` is global. With ``process_count > 1`` each process gets its contiguous
        ``batch_size // process_count`` rows of every global batch (same order, same augmentation
        as a single process would produce), for ``jax.make_array_from_process_local_data``.
        """
        n = self.num_examples["train"]
        if not 0 < batch_size <= n:
            raise ValueError(
                f"batch_size={batch_size} needs 1..{n} (train examples of {self.name})"
            )
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} not divisible by {process_count} processes")
        positions, augment_seed = shuffled_batches(n, batch_size, seed)
        local = batch_size // process_count
        rows = slice(process_index * local, (process_index + 1) * local)
        ds = positions.random_map(
            functools.partial(self._train_batch, rows=rows), seed=augment_seed
        )
        return iter(ds.to_iter_dataset(_READ_OPTIONS))

    def _train_batch(self, indices: np.ndarray, rng: np.random.Generator, rows: slice) -> dict:
        # Draw the augmentation for the whole global batch, then keep this process's rows.
        b = len(indices)
        p = self.crop_padding
        offsets = rng.integers(0, 2 * p + 1, (b, 2))[rows]
        flips = (rng.random(b) < 0.5)[rows] if self.flip else None
        indices = indices[rows]
        x = self.images["train"][indices]
        if p:
            x = ops.pad_crop(x, offsets, p)
        if flips is not None:
            x = ops.flip(x, flips)
        return {"image": ops.normalize(x, self.normalize), "label": self.labels["train"][indices]}

    def eval_batches(self, split: str, batch_size: int) -> Iterator[dict]:
        """One pass over ``split`` in a fixed order, no augmentation.

        Every batch holds exactly ``batch_size`` rows; the last is padded (zeros, label 0) and
        ``'mask'`` (f32 [B]) is 1 for real rows and 0 for padding.
        """
        if split not in self.images:
            raise ValueError(f"unknown split {split!r}; have {sorted(self.images)}")
        for x, y, mask in padded_batches(self.images[split], self.labels[split], batch_size):
            yield {"image": ops.normalize(x, self.normalize), "label": y, "mask": mask}


def shuffled_batches(n: int, batch_size: int, seed: int) -> tuple[grain.MapDataset, int]:
    """The training order every input path shares (in memory, streaming, cached features): an
    infinite MapDataset of global batches of example indices (a fresh permutation per epoch, the
    remainder dropped), and the seed of the augmentation drawn for them."""
    shuffle_seed, augment_seed = np.random.SeedSequence([seed, 0x71C]).generate_state(2)
    ds = (
        grain.MapDataset.range(n // batch_size)  # one epoch of batch positions
        .repeat()  # infinite; the index seen downstream counts batches since the start
        .map_with_index(
            functools.partial(_batch_indices, n=n, batch_size=batch_size, seed=int(shuffle_seed))
        )
    )
    return ds, int(augment_seed)


def padded_batches(x: np.ndarray, y: np.ndarray, batch_size: int):
    """(x, y, mask) batches of exactly `batch_size` rows in order; the last is padded with zeros
    (label 0) and `mask` (f32) is 1 for real rows, 0 for padding."""
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        real = len(yb)
        mask = np.zeros(batch_size, np.float32)
        mask[:real] = 1.0
        if real < batch_size:
            xb = np.concatenate([xb, np.zeros((batch_size - real, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(batch_size - real, yb.dtype)])
        yield xb, yb, mask


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _batch_indices(step: int, _, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Example indices of global batch ``step``: a fresh permutation per epoch, remainder dropped.

    Hand-written rather than ``MapDataset.shuffle``: grain 0.2.18's per-element index shuffle
    costs ~1/n (0.24 ms per element at n=144, 2.2 ms at n=16, 10 us at n=6750), which would make
    few-shot fine-tuning sets the slowest to read; it also seeds epoch e with seed + e, so one
    run's second epoch would be the next seed's first.
    """
    epoch, position = divmod(step, n // batch_size)
    return _epoch_permutation(n, seed, epoch)[position * batch_size : (position + 1) * batch_size]


# ------------------------------------------------------------------------------------------------
# What a pretrained backbone reads.


def backbone_input(cfg: ml_collections.ConfigDict, normalization: str) -> None:
    """Point the data config ``cfg`` at a pretrained backbone's own preprocessing, the same for
    every target (the real ones, `REAL_TARGETS`, are grey): 3 channels (grey repeated, as
    torchvision's ``Grayscale(num_output_channels=3)``), the centre square resized to
    ``cfg.image_size`` (bilinear, `ops.to_model_format`, on both input paths) and the mean and std
    its weights were trained with, ``normalization`` (a key of `ops.NORMALIZATION`; for tlx's
    ImageNet weights `tlx.convert.pretrained.normalization` says which)."""
    if normalization not in ops.NORMALIZATION:
        raise ValueError(
            f"unknown normalization {normalization!r}; use one of {list(ops.NORMALIZATION)}"
        )
    cfg.channels = 3
    cfg.normalize = normalization


# ------------------------------------------------------------------------------------------------
# Loading.


def resolve_data_dir(cfg: ml_collections.ConfigDict) -> str:
    """``cfg.data_dir`` if set, else ``$TLX_DATA_DIR``, else ~/.cache/tlx/tensorflow_datasets."""
    return os.path.expanduser(cfg.data_dir) if cfg.data_dir else builders.default_data_dir()


def load_in_memory(cfg: ml_collections.ConfigDict, data_dir: str, params: tuple, reason: str):
    """The in-memory `Dataset` of ``cfg`` (`tlx.data.load` chooses the path)."""
    num_classes, splits = _read_splits(
        cfg.name, data_dir, params, int(cfg.image_size), int(cfg.channels)
    )
    (train_x, train_y), test = splits["train"], splits["test"]
    keep, val = carve(train_y, cfg)
    indices = {"train": keep, "val": val, "test": np.arange(len(test[1]))}
    images = {"train": train_x[keep], "val": train_x[val], "test": test[0]}
    labels = {"train": train_y[keep], "val": train_y[val], "test": test[1]}
    return Dataset(
        name=cfg.name,
        num_classes=num_classes,
        image_shape=(int(cfg.image_size), int(cfg.image_size), int(cfg.channels)),
        num_examples={k: len(v) for k, v in labels.items()},
        normalize=cfg.normalize,
        crop_padding=int(cfg.augment.crop_padding),
        flip=bool(cfg.augment.flip),
        data_dir=data_dir,
        images=images,
        labels=labels,
        indices=indices,
        input={"path": "memory", "reason": reason},
    )


def check_config(cfg: ml_collections.ConfigDict) -> None:
    if cfg.normalize not in ops.NORMALIZATION:
        raise ValueError(
            f"data.normalize must be one of {list(ops.NORMALIZATION)}, got {cfg.normalize!r}"
        )
    if cfg.channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 or 3, got {cfg.channels}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")


def builder_params(cfg: ml_collections.ConfigDict) -> tuple:
    """The builder parameters of tlx's procedural sources (``cfg.fractals``, ``cfg.fractaldb``)
    as a hashable tuple; () for every other dataset."""
    if cfg.name in ("fractals", "fractaldb"):
        return tuple(sorted(cfg[cfg.name].to_dict().items()))
    return ()


def carve(train_labels: np.ndarray, cfg: ml_collections.ConfigDict):
    """(kept, val) indices into the source's train split: the stratified val carve with a fixed
    seed, then ``examples_per_class`` of what is left (both paths use this)."""
    keep, val = builders.stratified_split(train_labels, float(cfg.val_fraction), VAL_SPLIT_SEED)
    if cfg.examples_per_class:
        k, seed = int(cfg.examples_per_class), int(cfg.subset_seed)
        keep = per_class_subset(train_labels, keep, k, seed)
    if cfg.get("val_examples_per_class", 0):
        k, seed = int(cfg.val_examples_per_class), int(cfg.subset_seed)
        # Its own stream ([seed, class] draws the train subset): val is not the train pick.
        val = per_class_subset(train_labels, val, k, seed + VAL_SUBSET_OFFSET, "val")
    return keep, val


def per_class_subset(
    labels: np.ndarray, indices: np.ndarray, k: int, seed: int, split: str = "train"
) -> np.ndarray:
    """Exactly ``k`` of ``indices`` per class, sorted; nested in ``k`` for a fixed ``seed``."""
    chosen = []
    for c in np.unique(labels[indices]):
        members = indices[labels[indices] == c]
        if len(members) < k:
            if split == "val":
                raise ValueError(
                    f"data.val_examples_per_class={k} but class {c} has only {len(members)} "
                    "examples in the validation carve; lower it or raise data.val_fraction"
                )
            raise ValueError(
                f"examples_per_class={k} but class {c} has only {len(members)} training examples "
                "left after the validation carve"
            )
        # One stream per class: class c's pick doesn't depend on the other classes.
        chosen.append(np.random.default_rng([seed, int(c)]).permutation(members)[:k])
    return np.sort(np.concatenate(chosen))


def open_builder(name: str, data_dir: str, params: tuple = ()) -> tfds.core.DatasetBuilder:
    """A prepared builder for ``name``: tlx's own (built here on first use) or a catalog one.

    ``params``: `builder_params` (the fields of ``data.fractals`` / ``data.fractaldb``)."""
    if name == "fractals":
        config = fractals.config_for(**dict(params))
        return builders.prepare(fractals.Fractals, data_dir, config)
    if name == "fractaldb":
        from tlx.data import fractaldb

        return fractaldb.prepare(data_dir, **dict(params))
    if name in PACKAGED:
        return builders.prepare(PACKAGED[name], data_dir)
    if name == "fashion_mnist":
        return fashion_mnist.prepare(data_dir)
    return _catalog_builder(name, data_dir)


def _catalog_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    how = (
        f"It is not one of tlx's own datasets ({', '.join(BUILTIN)}), so it must be a TFDS "
        "catalog dataset prepared once in array_record format under the data dir (data.data_dir, "
        "else $TLX_DATA_DIR, else ~/.cache/tlx/tensorflow_datasets). To prepare it (needs "
        f"TensorFlow, once): tfds build {name} --file_format=array_record --data_dir={data_dir}"
    )
    try:
        # From the files alone (dataset_info.json, features.json): no builder code is imported,
        # which for catalog datasets could need TensorFlow.
        builder = tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetNotPreparedError(
            f"Dataset {name!r} is not prepared under {data_dir}. {how}"
        ) from e
    formats = {f.value for f in builder.info.available_file_formats()}
    if "array_record" not in formats:
        raise DatasetNotPreparedError(
            f"Dataset {name!r} under {data_dir} is prepared as {sorted(formats) or 'tfrecord'}, "
            f"which has no random access without TensorFlow. {how}"
        )
    if builder.info.file_format.value != "array_record":  # array_record is an alternative format
        builder = tfds.core.read_only_builder.builder_from_files(
            name, data_dir=data_dir, file_format="array_record"
        )
    return builder


@functools.lru_cache(maxsize=8)
def _read_splits(
    name: str, data_dir: str, params: tuple, image_size: int, channels: int
) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """num_classes and {'train', 'test'}: (uint8 [N, S, S, C], int32 [N]), read-only, cached."""
    builder = open_builder(name, data_dir, params)
    info = builder.info
    image_key, label_key = feature_keys(info)
    num_classes = int(info.features[label_key].num_classes)
    test_split = source_test_split(info)
    out = {}
    for split, source_split in (("train", "train"), ("test", test_split)):
        with builders.quiet():  # e.g. "OpenCV is not installed ... Defaulting to PIL"
            x, y = _read_split(builder, source_split, image_key, label_key, image_size, channels)
        x.flags.writeable = False
        y.flags.writeable = False
        out[split] = (x, y)
    logging.info("tlx.data: %s %s", name, {k: len(v[1]) for k, v in out.items()})
    return num_classes, out


def source_test_split(info: tfds.core.DatasetInfo) -> str:
    """The source split that serves as 'test': 'test', else 'validation'; checks 'train' too."""
    test_split = next((s for s in ("test", "validation") if s in info.splits), None)
    if "train" not in info.splits or test_split is None:
        raise ValueError(
            f"dataset {info.name!r} needs a 'train' split and a 'test' or 'validation' split; "
            f"it has {sorted(info.splits)}"
        )
    return test_split


def feature_keys(info: tfds.core.DatasetInfo) -> tuple[str, str]:
    """(image, label) feature names: the supervised keys, else 'image' and 'label'."""
    keys = tuple(info.supervised_keys or ())
    if len(keys) == 2 and all(isinstance(k, str) for k in keys):
        return keys
    if {"image", "label"} <= set(info.features.keys()):
        return "image", "label"
    raise ValueError(
        f"dataset {info.name!r} has no (image, label) features: {sorted(info.features.keys())}"
    )


def _read_split(builder, split, image_key, label_key, size, channels):
    source = builder.as_data_source(split=split)  # what tfds.data_source returns
    n = len(source)
    x = np.empty((n, size, size, channels), np.uint8)
    y = np.empty(n, np.int32)
    # A plain loop over chunks read with the source's batched `__getitems__`: wrapping it in
    # grain (`MapDataset.source(...)`) reads record by record (grain looks for `_getitems`, tfds
    # has `__getitems__`) and was 1.5x slower; threads don't help since the (pure Python) record
    # parsing holds the GIL.
    for start in range(0, n, 512):
        examples = source.__getitems__(range(start, min(start + 512, n)))
        for i, ex in enumerate(examples, start):
            x[i] = to_model_format(ex[image_key], size, channels)
            y[i] = ex[label_key]
    return x, y
