"""The frozen-prefix cache: when a run freezes the stem and stages 1..k (their BatchNorm statistics
too) and augments nothing, every epoch would recompute the same output of stage k, so compute it
once per split, cache it on disk, and train the rest of the network (stages k+1.., the head, any
leaves a strategy adds to them) on it through the same generic train step. The dataset becomes
the cached activations and the model becomes the backbone's suffix (`Suffix`). A linear probe is
the case k = S (every stage frozen): the cache holds the head's input, the pooled features.
This is the frozen-prefix caching of AutoFreeze (Liu et al. 2021, "AutoFreeze: Automatically
Freezing Model Blocks to Accelerate Fine-tuning", arXiv:2102.01386), with a fixed depth.

The cut is the first top-level module (stem, stage1.., head) that is not frozen in every phase;
the cache holds its input. The key is a hash of the frozen prefix's variables (as loaded) x the
dataset and its preprocessing (`config.data` without augmentation, and the fingerprint of the data
as built) x the model x the cut; change any and it recomputes. Batches come in the order the image
path would see them. A cache larger than `config.feature_cache_max_mb` is refused with one line
and the run trains on images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from tlx import compiler, freeze
from tlx.data import pipeline

SPLITS = ("train", "val", "test")
HEAD = "head"


def cut(config, plan, dataset) -> str | None:
    """The top-level module whose input the run can train from, or None: the first of stem,
    stage1.., head that some phase trains (or whose BatchNorm statistics it trains), when at
    least the stem is frozen, nothing augments, the strategy has no hook (a hook may read
    images), and `config.feature_cache` is on."""
    if not config.feature_cache or plan.hook is not None:
        return None
    if dataset.augments:  # crops, flips, Inception crops: the activations would differ per epoch
        return None
    # Streamed data resized and cropped for evaluation only: eval_batches('train') is not what
    # the train iterator reads.
    if getattr(dataset, "eval_resize", 0):
        return None
    names = freeze.stage_names(plan.params)
    frozen = len(names)
    for setup in plan.phases:
        n = 0
        while n < len(names) - 1:  # the head is never part of the prefix
            s = names[n]
            if s not in setup.frozen_bn or not all(jax.tree.leaves(setup.mask[s])):
                break
            n += 1
        frozen = min(frozen, n)
    return names[frozen] if frozen > 0 else None


def applies(config, plan, dataset) -> bool:
    """Whether the run trains on cached activations (`cut` finds a frozen prefix)."""
    return cut(config, plan, dataset) is not None


class _Stop(Exception):  # noqa: N818 - control flow: carries the cut's input out of the model
    def __init__(self, value):
        super().__init__("prefix done")
        self.value = value


def prefix(model, variables, images, at: str = HEAD):
    """The input of the top-level module `at` of `model` (eval mode): the output of the frozen
    prefix (`at` = 'head': the pooled features). The modules from `at` on are not run."""

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.path == (at,):
            raise _Stop(args[0])
        return next_fun(*args, **kwargs)

    try:
        with nn.intercept_methods(interceptor):
            model.apply(variables, images, train=False)
    except _Stop as stop:
        return stop.value
    raise ValueError(f"{type(model).__name__} has no top-level module {at!r}")


def backbone_features(model, variables, images):
    """The input of the top-level `head` of `model` (its pooled features), in eval mode."""
    return prefix(model, variables, images, HEAD)


def _last_before(model, variables, images, at: str):
    """(the input of `at`, the output of the top-level module just before it) as per-example
    jax.ShapeDtypeStructs: what the cache holds, and what the code between the two (pooling)
    runs on."""
    names = freeze.stage_names(variables["params"])
    last = names[names.index(at) - 1]
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.path == (last,):
            seen["out"] = jax.ShapeDtypeStruct(out.shape[1:], out.dtype)
        return out

    def run(v, x):
        with nn.intercept_methods(interceptor):
            return prefix(model, v, x, at)

    cut_in = jax.eval_shape(run, variables, images)
    return jax.ShapeDtypeStruct(cut_in.shape[1:], cut_in.dtype), seen["out"]


class Suffix:
    """`module` run from the input of its top-level module `at` on: `apply(variables, x, ...)`
    takes the cached input of `at` as `x` instead of images. The modules before `at` are not run
    (the last of them gives zeros of its output's shape, which the code between it and `at`, such
    as pooling, reads and XLA removes as unused); their leaves stay in the tree, untouched, so the
    run's params, optimizer state and checkpoints are the image path's. `clone(**fields)` clones
    the module (a plan's BatchNorm policy, a strategy's fields); anything else is the module's."""

    def __init__(self, module, at: str, before: tuple[str, ...], last_out, cut_dtype):
        self.module, self.at, self.before = module, at, before
        self.last_out, self.cut_dtype = last_out, cut_dtype

    def apply(self, variables, x, *args, **kwargs):
        at, last = self.at, self.before[-1]
        x = jnp.asarray(x).astype(self.cut_dtype)  # cached as float32; bf16 -> f32 -> bf16 exact

        def interceptor(next_fun, a, kw, context):
            path = context.module.path
            if context.method_name != "__call__" or len(path) != 1:
                return next_fun(*a, **kw)
            if path[0] == last:
                return jnp.zeros((x.shape[0], *self.last_out.shape), self.last_out.dtype)
            if path[0] in self.before:
                return a[0]  # skipped: the next module ignores what it gets
            if path[0] == at:
                return next_fun(x, *a[1:], **kw)
            return next_fun(*a, **kw)

        with nn.intercept_methods(interceptor):
            return self.module.apply(variables, x, *args, **kwargs)

    def clone(self, **fields):
        return Suffix(
            self.module.clone(**fields), self.at, self.before, self.last_out, self.cut_dtype
        )

    def __getattr__(self, name):
        if name in ("module", "at", "before", "last_out", "cut_dtype"):  # not set yet (copy)
            raise AttributeError(name)
        return getattr(self.module, name)


