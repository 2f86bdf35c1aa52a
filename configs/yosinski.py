"""Transfer by cut layer, in miniature (Yosinski et al. 2014, "How transferable are features").

  python -m tlx.sweep --config=configs/yosinski.py --workdir=runs/yosinski
  python -m tlx.sweep --config=configs/yosinski.py:tiny --workdir=/tmp/yosinski_tiny

The fractal classes split into two disjoint halves, A (classes 0..K-1) and B (K..2K-1); base
nets baseA and baseB (resnet_tiny) are trained on each. Then, on B, for each cut n (the first n
of the blocks stem, stage1, stage2, stage3 are copied; the blocks above and the head are
re-initialised with the model's initialiser and trained):
  BnB   copied from baseB, frozen         BnB+  copied from baseB, fine-tuned
  AnB   copied from baseA, frozen         AnB+  copied from baseA, fine-tuned
  random_frozen  the first n blocks random and frozen (the control: what frozen depth costs
                 without any transfer)
over `seeds` seeds. Re-initialised leaves learn at `head_lr`, copied ones at `lr`; each cell
picks them from a small grid by validation accuracy (select=first_seed: the first seed picks for
the others). The BatchNorm statistics of frozen blocks stay frozen.

Args: classes (per half), train_per_class, base_steps, steps, cuts ('+'-separated), treatments
('/'-separated), seeds, grid (full | default | tiny), select (cell | first_seed); preset `tiny`.
"""

import os

from tlx.study import cell_config, choose_rates, parse_study_arg

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCKS = ("stem", "stage1", "stage2", "stage3")  # resnet_tiny, in network order
TREATMENTS = ("BnB", "BnB+", "AnB", "AnB+", "random_frozen")
# The report (`tlx.study`): treatments compared per cut; accuracy against the cut, with baseB
# (the base net trained on the target half) as the reference line.
REPORT = {
    "compare": "treatment",
    "plots": [
        {
            "plot": "accuracy_vs_axis",
            "x": "cut",
            "xlabel": "stages copied from the base net (n)",
            "references": ["baseB"],
        },
        {"plot": "learning_curves", "facet": ["cut"]},
    ],
}
# Sized for < 45 min on 2 CPU cores: 82 runs. 16x16 images cost a quarter of 32x32 ones (the
# 40 transfer runs that fine-tune everything would take about 40 min alone at 32x32); 20 classes
# with 54 training images each, to keep B's accuracy off the ceiling (with 108 per class baseB
# reached 98.7%, where little can be seen to transfer or not).
ARGS = {
    "classes": 20,
    "train_per_class": 60,
    "test_per_class": 50,
    "resolution": 16,
    "base_steps": 300,
    "steps": 120,
    "batch_size": 64,
    "cuts": "1+2+3+4",
    "treatments": "/".join(TREATMENTS),  # '/'-separated: the names hold '+'
    "seeds": 3,
    "grid": "full",
    "select": "first_seed",
}
PRESETS = {
    "tiny": {
        "classes": 3,
        "train_per_class": 20,
        "test_per_class": 10,
        "resolution": 16,
        "base_steps": 12,
        "steps": 6,
        "batch_size": 16,
        "cuts": "1+4",
        "seeds": 2,
        "grid": "tiny",
        "select": "first_seed",
    },
}


def lr_grid(treatment: str, grid: str) -> list[dict]:
    if grid == "default":
        return [{}]
    if grid == "tiny":
        return [{"optim.head_lr": 3e-3}, {"optim.head_lr": 1e-2}]
    if treatment.endswith("+"):  # copied blocks fine-tuned: both rates matter
        return [{"optim.lr": lr, "optim.head_lr": 3e-3} for lr in (3e-4, 1e-3)]
    return [{"optim.head_lr": h} for h in (3e-3, 1e-2)]  # only re-initialised leaves train


def _data(a: dict, half: str) -> dict:
    """Overrides that make a run's data the half `half` ('A' or 'B') of the fractal classes."""
    return {
        "data.fractals.num_classes": a["classes"],
        "data.fractals.class_offset": 0 if half == "A" else a["classes"],
        "data.fractals.train_per_class": a["train_per_class"],
        "data.fractals.test_per_class": a["test_per_class"],
        "data.fractals.resolution": a["resolution"],
        "data.image_size": a["resolution"],
    }


def get_sweep(arg=None) -> list[dict]:
    a = parse_study_arg(arg, ARGS, PRESETS)
    base = (
        f"{HERE}/pretrain.py:backbone=resnet_tiny,source=fractals,classes={a['classes']},"
        f"steps={a['base_steps']},image_size={a['resolution']}"
        + (f",batch_size={2 * a['batch_size']}" if a["grid"] == "tiny" else "")
    )
    cells = [
        {"name": "baseA", "config": base, "overrides": _data(a, "A")},
        {"name": "baseB", "config": base, "overrides": _data(a, "B")},
    ]
    cuts = [int(n) for n in a["cuts"].split("+") if n]
    if not all(1 <= n <= len(BLOCKS) for n in cuts):
        raise ValueError(f"cuts={a['cuts']}: each n copies the first n of {BLOCKS}, 1..4")
    treatments = [t for t in a["treatments"].split("/") if t]
    unknown = set(treatments) - set(TREATMENTS)
    if unknown:
        raise ValueError(f"unknown treatments {sorted(unknown)}; use {TREATMENTS}")
    for n in cuts:
        copied, above = BLOCKS[:n], BLOCKS[n:]
        for t in treatments:
            for seed in range(a["seeds"]):
                reinit = [f"^{b}/" for b in (BLOCKS if t == "random_frozen" else above)]
                frozen = [] if t.endswith("+") else [f"^{b}/" for b in copied]
                cell = {
                    "name": f"{t}/{n}/{seed}",
                    "config": f"{HERE}/finetune.py:backbone=resnet_tiny,target=fractals,"
                    f"classes={a['classes']},steps={a['steps']},seed={seed},"
                    f"image_size={a['resolution']},batch_size={a['batch_size']},strategy=none",
                    "overrides": {
                        **_data(a, "B"),
                        "init_reinit": ["^head/", *reinit],
                        "init_reinit_init": "init",
                        "freeze.patterns": frozen,
                    },
                    # random_frozen loads nothing (every block is re-initialised); starting
                    # "from" baseA puts its trained blocks in the same LR group as AnB's.
                    "init_from": "baseB" if t.startswith("B") else "baseA",
                    "axes": {"treatment": t, "cut": n, "seed": seed},
                }
                grid = lr_grid(t, a["grid"])
                cells.append(choose_rates(cell, seed, a["select"], f"{t}/{n}/0", grid))
    return cells


def get_config(arg=None):
    """The config of the study's first transfer cell, without init_from (trains alone)."""
    return cell_config(get_sweep(arg)[2])
