"""The feature-cached linear probe: when a run freezes the whole backbone (its BatchNorm
statistics too) and augments nothing, every epoch would recompute the same backbone features, so
compute them once, cache them on disk, and train the head on them.

The cache key is a hash of the backbone's variables (the checkpoint, as loaded) x the dataset and
its preprocessing (`config.data` without augmentation) x the model; change any and it recomputes.
Batches come in the order the image path would see them, so the head trains on the same data.
"""

import dataclasses
import hashlib
import json
import os
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tlx import freeze

SPLITS = ("train", "val", "test")


def backbone_features(model, variables, images):
    """The input of the top-level `head` of `model` (its pooled features), in eval mode."""

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.path == ("head",):
            return args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        return model.apply(variables, images, train=False)


def plan_cache(config, plan, dataset, model):
    """A `FeatureCache` when the run can train on cached features, else None: one phase, every
    backbone leaf and BatchNorm statistic frozen, a trainable Dense head, no augmentation, no
    per-leaf multipliers or regulariser, and `config.freeze.feature_cache` on."""
    if not config.freeze.feature_cache or len(plan.phases) != 1:
        return None
    if plan.uses_lr_mult or plan.l2_sp or dataset.crop_padding or dataset.flip:
        return None
    setup = plan.phases[0]
    if set(setup.mask) - {"head"} != set(setup.frozen_bn):  # a stage whose statistics train
        return None
    for name, sub in setup.mask.items():
        leaves = jax.tree.leaves(sub)
        if (name == "head") == any(leaves) or (name != "head" and not all(leaves)):
            return None
    if set(setup.mask["head"]) != {"kernel", "bias"}:
        return None
    return FeatureCache(config, model)


@dataclasses.dataclass
class FeatureCache:
    config: object
    model: object
    features: dict = dataclasses.field(default_factory=dict, repr=False)
    labels: dict = dataclasses.field(default_factory=dict, repr=False)
    key: str = ""
    path: str = ""
    hit: bool = False
    extract_s: float = 0.0

    def cache_key(self, params, batch_stats) -> str:
        h = hashlib.sha256()
        backbone = {"params": {k: v for k, v in params.items() if k != "head"}, "bs": batch_stats}
        for p, x in jax.tree_util.tree_leaves_with_path(backbone):
            x = np.asarray(x)
            h.update(f"{freeze.path_str(p)}:{x.dtype}:{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        d = self.config.data.to_dict()
        d.pop("augment"), d.pop("data_dir")
        h.update(json.dumps([d, self.config.model.to_dict()], sort_keys=True).encode())
        return h.hexdigest()[:32]

    def load(self, state, dataset, batch_size: int) -> None:
        """Read the features of every split from the cache, or compute and store them."""
        params, batch_stats = jax.device_get((state["params"], state["batch_stats"]))
        self.key = self.cache_key(params, batch_stats)
        self.path = os.path.join(dataset.data_dir, "tlx_features", f"{self.key}.npz")
        self.labels = {s: dataset.labels[s] for s in SPLITS}
        if os.path.exists(self.path):
            with np.load(self.path) as f:
                self.features = {s: f[s] for s in SPLITS}
            self.hit = True
            return
        t = time.time()
        variables = {"params": params, "batch_stats": batch_stats}
        fn = jax.jit(lambda v, x: backbone_features(self.model, v, x))
        for split in SPLITS:
            chunks = []
            for batch in dataset.eval_batches(split, batch_size):
                out = np.asarray(fn(variables, batch["image"]))
                chunks.append(out[batch["mask"] > 0])
            self.features[split] = np.concatenate(chunks)
        self.extract_s = time.time() - t
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **self.features)
        os.replace(tmp, self.path)  # atomic: a concurrent reader sees all or nothing

    def describe(self) -> dict:
        return {"key": self.key, "path": self.path, "hit": self.hit, "extract_s": self.extract_s}

    def train_iter(self, dataset, batch_size: int, seed: int):
        """Feature batches in exactly the order `dataset.train_iter(batch_size, seed)` yields
        images: that iterator runs over an 'image' that is each example's index."""
        n = dataset.num_examples["train"]
        index_images = np.arange(n, dtype=np.int32).reshape(n, 1, 1, 1)
        index_ds = dataclasses.replace(
            dataset,
            images={"train": index_images},
            normalize="unit",
            crop_padding=0,
            flip=False,
        )
        return _FeatureIter(index_ds.train_iter(batch_size, seed=seed), self.features["train"])

    def evaluate(self, runner, params, split: str, batch_size: int) -> dict:
        del runner, batch_size  # the whole split's features are one small array
        head = jax.device_get(params["head"])
        logits = _head_apply(head, jnp.asarray(self.features[split]))
        y = self.labels[split]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = np.asarray(jnp.argmax(logits, -1)) == y
        n = max(len(y), 1)
        return {
            "accuracy": float(correct.sum()) / n,
            "loss": float(np.asarray(loss).sum()) / n,
            "examples": len(y),
        }


class _FeatureIter:
    """{'image': ..., 'label'} batches of example indices -> {'feature', 'label'} batches."""

    def __init__(self, index_iter, features):
        self.it, self.features = index_iter, features

    def __next__(self) -> dict:
        b = next(self.it)
        index = np.rint((b["image"][:, 0, 0, 0] + 1.0) * 127.5).astype(np.int64)
        return {"feature": self.features[index], "label": b["label"]}

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


@jax.jit
def _head_apply(head, x):
    return nn.Dense(head["kernel"].shape[-1]).apply({"params": head}, x).astype(jnp.float32)


def make_head_step(tx, labels, label_smoothing: float = 0.0, axis_name=None):
    """The train step of the image path for a frozen backbone, on features: only the head's
    gradient is computed; the backbone leaves (all 'frozen') are carried over untouched."""
    from tlx import train

    def step(state, batch):
        params = state["params"]

        def loss_fn(head):
            logits = _head_apply(head, batch["feature"])
            return train.cross_entropy(logits, batch["label"], label_smoothing), logits

        (loss, logits), g_head = jax.value_and_grad(loss_fn, has_aux=True)(params["head"])
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        if axis_name:
            g_head = jax.lax.pmean(g_head, axis_name)
            loss, accuracy = jax.lax.pmean((loss, accuracy), axis_name)
        grads = {**jax.tree.map(jnp.zeros_like, params), "head": g_head}
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            **state,
            "params": train.apply_updates(params, updates, labels),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(g_head)}
        return new_state, metrics

    return step
