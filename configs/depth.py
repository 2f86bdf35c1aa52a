"""The freeze-depth benchmark: fine-tuned accuracy at every freeze depth of an ImageNet backbone,
over real targets, target sizes and seeds, with the learning rate chosen on validation.

  python -m tlx.sweep --config=configs/depth.py --workdir=runs/depth
  python -m tlx.sweep --config=configs/depth.py:tiny --workdir=/tmp/depth_tiny

Depth k freezes the stem and stage1..stagek (`tlx.models.frozen_at_depth`; 0 trains everything,
S = `tlx.models.max_depth` is the linear probe), through `strategy=freeze_stages,stages=k`; plus
the same run from a random init (`scratch`) at the same step budget. Nothing augments, so every
depth >= 1 trains on the frozen prefix's cached output (tlx.features), which is what makes the
sweep affordable on a CPU.

Protocol, per (target, size):
- seeds redraw the training subset (`subset_seed` follows `seed`), so the spread over seeds
  covers which examples a user has, not only the initialisation and batch order;
- the validation split is what a user with `size` examples per class could also hold out: `size`
  per class drawn from the val carve, capped by what the carve holds (`val_cap`), redrawn per
  seed; the test split is the dataset's own, whole;
- each (target, size, depth) chooses its learning rates from a 3-point grid on seed 0's
  validation accuracy, and the other seeds train at that choice (select=first_seed) or choose
  their own (select=cell); test accuracy is only ever read at the chosen rates.

Args: backbone, targets ('+'-separated), sizes ('+'-separated per class; 0 = all), depths
('+'-separated, default every depth 0..S), scratch, seeds, steps, batch_size, image_size, select.
Sizes larger than a target's training pool run at its whole pool (lfw_subset has 72 per class).
"""

import os

from tlx import models
from tlx.study import cell_config, choose_rates, parse_study_arg

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS = {
    "backbone": "mobilenet_v2",
    "init_from": "imagenet",
    "targets": "fashion_mnist+mnist5k+digits+lfw_subset",
    "sizes": "10+100",
    "depths": "all",
    "scratch": True,
    "seeds": 3,
    "steps": 100,
    "batch_size": 32,
    "image_size": 64,
    "select": "first_seed",
}
PRESETS = {
    # Seconds: two depths of resnet_tiny from a random "pre-training" (init_from=''), on digits.
    "tiny": {
        "backbone": "resnet_tiny",
        "init_from": "",
        "targets": "digits",
        "sizes": "5",
        "depths": "0+3",
        "scratch": False,
        "seeds": 2,
        "steps": 6,
        "batch_size": 16,
        "image_size": 16,
    },
}
# Per class in each target's training pool and val carve (data.val_fraction = 0.1): a size is
# capped by the first, the validation split by the second.
# The report (tlx.report): depths compared within each (target, size); tlx.report.depth's tables.
REPORT = {"compare": "depth", "plots": [{"plot": "depth_benchmark"}]}
POOL = {"fashion_mnist": 5400, "mnist5k": 360, "digits": 125, "lfw_subset": 72}
VAL_CAP = {"fashion_mnist": 600, "mnist5k": 40, "digits": 14, "lfw_subset": 8}
CLASSES = {"fashion_mnist": 10, "mnist5k": 10, "digits": 10, "lfw_subset": 2}


def lr_grid(depth, grid: str = "full") -> list[dict]:
    """Three rates around tlx's defaults, one step of ~3x either side, so a choice can land
    inside the grid: the backbone's `lr` for a fine-tuned one (the head keeps 1e-2), the head's
    for the linear probe, one rate for scratch."""
    if grid == "tiny":
        return [{"optim.lr": 3e-4}, {"optim.lr": 1e-3}]
    # A pilot of the first cells (fashion_mnist, 10/class, depths 0-1) chose the top of
    # (1e-4, 3e-4, 1e-3) at 100 steps, so the fine-tuning grid starts at 3e-4.
    if depth == "scratch":
        return [{"optim.lr": r, "optim.head_lr": r} for r in (1e-3, 3e-3, 1e-2)]
    if depth == "probe":
        return [{"optim.head_lr": r} for r in (3e-3, 1e-2, 3e-2)]
    return [{"optim.lr": r} for r in (3e-4, 1e-3, 3e-3)]


def sizes_of(a: dict, target: str) -> list[int]:
    """The per-class sizes run on `target`: 0 (all) for a size its pool does not hold."""
    out = []
    for s in (int(x) for x in a["sizes"].split("+") if x):
        s = 0 if s == 0 or s >= POOL.get(target, 10**9) else s
        if s not in out:
            out.append(s)
    return out


def depths_of(a: dict) -> list[int]:
    s = models.max_depth(a["backbone"])
    if a["depths"] == "all":
        return list(range(s + 1))
    depths = [int(d) for d in a["depths"].split("+") if d]
    bad = [d for d in depths if not 0 <= d <= s]
    if bad:
        raise ValueError(f"depth: depths {bad} out of range for {a['backbone']}; use 0..{s}")
    return depths


def _spec(a: dict, target: str, size: int, strategy: str, seed: int) -> str:
    val = min(size, VAL_CAP.get(target, size)) if size else 0
    init = "" if strategy.startswith("scratch") else a["init_from"]
    # A batch no larger than the training set (lfw_subset at 10/class has 20 images).
    batch = min(a["batch_size"], size * CLASSES.get(target, 10)) if size else a["batch_size"]
    return (
        f"{HERE}/finetune.py:backbone={a['backbone']},init_from={init},target={target},"
        f"strategy={strategy},examples_per_class={size},val_per_class={val},"
        f"steps={a['steps']},seed={seed},image_size={a['image_size']},"
        f"batch_size={batch},augment=false"
    )


def get_sweep(arg=None) -> list[dict]:
    a = parse_study_arg(arg, ARGS, PRESETS)
    if a["select"] not in ("first_seed", "cell"):
        raise ValueError(f"depth: select={a['select']!r}; use first_seed or cell")
    tiny = a["steps"] < 20
    s = models.max_depth(a["backbone"])
    conditions = [(d, f"freeze_stages,stages={d}") for d in depths_of(a)]
    conditions += [("scratch", "scratch")] if a["scratch"] else []
    cells = []
    for target in (t for t in a["targets"].split("+") if t):
        for size in sizes_of(a, target):
            for depth, strategy in conditions:
                kind = "probe" if depth == s else depth
                for seed in range(a["seeds"]):
                    name = f"{target}/{size}/{depth}/{seed}"
                    cell = {
                        "name": name,
                        "config": _spec(a, target, size, strategy, seed),
                        "overrides": {"eval_batch_size": 64} if tiny else {},
                        "axes": {
                            "target": target,
                            "size": size,
                            "depth": depth,
                            "max_depth": s,
                            "seed": seed,
                        },
                    }
                    grid = lr_grid(kind, "tiny" if tiny else "full")
                    first = f"{target}/{size}/{depth}/0"
                    cells.append(choose_rates(cell, seed, a["select"], first, grid))
    return cells


def get_config(arg=None):
    """The fine-tuning config of the study's first cell: what `python -m tlx.main
    --config=configs/depth.py` would train alone."""
    return cell_config(get_sweep(arg)[0])