def cache_key(config, params, batch_stats, fingerprint: str = "", at: str = HEAD, extra=None):
    """`fingerprint`: the dataset's as built (`tlx.data.fingerprint`), so activations of data
    built by an older generator are not read as those of today's. `at`: the cut; only the leaves
    of the modules before it count. `extra`: anything else the prefix's values depend on (a
    strategy's model fields), JSON. With at='head' and no extra the key is the whole-backbone
    feature cache's of earlier versions of tlx, so their files are read."""
    h = hashlib.sha256(fingerprint.encode())
    names = freeze.stage_names(params)
    before = set(names[: names.index(at)])
    backbone = {
        "params": {k: v for k, v in params.items() if k in before},
        "bs": {k: v for k, v in batch_stats.items() if k in before},
    }
    for p, x in jax.tree_util.tree_leaves_with_path(backbone):
        x = np.asarray(x)
        h.update(f"{freeze.path_str(p)}:{x.dtype}:{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    d = config.data.to_dict()
    # What changes no feature value: augmentation (off here), where and how the data is read.
    for k in ("augment", "data_dir", "in_memory", "workers"):
        d.pop(k, None)
    d.get("fractaldb", {}).pop("workers", None)
    m = config.model.to_dict()
    if m.get("dtype") == "float32":  # the default: keys (and caches) of earlier runs stand
        m.pop("dtype")
    h.update(json.dumps([d, m], sort_keys=True).encode())
    if at != HEAD or extra:
        h.update(json.dumps({"cut": at, "extra": extra}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def max_bytes(config) -> int:
    return int(float(config.get("feature_cache_max_mb", 0)) * 2**20)


def cached(config, dataset, model, variables, batch_size: int, plan=None):
    """(dataset, model, description) for a run with a frozen prefix: the cached input of the cut
    for every split (read, or computed with the prefix of `model` and stored) and the model's
    `Suffix`; or, when the cache would exceed `config.feature_cache_max_mb`, the image dataset
    and `model` as given, with the refusal in the description. `plan`: the run's plan (its cut,
    and the model as the strategy runs it); None: the whole-backbone cut ('head')."""
    at = HEAD if plan is None else cut(config, plan, dataset)
    if at is None:
        raise ValueError("no frozen prefix to cache: check features.cut(config, plan, dataset)")
    run_model = model if plan is None else plan.model(model, 0)
    params, batch_stats = jax.device_get((variables["params"], variables["batch_stats"]))
    fields = None
    if plan is not None and (plan.strategy.model_fields or plan.strategy.apply_params):
        fields = {"strategy": plan.name, "knobs": plan.ctx.knobs.to_dict()}
    v = {"params": params, "batch_stats": batch_stats}  # run_model applies the strategy's
    dummy = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    shape, last_out = _last_before(run_model, v, dummy, at)
    names = freeze.stage_names(params)
    before = tuple(names[: names.index(at)])
    size = math.prod(shape.shape) * 4 * sum(dataset.num_examples[s] for s in SPLITS)
    info = {"cut": at, "frozen": list(before), "bytes": size}
    limit = max_bytes(config)
    if limit and size > limit:
        info["refused"] = (
            f"the cache of the input of {at!r} would take {size / 2**20:.0f} MB, more than "
            f"feature_cache_max_mb={config.feature_cache_max_mb:g}: training on images (raise "
            "feature_cache_max_mb to cache it)"
        )
        logging.warning("feature cache: %s", info["refused"])
        return dataset, model, info
    key = cache_key(
        config, params, batch_stats, dataset.describe().get("fingerprint", ""), at, fields
    )
    path = os.path.join(dataset.data_dir, "tlx_features", f"{key}.npz")
    info.update(key=key, path=path, hit=False, extract_s=0.0)
    arrays = _read(path)
    if arrays is not None:
        info["hit"] = True
    else:
        t = time.time()
        fn = compiler.jit(lambda v, x: prefix(run_model, v, x, at).astype(jnp.float32))
        arrays = {}
        for split in SPLITS:
            out = np.empty((dataset.num_examples[split], *shape.shape), np.float32)
            ys, start = [], 0
            for batch in dataset.eval_batches(split, batch_size):
                real = batch["mask"] > 0
                rows = np.asarray(fn(v, batch["image"]))[real]
                out[start : start + len(rows)] = rows
                start += len(rows)
                ys.append(np.asarray(batch["label"])[real])
            arrays[split] = out[:start]
            arrays[f"{split}_label"] = np.concatenate(ys) if ys else np.zeros(0, np.int32)
        info["extract_s"] = time.time() - t
        _write(path, arrays)
    features = FeatureDataset(
        name=f"{dataset.name}:features",
        num_classes=dataset.num_classes,
        features={s: arrays[s] for s in SPLITS},
        labels={s: arrays[f"{s}_label"].astype(np.int32) for s in SPLITS},
        data_dir=dataset.data_dir,
        source=dataset.describe(),
    )
    return features, Suffix(model, at, before, last_out, shape.dtype), info


def _read(path: str) -> dict | None:
    """The cached arrays, or None when there are none; a corrupt file is named and rebuilt."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        if set(arrays) == {*SPLITS, *(f"{s}_label" for s in SPLITS)}:
            return arrays
        problem = f"holds {sorted(arrays)}"
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        problem = f"is unreadable ({type(e).__name__}: {e})"
    logging.warning("feature cache %s %s: recomputing it", path, problem)
    return None


def _write(path: str, arrays: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)  # atomic: a concurrent reader sees all or nothing


@dataclasses.dataclass
class FeatureDataset:
    """Cached activations of every split in memory, with the iterators of `tlx.data.Dataset`:
    batches {'image': f32 [B, ...] activations, 'label'}, in the order the image dataset's
    `train_iter(batch_size, seed)` yields its images."""

    name: str
    num_classes: int
    features: dict = dataclasses.field(repr=False)
    labels: dict = dataclasses.field(repr=False)
    data_dir: str = ""
    source: dict = dataclasses.field(default_factory=dict)

    @property
    def num_examples(self) -> dict:
        return {s: len(y) for s, y in self.labels.items()}

    @property
    def image_shape(self) -> tuple:
        return self.features["train"].shape[1:]

    def describe(self) -> dict:
        return {**self.source, "features": list(self.image_shape)}

    def train_iter(self, batch_size: int, seed: int, *, process_index=0, process_count=1):
        n = self.num_examples["train"]
        if not 0 < batch_size <= n:
            raise ValueError(
                f"batch_size={batch_size} needs 1..{n} (train examples of {self.name})"
            )
        local = batch_size // process_count
        rows = slice(process_index * local, (process_index + 1) * local)
        positions, _ = pipeline.shuffled_batches(n, batch_size, seed)  # the image path's order
        ds = positions.map(lambda idx: self._batch(idx[rows]))
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))

    def _batch(self, idx) -> dict:
        return {"image": self.features["train"][idx], "label": self.labels["train"][idx]}

    def eval_batches(self, split: str, batch_size: int) -> Iterator[dict]:
        x, y = self.features[split], self.labels[split]
        for xb, yb, mask in pipeline.padded_batches(x, y, batch_size):
            yield {"image": xb, "label": yb, "mask": mask}
