"""The streaming input path: records read, decoded, augmented and batched per step in grain worker
processes, for datasets that do not fit in memory at the model's resolution.

Same interface as the in-memory `tlx.data.pipeline.Dataset` (``train_iter``, ``eval_batches``,
``describe``), same examples (the val carve and ``examples_per_class`` subsample come from the same
labels through `pipeline.carve`), same order (`pipeline._batch_indices`: a fresh permutation of
the whole train split every epoch) and the same augmentation draws: with the CIFAR-style ops (or
none) both paths yield the same batches value for value. What only this path has: Inception crop
on the source image (big_vision's ``inception_crop``) and ``resize_small`` + ``central_crop`` for
evaluation, which need the image at its stored size.

How it runs: one grain element is one global batch. ``MapDataset.range(steps per epoch)`` repeated,
mapped to the batch's example indices, then to the batch itself (read the records with the source's
batched ``__getitems__``, decode, crop / resize each example, pad-crop, flip, normalise) with
``random_map``, whose generator depends only on the seed and the batch's step. ``mp_prefetch``
spreads the batches over ``data.workers`` processes round-robin. The position is the number of
batches yielded (``{'next_index': k}``, the in-memory iterator's state too); resuming slices the
dataset at k, so a resumed run reads exactly what an uninterrupted one would, whatever the number
of workers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tempfile
from collections.abc import Iterator

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from tlx.data import builders, ops, pipeline

# data.in_memory='auto' keeps a dataset in memory when its decoded train + test splits at the
# model's resolution (uint8) fit in this. The in-memory path holds about twice that (the cached
# source splits and the carved copies). The small targets and the default sources stay in memory
# (fractals at 32 px: 23 MB; CIFAR-100 at 32 px: 176 MiB); fractaldb at 100k images (322 MiB at
# 32 px), ImageNet-size data and anything at 224 px (CIFAR: 8.4 GiB) stream. A fixed budget, not a
# fraction of free RAM, so the choice (and so the run) doesn't depend on the machine's load.
IN_MEMORY_BUDGET_BYTES = 256 * 2**20
_EVAL_PREFETCH = 2  # eval batches read ahead per thread
_WORKER_BUFFER = 2  # train batches read ahead per worker process


class CorruptRecordError(ValueError):
    """A record of a dataset that cannot be read or decoded; the message names it."""


# ------------------------------------------------------------------------------------------------
# Which path.


def choose_path(cfg: ml_collections.ConfigDict, info: tfds.core.DatasetInfo) -> tuple[bool, str]:
    """(in_memory, why) for ``cfg.in_memory`` ('auto' | 'true' | 'false') and the dataset."""
    mode = str(cfg.in_memory).strip().lower()
    if mode not in ("auto", "true", "false"):
        raise ValueError(f"data.in_memory must be 'auto', 'true' or 'false', got {cfg.in_memory!r}")
    needs_source = [
        name
        for name, on in (
            ("augment.inception_crop", bool(cfg.augment.inception_crop)),
            ("eval_crop_fraction", float(cfg.eval_crop_fraction) > 0),
        )
        if on
    ]
    if mode == "true":
        if needs_source:
            raise ValueError(
                f"data.{needs_source[0]} needs the images at their stored size, which only the "
                "streaming path reads; set data.in_memory to 'auto' or 'false'"
            )
        return True, "data.in_memory=true"
    if mode == "false":
        return False, "data.in_memory=false"
    if needs_source:
        return False, f"auto: data.{needs_source[0]} needs the images at their stored size"
    test_split = pipeline.source_test_split(info)
    n = info.splits["train"].num_examples + info.splits[test_split].num_examples
    size = n * int(cfg.image_size) ** 2 * int(cfg.channels)
    budget = IN_MEMORY_BUDGET_BYTES
    verdict = "<=" if size <= budget else ">"
    why = f"auto: decoded train+{test_split} {size / 2**20:.1f} MiB {verdict} {budget / 2**20:.0f}"
    return size <= budget, why + " MiB budget"


# ------------------------------------------------------------------------------------------------
# Reading records (in the worker processes too: everything here is picklable by value).


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the records are: enough to open them again in a worker process."""

    name: str
    data_dir: str
    params: tuple = ()

    def open(self, split: str):
        """(random-access source of ``split``, image key, label key), cached per process."""
        return _open(self.name, self.data_dir, self.params, split)

    def read(self, split: str, indices) -> list[dict]:
        """The records at ``indices`` of ``split``; a record that fails is named."""
        source, _, _ = self.open(split)
        return read_records(source, f"dataset {self.name!r} under {self.data_dir}", split, indices)


