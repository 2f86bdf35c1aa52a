"""The seed's 2x2 table measured: target size x similarity to the source, under each strategy.

  python -m tlx.sweep --config=configs/quadrants.py --workdir=runs/quadrants
  python -m tlx.sweep --config=configs/quadrants.py:tiny --workdir=/tmp/quadrants_tiny

resnet_tiny is pre-trained once on 30 fractal classes; each strategy (and training from scratch)
is fine-tuned on a similar target (10 new fractal classes) and a different one (mnist5k), each
small (`small` examples per class) and large (all), over `seeds` seeds. Learning rates (backbone
`lr`, new head `head_lr`) are chosen from a small grid per strategy by validation accuracy: on
the first seed, whose choice the other seeds use (select=first_seed, the default), or on every
seed (select=cell). Test accuracy is that of the chosen rates only.

Args: strategies ('+'-separated; add toolbox ones such as layer_decay+lp_ft when tlx has them),
scratch, seeds, different (mnist5k | digits), small, sizes (small+large | small | large), steps,
pretrain_steps, grid (full | default: the configs' own rates only), select (cell: every cell
picks its own rates | first_seed: the first seed's choice is used by the other seeds). The
preset `tiny` is a seconds-long version for tests and notebooks: `configs/quadrants.py:tiny`
or `configs/quadrants.py:tiny,seeds=3`.
"""

import os

from tlx.study import cell_config, choose_rates, parse_study_arg

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS = {
    "backbone": "resnet_tiny",
    "strategies": "none+freeze_early+freeze_most+linear_probe",
    "scratch": True,
    "seeds": 3,
    "similar": "fractals",
    "different": "mnist5k",
    "small": 10,
    "sizes": "small+large",  # '+'-separated: which target sizes to run (small = `small` per class)
    "steps": 150,
    "batch_size": 64,
    "pretrain_steps": 300,
    "image_size": 32,
    "grid": "full",
    # first_seed: the grid runs at seed 0 and the other seeds train at its choice (93 runs);
    # cell: every seed chooses for itself (157 runs, about 1.7 times the time).
    "select": "first_seed",
}
PRESETS = {
    "tiny": {
        "strategies": "none+linear_probe",
        "scratch": False,
        "seeds": 2,
        "different": "digits",
        "small": 5,
        "steps": 8,
        "batch_size": 16,
        "pretrain_steps": 12,
        "image_size": 16,
        "grid": "tiny",
        "select": "first_seed",
    },
}
# The tiny preset's fractals: few classes, few images, rendered at the model's resolution.
TINY_FRACTALS = {
    "data.fractals.train_per_class": 20,
    "data.fractals.test_per_class": 10,
    "data.fractals.resolution": 16,
}


TARGET_CLASSES = 10  # both targets: 10 new fractal classes, and mnist5k / digits
# The report (`tlx.study`: compare, rule_of_thumb, plots): strategies compared per quadrant, the
# winners against the rule of thumb, accuracy against frozen depth and against examples per class.
REPORT = {
    "compare": "strategy",
    "rule_of_thumb": True,
    "plots": [
        {"plot": "winner_heatmap", "rows": "size", "cols": "similarity"},
        {"plot": "accuracy_vs_frozen_stages", "facet": ["target", "similarity"], "hue": "size"},
        {"plot": "accuracy_vs_examples_per_class", "facet": ["target", "similarity"]},
        {"plot": "learning_curves", "facet": ["target", "size"]},
    ],
}


def lr_grid(strategy: str, grid: str) -> list[dict]:
    """Learning rates a cell chooses from. A new head needs a larger LR than pre-trained layers
    (the pilot's linear probe gained 23-40 pp from head_lr 1e-3 -> 1e-2); scratch has one LR."""
    if grid == "default":
        return [{}]
    if grid == "tiny":  # two candidates for one strategy: the choice is exercised, cheaply
        return [{"optim.head_lr": 1e-2}, {"optim.head_lr": 3e-2}] if strategy != "none" else [{}]
    if strategy == "scratch":
        return [{"optim.lr": lr, "optim.head_lr": lr} for lr in (1e-3, 3e-3)]
    if strategy == "linear_probe":  # the backbone LR does nothing here
        return [{"optim.head_lr": h} for h in (1e-2, 3e-2)]
    # Around the pilot's (3e-4, 1e-2), one step along each rate: 3 runs where a 2x2 grid takes 4
    # (the full study must fit 90 minutes on 2 cores).
    return [
        {"optim.lr": 3e-4, "optim.head_lr": 1e-2},
        {"optim.lr": 1e-3, "optim.head_lr": 1e-2},
        {"optim.lr": 3e-4, "optim.head_lr": 3e-3},
    ]


