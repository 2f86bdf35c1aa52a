"""The freeze advisor: how much of a pre-trained backbone to freeze on a target, from one pass of
the frozen backbone over the target's training split (never its val or test split).

  python -m tlx.advise --init_from=runs/pretrain --backbone=resnet_tiny --target=mnist5k \\
      --examples_per_class=10 [--folds=3] [--out=DIR]

Per stage (pooled stem, stage1..stageK outputs): a ridge probe's k-fold accuracy and LogME, with
their spread over folds. From them, a similarity estimate, the rule of thumb's prescription
from (size, similarity) (`tlx.strategies.rule_of_thumb`), and tlx's rule (see `recommend`), as
a table and as DIR/advice.json.
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tlx import checkpoint, compiler, models, probe, strategies
from tlx import config as tlx_config
from tlx import data as tlx_data

# The fine-tuning config, packaged (configs/finetune.py at the top of the repository is this one).
FINETUNE_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "finetune.py")
CACHE_VERSION = "advise-v1"
# A target with at least this many training examples per class is "large" for the rule of thumb
# and for the rule's size step. Chosen before any measurement (the studies' sizes are 3, 10 and
# 216-360 per class: any threshold between 10 and 216 gives the same answers there).
LARGE_PER_CLASS = 100


# -- the backbone and its per-stage features ------------------------------------------------------
def stage_names(variables) -> list[str]:
    """'stem', 'stage1', ..., 'stageK' of a variables tree, in order."""
    names = [k for k in variables["params"] if k == "stem" or k.startswith("stage")]
    return sorted(names, key=lambda k: -1 if k == "stem" else int(k[len("stage") :]))


def stage_features(model, variables, images, stages) -> dict:
    """Globally average-pooled outputs of the top-level `stages` of `model` in eval mode (the
    head is skipped): {stage: f32 [B, C]}."""
    out = {}

    def interceptor(next_fun, args, kwargs, context):
        path = context.module.path
        if context.method_name != "__call__" or len(path) != 1:
            return next_fun(*args, **kwargs)
        if path[0] == "head":
            return args[0]
        y = next_fun(*args, **kwargs)
        if path[0] in stages:
            out[path[0]] = jnp.mean(y, axis=tuple(range(1, y.ndim - 1))).astype(jnp.float32)
        return y

    with nn.intercept_methods(interceptor):
        model.apply(variables, images, train=False)
    return out


def load_backbone(config):
    """(model, variables) of `config.init_from`: 'imagenet' (tlx.convert), or a tlx run."""
    if config.init_from == "imagenet":
        from tlx.convert import pretrained

        variables = pretrained.load_pretrained(
            config.model.name, "imagenet", weights_path=config.pretrained_path
        )
    elif config.init_from:
        variables = checkpoint.read_variables(config.init_from)
    else:
        raise ValueError("the advisor needs --init_from: a tlx pre-training run or 'imagenet'")
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    head = variables["params"].get("head", {})
    num_classes = int(head["kernel"].shape[-1]) if "kernel" in head else 1
    model = models.build(config.model.name, num_classes, stem=config.model.stem or None)
    return model, variables


def cache_key(variables, config) -> str:
    """sha256 of the backbone's variables (head left out) x the data config (augmentation and
    data_dir left out) x the model config: the features change when and only when one does."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    backbone = {
        "params": {k: v for k, v in variables["params"].items() if k != "head"},
        "batch_stats": {k: v for k, v in variables["batch_stats"].items() if k != "head"},
    }
    for p, x in jax.tree_util.tree_leaves_with_path(backbone):
        x = np.asarray(x)
        h.update(f"{jax.tree_util.keystr(p)}:{x.dtype}:{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    d = config.data.to_dict()
    d.pop("augment", None), d.pop("data_dir", None)
    h.update(json.dumps([d, config.model.to_dict()], sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def train_features(model, variables, config, dataset, stages, batch_size: int, cache_dir: str):
    """Per-stage features and labels of the **train** split, from the cache when present:
    ({stage: [N, C]}, labels [N], info). One jitted eval pass, padded batches (one compile)."""
    key = cache_key(variables, config)
    path = os.path.join(cache_dir, f"{key}.npz")
    info = {"key": key, "path": path, "hit": os.path.exists(path), "extract_s": 0.0}
    labels = np.asarray(dataset.labels["train"])
    if info["hit"]:
        with np.load(path) as f:
            return {s: f[s] for s in stages}, f["__labels__"], info
    t = time.time()
    fn = compiler.jit(lambda v, x: stage_features(model, v, x, stages))
    chunks = {s: [] for s in stages}
    for batch in dataset.eval_batches("train", batch_size):
        out = jax.device_get(fn(variables, batch["image"]))
        for s in stages:
            chunks[s].append(out[s][batch["mask"] > 0])
    feats = {s: np.concatenate(chunks[s]) for s in stages}
    info["extract_s"] = time.time() - t
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, __labels__=labels, **feats)
    os.replace(tmp, path)  # atomic: a concurrent reader sees all or nothing
    return feats, labels, info


# -- measurements and the rule --------------------------------------------------------------------
def measure(feats: dict, labels, num_classes: int, folds: int, seed: int) -> list[dict]:
    """Per stage: its dimension, the ridge probe's k-fold accuracy and LogME with spreads."""
    rows = []
    for stage, x in feats.items():
        p = probe.cross_validate_ridge(x, labels, num_classes, folds, seed)
        lm = probe.logme_with_spread(x, labels, num_classes, folds, seed)
        rows.append(
            {"stage": stage, "dim": int(x.shape[1]), "probe": p.to_dict(), "logme": lm.to_dict()}
        )
    return rows


def similarity(rows: list[dict], num_classes: int) -> dict:
    """How much of the best stage's probe accuracy the last stage keeps, above chance:
    retained = (acc_last - 1/C) / (acc_best - 1/C). The deepest features are the most specific
    to the source (Yosinski et al. 2014): on a target like the source they are the best
    features, on a different one an earlier stage's are. `similar` = the last stage is within
    one standard error (over folds) of the best (the one-SE rule), so noise decides nothing;
    the tolerance is at least one example of a held-out fold (a probe at 100% on every fold
    has SE 0, and one error more is not a resolvable difference)."""
    acc = np.array([r["probe"]["accuracy"] for r in rows])
    best = int(np.argmax(acc))
    tol = max(rows[best]["probe"]["se"], rows[best]["probe"].get("resolution", 0.0))
    chance = 1.0 / num_classes
    retained = (acc[-1] - chance) / max(acc[best] - chance, 1e-12)
    general = max(i for i in range(len(rows)) if acc[i] >= acc[best] - tol)
    return {
        "retained": float(np.clip(retained, 0.0, 1.0)),
        "best_stage": rows[best]["stage"],
        "deepest_general_stage": rows[general]["stage"],
        "deepest_general_index": general,  # 0 = stem, i = stage i
        "tolerance": float(tol),
        "label": "similar" if general == len(rows) - 1 else "different",
    }


def preset_name(frozen: int, num_stages: int) -> str:
    """tlx's name for freezing the stem and stage1..stage`frozen` of a K-stage backbone
    (freeze_stages semantics: 0 freezes nothing); `num_stages + 1` frozen = linear_probe."""
    if frozen <= 0:
        return "none"
    if frozen > num_stages:
        return "linear_probe"
    if frozen == num_stages - 1:
        return "freeze_most"
    if frozen == 1:
        return "freeze_early"
    return f"freeze_stages={frozen}"


def recommend(sim: dict, per_class: float, num_stages: int) -> dict:
    """tlx's rule, with no parameter fitted on any study:
    1. freeze through the deepest stage whose probe accuracy is within one SE of the best (its
       features serve the target as well as any: general, in Yosinski's sense), so what is
       specific to the source above it trains;
    2. but keep the last stage trainable (at most freeze_most): a fine-tuned top repairs the
       specificity and co-adaptation a frozen one keeps (Yosinski et al. 2014), and fine-tuning
       beats a linear probe in most transfer benchmarks (Kornblith et al. 2019; Kumar et al. 2022);
    3. on a large target (>= LARGE_PER_CLASS per class) one stage fewer: with data enough, the
       seed's table fine-tunes more.
    Few examples make the probe's folds noisy, so step 1's tolerance widens and the rule freezes
    more: size enters through the measurement too."""
    g = sim["deepest_general_index"]
    frozen = min(g, num_stages - 1)
    steps = [f"deepest general stage {sim['deepest_general_stage']} -> freeze {frozen} stages"]
    if g > num_stages - 1:
        steps.append(f"capped at {num_stages - 1}: the last stage stays trainable")
    large = per_class >= LARGE_PER_CLASS
    if large and frozen > 0:
        frozen -= 1
        steps.append(f"large target ({per_class:g} >= {LARGE_PER_CLASS}/class): one fewer")
    name = preset_name(frozen, num_stages)
    return {"strategy": name, "args": cli_args(name), "frozen_stages": frozen, "why": steps}


# -- the depth curve, pre-registered -------------------------------------------------------------
# Written and committed before the freeze-depth benchmark (configs/depth.py) ran, and scored on it
# by experiments/bench_advise.py, which prints this file's last commit. Nothing here was fitted on
# that benchmark: `recommend` is unchanged from the version scored on the quadrant studies, and the
# curve only orders the depths around its choice. Freeze depth d freezes the stem and stage1..d
# (0: nothing, S: every stage, the linear probe), as `recommend`'s `frozen_stages` does.
def depth_curve(advice: dict) -> list[dict]:
    """Per freeze depth 0..S, the advisor's predicted rank (1 = best) and the evidence it has for
    that depth: the ridge probe's k-fold accuracy on the training split of the last frozen
    stage's features (`probe`, None at depth 0, where nothing is frozen) with its SE. The rank
    is by distance from `recommend`'s depth, nearer first, the deeper (cheaper) first on a tie.
    It is a ranking, not an accuracy forecast: the probe of stage d bounds what a frozen prefix
    through d offers a linear head, not what training the stages above it adds."""
    rows = {r["stage"]: r for r in advice["stages"]}
    s = len(advice["stages"]) - 1
    best = advice["recommendation"]["frozen_stages"]
    order = sorted(range(s + 1), key=lambda d: (abs(d - best), -d))
    rank = {d: i + 1 for i, d in enumerate(order)}
    out = []
    for d in range(s + 1):
        r = rows.get(f"stage{d}") if d else None
        out.append(
            {
                "depth": d,
                "rank": rank[d],
                "probe": None if r is None else r["probe"]["accuracy"],
                "probe_se": None if r is None else r["probe"]["se"],
            }
        )
    return out


def probe_depth(advice: dict) -> int:
    """The alternative scored beside `recommend`, also fixed before the benchmark: the deepest
    stage whose probe is within one SE of the best stage's (`similarity`'s one-SE rule), with no
    cap and no size step; the stem's index 0 counts as depth 0."""
    return int(advice["similarity"]["deepest_general_index"])


def logme_depth(advice: dict) -> int:
    """argmax over stages of LogME (You et al. 2021), the transferability baseline: the depth
    whose last frozen stage has the highest evidence; the stem counts as depth 0."""
    scores = [r["logme"]["value"] for r in advice["stages"]]
    scores = [-np.inf if v is None else v for v in scores]  # None: undefined (rank F = N)
    return int(max(range(len(scores)), key=lambda i: scores[i]))


def cli_args(name: str) -> str:
    """A `preset_name` as configs/finetune.py's short args: 'freeze_stages=2' ->
    'strategy=freeze_stages,stages=2' (what --config=configs/finetune.py:...,ARGS takes)."""
    strategy, _, stages = name.partition("=")
    return f"strategy={strategy}" + (f",stages={stages}" if stages else "")


# -- the advisor ----------------------------------------------------------------------------------
def advise(
    config, folds: int = 3, seed: int = 0, batch_size: int = 256, cache_dir: str = ""
) -> dict:
    """The advice for the fine-tuning `config` (its model, init_from and data blocks)."""
    t0 = time.time()
    dataset = tlx_data.load(config.data)
    labels = np.asarray(dataset.labels["train"])
    counts = np.bincount(labels, minlength=dataset.num_classes)
    if counts.min() < folds:
        raise probe.TooFewExamplesError(
            f"target {dataset.name!r} has {counts.min()} training examples in a class, fewer "
            f"than folds={folds}: pass --folds={max(2, int(counts.min()))} or more examples"
        )
    model, variables = load_backbone(config)
    stages = stage_names(variables)
    cache_dir = cache_dir or os.path.join(dataset.data_dir, "tlx_advise")
    t1 = time.time()
    feats, labels, cache = train_features(
        model, variables, config, dataset, stages, batch_size, cache_dir
    )
    t2 = time.time()
    rows = measure(feats, labels, dataset.num_classes, folds, seed)
    sim = similarity(rows, dataset.num_classes)
    per_class = float(counts.mean())
    size = "large" if per_class >= LARGE_PER_CLASS else "small"
    num_stages = len(stages) - 1  # stage1..stageK, besides the stem
    advice = {
        "backbone": config.model.name,
        "init_from": config.init_from,
        "target": dataset.name,
        "num_classes": dataset.num_classes,
        "train_examples": int(len(labels)),
        "examples_per_class": {"mean": per_class, "min": int(counts.min())},
        "folds": folds,
        "seed": seed,
        "stages": rows,
        "similarity": sim,
        "size": size,
        "rule_of_thumb": {
            "similarity": sim["label"],
            "size": size,
            "strategy": strategies.rule_of_thumb(size, sim["label"]),
        },
        "recommendation": recommend(sim, per_class, num_stages),
        "cache": cache,
        "wall_s": {"load": t1 - t0, "features": t2 - t1, "probes": time.time() - t2},
    }
    advice["curve"] = depth_curve(advice)
    advice["wall_s"]["total"] = time.time() - t0
    return advice


def format_table(advice: dict) -> str:
    lines = [
        f"{advice['backbone']} from {advice['init_from']} on {advice['target']}: "
        f"{advice['train_examples']} training examples, {advice['num_classes']} classes, "
        f"{advice['examples_per_class']['mean']:g} per class; {advice['folds']}-fold",
        f"{'stage':<8} {'dim':>5} {'probe acc':>10} {'± std':>7} {'se':>6} {'l2':>8} "
        f"{'LogME':>8} {'± std':>7}",
    ]
    for r in advice["stages"]:
        p, lm = r["probe"], r["logme"]
        lines.append(
            f"{r['stage']:<8} {r['dim']:>5} {100 * p['accuracy']:>10.1f} {100 * p['std']:>7.1f} "
            f"{100 * p['se']:>6.1f} {p['l2']:>8g} {_num(lm['value'], 8)} {_num(lm['std'], 7)}"
        )
    s, rec, rule = advice["similarity"], advice["recommendation"], advice["rule_of_thumb"]
    wall = advice["wall_s"]
    lines += [
        f"similarity: {s['label']} (last stage keeps {100 * s['retained']:.0f}% of the best "
        f"stage's above-chance probe accuracy; best {s['best_stage']}, deepest within "
        f"max(SE, 1 example) = {100 * s['tolerance']:.1f} pp of it: {s['deepest_general_stage']})",
        f"size: {advice['size']} ({advice['examples_per_class']['mean']:g}/class; large >= "
        f"{LARGE_PER_CLASS})",
        f"seed's table ({rule['similarity']}, {rule['size']}): {cli_args(rule['strategy'])}",
        f"tlx recommends: {rec['args']} (frozen stages: {rec['frozen_stages']}; "
        + "; ".join(rec["why"])
        + ")",
        f"wall: {wall['total']:.1f} s (load {wall['load']:.1f} s, features {wall['features']:.1f} s"
        f" (cache {'hit' if advice['cache']['hit'] else 'miss'}), probes {wall['probes']:.1f} s)",
    ]
    return "\n".join(lines)


def _num(v, width: int) -> str:
    return f"{v:>{width}.3f}" if v is not None else f"{'n/a':>{width}}"


def build_config(
    init_from: str,
    backbone: str,
    target: str,
    examples_per_class: int = 0,
    extra: str = "",
    config_file: str = FINETUNE_CONFIG,
):
    """The fine-tuning config of the target, built by the config file's short args."""
    args = (
        f"backbone={backbone},target={target},examples_per_class={examples_per_class},"
        f"init_from={init_from}"
    )
    return tlx_config.load(f"{config_file}:{args}" + (f",{extra}" if extra else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tlx.advise",
        description=__doc__,  # whole: its first line alone stops mid-sentence
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--init_from", required=True, help="a tlx pre-training run or 'imagenet'")
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--examples_per_class", type=int, default=0, help="0: all")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="of the folds")
    ap.add_argument("--args", default="", help="more short args of the config, 'image_size=64'")
    ap.add_argument("--config", default=FINETUNE_CONFIG, help="the fine-tuning config file")
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--cache_dir", default="", help="default: DATA_DIR/tlx_advise")
    ap.add_argument("--out", default="", help="a directory for advice.json")
    a = ap.parse_args(argv)
    try:
        config = build_config(
            a.init_from, a.backbone, a.target, a.examples_per_class, a.args, a.config
        )
        advice = advise(config, a.folds, a.seed, a.batch_size, a.cache_dir)
    except (ValueError, FileNotFoundError) as e:  # TooFewExamplesError is a ValueError
        print(f"tlx.advise: error: {e}", file=sys.stderr)
        return 2
    print(format_table(advice))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "advice.json"), "w") as f:
            json.dump(advice, f, indent=1)
        print(f"wrote {os.path.join(a.out, 'advice.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
