"""Few-shot probes during pre-training (as big_vision's `fewshot` evaluator): every N steps, the
closed-form ridge probe's accuracy on each target at k shots per class, on the target's val split.

    config.fewshot = tlx.fewshot.default_config()   # every=0: off
    evaluate = make_fewshot_evaluator(config, model)
    if config.fewshot.every and step % config.fewshot.every == 0:
        log.write({"step": step, "split": "fewshot", **evaluate(step, params, batch_stats)})

The k-shot training examples are drawn once from each target's train split (per seed: the first
k of a seeded permutation of each class) and stay the same at every evaluation, so the curve over
steps measures the backbone, not the sample. Features: the head's input, in eval mode.
"""

import dataclasses
import time

import ml_collections
import numpy as np

from tlx import compiler, probe
from tlx import data as tlx_data
from tlx.data import roles
from tlx.features import backbone_features


def default_config() -> ml_collections.ConfigDict:
    """The fields of `config.fewshot`, with their defaults."""
    c = ml_collections.ConfigDict()
    c.every = 0  # steps between evaluations; 0 = off
    c.targets = []  # dataset names ('digits', 'mnist5k', 'fractals' = new fractal classes, ...)
    c.shots = [5]  # examples per class of the probe's training set
    c.seeds = 1  # draws of the k-shot set; the accuracy is their mean
    # l2 of the probe: chosen from probe.L2_GRID by leave-fold-out over the k-shot set itself
    # (folds = min(shots, 3)); a 1-shot probe, with no folds, uses this fixed value.
    c.l2 = 1.0
    c.batch_size = 256
    return c


def kshot_indices(labels, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` examples of every class: the first of a permutation per class, seeded
    by (seed, class). A class with fewer examples than `shots` is an error."""
    labels = np.asarray(labels)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots:
            raise ValueError(
                f"fewshot: class {c} has {len(idx)} training examples, fewer than shots={shots}"
            )
        out.append(np.random.default_rng([seed, int(c)]).permutation(idx)[:shots])
    return np.concatenate(out)


def target_data_config(config, name: str) -> ml_collections.ConfigDict:
    """The run's data config (its resolution, channels, normalisation) pointed at target `name`,
    all of its training split, no augmentation."""
    d = ml_collections.ConfigDict(config.data.to_dict())
    roles.set_dataset(d, name, "target")
    d.examples_per_class = 0
    d.augment.crop_padding, d.augment.flip = 0, False
    return d


def make_fewshot_evaluator(config, model):
    """fn(step, params, batch_stats) -> {'TARGET_Kshot': accuracy, ..., 'seconds': s} for
    `config.fewshot` (default_config() where absent). Pass host
    (unreplicated) params. The targets' data load here, once; shots that a class cannot supply
    fail here, before training starts."""
    fc = config.get("fewshot", None) or default_config()
    bs = int(fc.batch_size)
    targets = {}
    for name in fc.targets:
        ds = tlx_data.load(target_data_config(config, name))
        draws = {
            (k, s): kshot_indices(ds.labels["train"], int(k), s)
            for k in fc.shots
            for s in range(int(fc.seeds))
        }
        targets[name] = (ds, draws)
    features = compiler.jit(lambda v, x: backbone_features(model, v, x))

    def extract(variables, ds, split, index=None):
        if index is not None:  # the same preprocessing, on a subset of the split
            ds = dataclasses.replace(
                ds, images={split: ds.images[split][index]}, labels={split: ds.labels[split][index]}
            )
        chunks = []
        for batch in ds.eval_batches(split, bs):
            chunks.append(np.asarray(features(variables, batch["image"]))[batch["mask"] > 0])
        return np.concatenate(chunks).astype(np.float64)

    def evaluate(step, params, batch_stats) -> dict:
        del step  # the caller logs it
        t = time.time()
        variables = {"params": params, "batch_stats": batch_stats}
        out = {}
        for name, (ds, draws) in targets.items():
            x_val, y_val = extract(variables, ds, "val"), ds.labels["val"]
            needed = np.unique(np.concatenate(list(draws.values())))
            x_all = dict(zip(needed.tolist(), extract(variables, ds, "train", needed), strict=True))
            for k in fc.shots:
                accs = []
                for s in range(int(fc.seeds)):
                    index = draws[(k, s)]
                    x = np.stack([x_all[i] for i in index.tolist()])
                    y = ds.labels["train"][index]
                    if int(k) >= 2:
                        l2 = probe.cross_validate_ridge(
                            x, y, ds.num_classes, folds=min(int(k), 3), seed=s
                        ).l2
                    else:
                        l2 = float(fc.l2)
                    accs.append(probe.ridge_accuracy(x, y, x_val, y_val, ds.num_classes, (l2,))[0])
                out[f"{name}_{k}shot"] = float(np.mean(accs))
        out["seconds"] = time.time() - t
        return out

    return evaluate