def conditions(a: dict) -> list[dict]:
    """The four quadrants (or those of `sizes`): (target, similarity, size, examples_per_class)."""
    unknown = set(a["sizes"].split("+")) - {"small", "large"}
    if unknown:
        raise ValueError(
            f"quadrants: unknown sizes {sorted(unknown)}; use small+large, small or large"
        )
    n_small = a["small"] * TARGET_CLASSES
    if "small" in a["sizes"].split("+") and n_small < a["batch_size"]:
        raise ValueError(
            f"quadrants: small={a['small']} gives {n_small} training images on the "
            f"{TARGET_CLASSES}-class targets, fewer than batch_size={a['batch_size']}; "
            f"pass batch_size={n_small} (or less) with it"
        )
    return [
        {"target": t, "similarity": sim, "size": size, "examples_per_class": k}
        for sim, t in (("similar", a["similar"]), ("different", a["different"]))
        for size, k in (("small", a["small"]), ("large", 0))
        if size in a["sizes"].split("+")
    ]


def _finetune_spec(a: dict, q: dict, strategy: str, seed: int) -> str:
    return (
        f"{HERE}/finetune.py:backbone={a['backbone']},target={q['target']},"
        f"strategy={strategy},"
        f"examples_per_class={q['examples_per_class']},subset_seed=0,steps={a['steps']},seed={seed},"
        f"image_size={a['image_size']},batch_size={a['batch_size']}"
    )


def _overrides(a: dict, tiny: bool, role: str) -> dict:
    if not tiny:
        return {}
    out = dict(TINY_FRACTALS)
    # 10 target classes, as many as digits: both targets share compiled steps.
    out["data.fractals.num_classes"] = 6 if role == "source" else 10
    out["eval_batch_size"] = 64
    return out


def get_sweep(arg=None) -> list[dict]:
    a = parse_study_arg(arg, ARGS, PRESETS)
    tiny = a["grid"] == "tiny"
    strategies = [s for s in a["strategies"].split("+") if s]
    strategies += ["scratch"] if a["scratch"] else []
    cells = [
        {
            "name": "source",
            "config": f"{HERE}/pretrain.py:backbone={a['backbone']},source=fractals,"
            f"steps={a['pretrain_steps']},image_size={a['image_size']}"
            + (",batch_size=32" if tiny else ""),
            "overrides": _overrides(a, tiny, "source"),
        }
    ]
    for q in conditions(a):
        target_overrides = _overrides(a, tiny, "target") if q["target"] == "fractals" else {}
        if tiny and q["target"] != "fractals":
            target_overrides = {"eval_batch_size": 64}
        for strategy in strategies:
            for seed in range(a["seeds"]):
                name = f"{q['similarity']}/{q['size']}/{strategy}/{seed}"
                cell = {
                    "name": name,
                    "config": _finetune_spec(a, q, strategy, seed),
                    "overrides": target_overrides,
                    "axes": {**q, "strategy": strategy, "seed": seed},
                }
                if strategy != "scratch":
                    cell["init_from"] = "source"
                first = f"{q['similarity']}/{q['size']}/{strategy}/0"
                grid = lr_grid(strategy, a["grid"])
                cells.append(choose_rates(cell, seed, a["select"], first, grid))
    return cells


def get_config(arg=None):
    """The fine-tuning config shared by the study's cells (its first cell, without init_from):
    what `python -m tlx.main --config=configs/quadrants.py` would train alone."""
    return cell_config(get_sweep(arg)[1])