def read_records(source, dataset: str, split: str, indices) -> list[dict]:
    """The records at ``indices`` of a random-access ``source``; one that cannot be read (or
    decoded) raises CorruptRecordError naming it ('``dataset``: SPLIT record I cannot be read')."""
    indices = [int(i) for i in indices]
    try:
        return source.__getitems__(indices)
    except Exception:  # find which record; re-raise naming it
        for i in indices:
            try:
                source[i]
            except Exception as e:
                raise CorruptRecordError(
                    f"{dataset}: {split} record {i} cannot be read: {type(e).__name__}: {e}"
                ) from e
        raise


@functools.lru_cache(maxsize=16)
def _open(name: str, data_dir: str, params: tuple, split: str):
    with builders.quiet():
        builder = pipeline.open_builder(name, data_dir, params)
        image_key, label_key = pipeline.feature_keys(builder.info)
        decoders = None
        if isinstance(builder.info.features[image_key], tfds.features.Image):
            # Bytes as stored: decoded here with Pillow (so a bad one is named, and JPEGs can be
            # decoded at reduced size), and not at all when only labels are read.
            decoders = {image_key: tfds.decode.SkipDecoding()}
        source = builder.as_data_source(split=split, decoders=decoders)
    return source, image_key, label_key


@functools.lru_cache(maxsize=16)
def read_labels(source: Source, split: str) -> np.ndarray:
    """Every label of ``split`` (int32, read-only), reading no image.

    Parsing every record takes ~0.1 ms (11.7 s for fractaldb's 110k), so the labels are kept in
    ``DATA_DIR/tlx_labels/`` once read, keyed by the dataset's directory and the time its
    dataset_info.json was written (a rebuilt dataset is read again)."""
    records, _, label_key = source.open(split)
    cache = _labels_path(source, split)
    if cache and os.path.exists(cache):
        labels = np.load(cache)
        if len(labels) == len(records):
            labels.flags.writeable = False
            return labels
    n = len(records)
    labels = np.empty(n, np.int32)
    for start in range(0, n, 1024):
        chunk = source.read(split, range(start, min(start + 1024, n)))
        labels[start : start + len(chunk)] = [ex[label_key] for ex in chunk]
    if cache:
        try:  # atomic; a read-only data dir just isn't cached
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache), suffix=".npy")
            with os.fdopen(fd, "wb") as f:
                np.save(f, labels)
            os.replace(tmp, cache)
        except OSError:
            pass
    labels.flags.writeable = False
    return labels


