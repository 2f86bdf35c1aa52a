"""The feature cache as data: when a run freezes the whole backbone (its BatchNorm statistics
too) and augments nothing, every epoch would recompute the same backbone features, so compute
them once, cache them on disk, and train the head on them. The dataset becomes a features dataset
and the model becomes its head; the same generic train step trains it.

The cache key is a hash of the backbone's variables (the checkpoint, as loaded) x the dataset and
its preprocessing (`config.data` without augmentation, and the fingerprint of the data as built)
x the model; change any and it recomputes.
Batches come in the order the image path would see them, so the head trains on the same data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
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


def backbone_features(model, variables, images):
    """The input of the top-level `head` of `model` (its pooled features), in eval mode."""

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.path == ("head",):
            return args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        return model.apply(variables, images, train=False)


class FeatureHead(nn.Module):
    """A backbone's Dense `head` alone, on its features: the model of a cached run. Its
    parameter tree is the backbone's `head` subtree; the other (frozen) leaves ride along."""

    num_classes: int
    frozen_bn: tuple = ()  # no BatchNorm here: accepted so a plan can clone it like a backbone
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        return nn.Dense(self.num_classes, name="head")(x).astype(jnp.float32)


def applies(config, plan, dataset) -> bool:
    """Whether the run can train on cached features: one phase, every backbone leaf and BatchNorm
    statistic frozen, a trainable Dense head, no augmentation, nothing a strategy adds to the step
    or the model (multipliers, transforms, loss terms, hooks, parameters), and
    `config.feature_cache` on."""
    s = plan.strategy
    if not config.feature_cache or len(plan.phases) != 1:
        return False
    if plan.lr_mult is not None or s.wrap or s.loss or s.hook:
        return False
    if s.init_params or s.apply_params or s.model_fields:  # the model is not the plain backbone
        return False
    if dataset.augments:  # crops, flips, Inception crops: the features would differ per epoch
        return False
    setup = plan.phases[0]
    if set(setup.mask) - {"head"} != set(setup.frozen_bn):  # a stage whose statistics train
        return False
    for name, sub in setup.mask.items():
        leaves = jax.tree.leaves(sub)
        if (name == "head") == any(leaves) or (name != "head" and not all(leaves)):
            return False
    return set(setup.mask["head"]) == {"kernel", "bias"}


def cache_key(config, params, batch_stats, fingerprint: str = "") -> str:
    """`fingerprint`: the dataset's as built (`tlx.data.fingerprint`), so features of data built
    by an older generator are not read as those of today's."""
    h = hashlib.sha256(fingerprint.encode())
    backbone = {"params": {k: v for k, v in params.items() if k != "head"}, "bs": batch_stats}
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
    return h.hexdigest()[:32]


def cached(config, dataset, model, variables, batch_size: int):
    """(features dataset, head model, description) for a run that `applies`: the features of
    every split from the cache, or computed with `model` and stored."""
    params, batch_stats = jax.device_get((variables["params"], variables["batch_stats"]))
    key = cache_key(config, params, batch_stats, dataset.describe().get("fingerprint", ""))
    path = os.path.join(dataset.data_dir, "tlx_features", f"{key}.npz")
    info = {"key": key, "path": path, "hit": False, "extract_s": 0.0}
    arrays = _read(path)
    if arrays is not None:
        info["hit"] = True
    else:
        t = time.time()
        fn = compiler.jit(lambda v, x: backbone_features(model, v, x))
        v = {"params": params, "batch_stats": batch_stats}
        arrays = {}
        for split in SPLITS:
            xs, ys = [], []
            for batch in dataset.eval_batches(split, batch_size):
                real = batch["mask"] > 0
                xs.append(np.asarray(fn(v, batch["image"]))[real])
                ys.append(np.asarray(batch["label"])[real])
            arrays[split], arrays[f"{split}_label"] = np.concatenate(xs), np.concatenate(ys)
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
    head = FeatureHead(dataset.num_classes)
    return features, head, info


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
    """Backbone features of every split in memory, with the iterators of `tlx.data.Dataset`:
    batches {'image': f32 [B, D] features, 'label'}, in the order the image dataset's
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