def _labels_path(source: Source, split: str) -> str | None:
    builder = pipeline.open_builder(source.name, source.data_dir, source.params)
    info = os.path.join(str(builder.data_dir), "dataset_info.json")
    if not os.path.exists(info):
        return None
    rel = os.path.relpath(str(builder.data_dir), source.data_dir).replace(os.sep, "_")
    stamp = int(os.stat(info).st_mtime_ns)
    return os.path.join(source.data_dir, "tlx_labels", f"{rel}_{stamp}", f"{split}.npy")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Records -> uint8 [B, S, S, C]: decode, then per example an Inception crop (train, if on),
    ``resize_small`` + ``central_crop`` (eval, if ``eval_resize``), or the in-memory path's centre
    square + resize."""

    source: Source
    split: str  # the source's split
    image_size: int
    channels: int
    inception: tuple | None = None  # ((min, max) scale, (min, max) ratio) when cropping
    eval_resize: int = 0  # shorter side before the central crop; 0 = centre square + resize

    def __call__(self, indices: np.ndarray, crop_seeds: np.ndarray | None = None):
        _, image_key, label_key = self.source.open(self.split)
        records = self.source.read(self.split, indices)
        s, c = self.image_size, self.channels
        x = np.empty((len(records), s, s, c), np.uint8)
        y = np.empty(len(records), np.int32)
        for k, (index, ex) in enumerate(zip(indices, records, strict=True)):
            try:
                image = ops.decode(ex[image_key])
            except ValueError as e:
                raise CorruptRecordError(
                    f"dataset {self.source.name!r} under {self.source.data_dir}: {self.split} "
                    f"record {int(index)}: {e}"
                ) from e
            if self.inception is not None:
                rng = np.random.default_rng(int(crop_seeds[k]))
                x[k] = ops.inception_crop(image, rng, s, c, *self.inception)
            elif self.eval_resize:
                image = ops.central_crop(ops.resize_small(image, self.eval_resize), s)
                x[k] = ops.to_array(image, c)
            else:
                if image.mode not in ("L", "RGB"):  # palette, grey+alpha, 16-bit, ...
                    image = image.convert("RGB")
                x[k] = ops.to_model_format(np.asarray(image), s, c)
            y[k] = ex[label_key]
        return x, y


@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """Global batch positions -> this process's rows, augmented and normalised.

    The random draws replicate `pipeline.Dataset._train_batch` (pad-crop offsets, then flips, for
    the whole global batch), so both paths augment alike; Inception-crop seeds come after.
    """

    preprocess: Preprocess
    train_indices: np.ndarray  # position in the carved train split -> source index
    rows: slice
    crop_padding: int
    flip: bool
    normalize: str

    def __call__(self, positions: np.ndarray, rng: np.random.Generator) -> dict:
        b, p = len(positions), self.crop_padding
        offsets = rng.integers(0, 2 * p + 1, (b, 2))[self.rows]
        flips = (rng.random(b) < 0.5)[self.rows] if self.flip else None
        seeds = None
        if self.preprocess.inception is not None:
            seeds = rng.integers(0, 2**63, b)[self.rows]
        x, y = self.preprocess(self.train_indices[positions[self.rows]], seeds)
        if p:
            x = ops.pad_crop(x, offsets, p)
        if flips is not None:
            x = ops.flip(x, flips)
        return {"image": ops.normalize(x, self.normalize), "label": y}


@dataclasses.dataclass(frozen=True)
class EvalBatch:
    """Batch ``k`` of a split in its fixed order, padded to ``batch_size``, with 'mask'."""

    preprocess: Preprocess
    indices: np.ndarray  # source indices of the split, in order
    batch_size: int
    normalize: str

    def __call__(self, k: int) -> dict:
        idx = self.indices[k * self.batch_size : (k + 1) * self.batch_size]
        x, y = self.preprocess(idx)
        real = len(y)
        mask = np.zeros(self.batch_size, np.float32)
        mask[:real] = 1.0
        if real < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - real, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(self.batch_size - real, y.dtype)])
        return {"image": ops.normalize(x, self.normalize), "label": y, "mask": mask}


# ------------------------------------------------------------------------------------------------
# The iterator.


class StreamIterator:
    """Infinite batches from worker processes, with a position that survives a checkpoint.

    ``get_state()`` is ``{'next_index': batches yielded}``; ``set_state`` restarts the workers at
    that batch. The workers start on the first ``next`` (so a ``set_state`` right after creation
    starts nothing twice). ``close()`` stops them.
    """

    def __init__(self, dataset: grain.MapDataset, workers: int):
        self._dataset = dataset
        self._workers = workers
        self._next_index = 0
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            _absl_flags_parsed()
            ds = self._dataset[self._next_index :].to_iter_dataset(grain.ReadOptions(num_threads=0))
            options = grain.MultiprocessingOptions(
                num_workers=self._workers, per_worker_buffer_size=_WORKER_BUFFER
            )
            self._it = iter(ds.mp_prefetch(options, worker_init_fn=_exit_with_parent))
        batch = next(self._it)
        self._next_index += 1
        return batch

    def get_state(self) -> dict:
        return {"next_index": self._next_index}

    def set_state(self, state: dict) -> None:
        self.close()
        self._next_index = int(state["next_index"])

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """In each worker: exit when the training process is gone (killed with SIGKILL, its workers
    would otherwise wait forever on a full queue)."""
    del worker_index, worker_count
    import os
    import threading
    import time

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="tlx-exit-with-parent").start()


def _absl_flags_parsed() -> None:
    # grain's worker processes read absl flags (--grain_...); outside an absl app (pytest, a
    # notebook) nothing has parsed them, and the first batch would fail on it.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ------------------------------------------------------------------------------------------------
# The dataset.


@dataclasses.dataclass
class StreamingDataset:
    """A dataset read from its records every step; labels and indices in memory, images not."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_examples: dict[str, int]
    source: Source
    source_splits: dict[str, str]  # 'train', 'val', 'test' -> the source split
    indices: dict[str, np.ndarray] = dataclasses.field(repr=False)
    labels: dict[str, np.ndarray] = dataclasses.field(repr=False)
    normalize: str = "unit"
    crop_padding: int = 4
    flip: bool = True
    inception: tuple | None = None
    eval_resize: int = 0
    workers: int = 2
    data_dir: str = ""
    input: dict = dataclasses.field(default_factory=dict)
    fingerprint: str = ""  # of the source as built (`tlx.data.loading.fingerprint`)

    @classmethod
    def open(cls, cfg: ml_collections.ConfigDict, data_dir: str, params: tuple, reason: str):
        workers = int(cfg.workers)
        if workers < 1:
            raise ValueError(
                f"data.workers={workers}: the streaming path ({reason}) decodes in worker "
                "processes and needs data.workers >= 1"
            )
        source = Source(cfg.name, data_dir, params)
        _, _, label_key = source.open("train")
        info = pipeline.open_builder(cfg.name, data_dir, params).info
        test_split = pipeline.source_test_split(info)
        train_y = read_labels(source, "train")
        test_y = read_labels(source, test_split)
        keep, val = pipeline.carve(train_y, cfg)
        indices = {"train": keep, "val": val, "test": np.arange(len(test_y))}
        labels = {"train": train_y[keep], "val": train_y[val], "test": test_y}
        size, channels = int(cfg.image_size), int(cfg.channels)
        a = cfg.augment
        inception = None
        if a.inception_crop:
            inception = (tuple(map(float, a.inception_scale)), tuple(map(float, a.inception_ratio)))
        eval_resize = 0
        if cfg.eval_crop_fraction:
            eval_resize = int(round(size / float(cfg.eval_crop_fraction)))
        logging.info("tlx.data: streaming %s (%s), %d workers", cfg.name, reason, workers)
        return cls(
            name=cfg.name,
            num_classes=int(info.features[label_key].num_classes),
            image_shape=(size, size, channels),
            num_examples={k: len(v) for k, v in labels.items()},
            source=source,
            source_splits={"train": "train", "val": "train", "test": test_split},
            indices=indices,
            labels=labels,
            normalize=cfg.normalize,
            crop_padding=int(a.crop_padding),
            flip=bool(a.flip),
            inception=inception,
            eval_resize=eval_resize,
            workers=workers,
            data_dir=data_dir,
            input={"path": "stream", "reason": reason, "workers": workers},
        )

    @property
    def augments(self) -> bool:
        """Whether training batches are augmented (so features can't be cached)."""
        return bool(self.crop_padding or self.flip or self.inception)

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

    def _preprocess(self, split: str, train: bool) -> Preprocess:
        return Preprocess(
            source=self.source,
            split=self.source_splits[split],
            image_size=self.image_shape[0],
            channels=self.image_shape[2],
            inception=self.inception if train else None,
            eval_resize=0 if train else self.eval_resize,
        )

    def train_iter(
        self, batch_size: int, seed: int, *, process_index: int = 0, process_count: int = 1
    ) -> StreamIterator:
        """As `pipeline.Dataset.train_iter`: infinite, reshuffled each epoch, remainder dropped,
        deterministic for ``seed``, this process's rows of each global batch, checkpointable."""
        n = self.num_examples["train"]
        if not 0 < batch_size <= n:
            raise ValueError(
                f"batch_size={batch_size} needs 1..{n} (train examples of {self.name})"
            )
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} not divisible by {process_count} processes")
        positions, augment_seed = pipeline.shuffled_batches(n, batch_size, seed)
        local = batch_size // process_count
        make_batch = TrainBatch(
            preprocess=self._preprocess("train", train=True),
            train_indices=self.indices["train"],
            rows=slice(process_index * local, (process_index + 1) * local),
            crop_padding=self.crop_padding,
            flip=self.flip,
            normalize=self.normalize,
        )
        return StreamIterator(positions.random_map(make_batch, seed=augment_seed), self.workers)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[dict]:
        """As `pipeline.Dataset.eval_batches`: one pass in a fixed order, the last batch padded,
        'mask'. Read with ``workers`` threads in this process: an eval pass is short and starts
        afresh each time, Pillow's decode and resize release the GIL, and starting processes
        (~3 s each, to import tfds) would cost more than small splits take to read."""
        if split not in self.indices:
            raise ValueError(f"unknown split {split!r}; have {sorted(self.indices)}")
        n = self.num_examples[split]
        if n == 0:
            return
        batch = EvalBatch(
            self._preprocess(split, train=False), self.indices[split], batch_size, self.normalize
        )
        options = grain.ReadOptions(
            num_threads=self.workers, prefetch_buffer_size=_EVAL_PREFETCH * self.workers
        )
        yield from grain.MapDataset.range(-(-n // batch_size)).map(batch).to_iter_dataset(options)
