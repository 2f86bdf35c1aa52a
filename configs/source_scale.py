"""Source scale: does pre-training on more FractalDB categories (at equal images) or more images
(at equal categories) transfer better?

  python -m tlx.sweep --config=configs/source_scale.py --workdir=runs/source_scale
  python -m tlx.sweep --config=configs/source_scale.py:tiny --workdir=/tmp/source_scale_tiny

resnet_tiny is pre-trained on each `sources` entry CxN of fractaldb (C categories x N instances
each; the default 10x1000, 100x100, 1000x10 hold 10k images each, and 100x100 against 100x1000
holds the categories fixed), all for the same `pretrain_steps` (equal compute, not equal epochs).
Each source is fine-tuned under each strategy on a similar target (10 classes of tlx's own
`fractals` generator, disjoint from FractalDB's search) and a different one (mnist5k), with
`examples_per_class` per class, over `seeds` seeds; `scratch` adds the from-scratch baseline per
target and seed. FractalDB's finding to read the result against (Kataoka et al. 2020, Table 2):
CIFAR-10 fine-tuning accuracy rises with the number of categories at a fixed total.

Args: sources ('+'-separated CxN), strategies ('+'-separated), scratch, seeds, similar,
different, examples_per_class, steps, pretrain_steps, image_size, batch_size, grid (default:
the configs' own rates | tiny), select (first_seed | cell). Preset `tiny`: seconds per run.
Run in full on 2 CPU cores (README, "Source scale"): 4 pre-trainings of 630-1567 s each and 78
fine-tuning runs of 14-91 s each (`--parallel=2`).
"""

import os

from tlx.study import cell_config, choose_rates, parse_study_arg

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS = {
    "backbone": "resnet_tiny",
    "sources": "10x1000+100x100+1000x10+100x1000",
    "strategies": "none+freeze_early+linear_probe",
    "scratch": True,
    "seeds": 3,
    "similar": "fractals",
    "different": "mnist5k",
    "examples_per_class": 10,
    "steps": 150,
    "pretrain_steps": 1000,
    "image_size": 32,
    "batch_size": 64,
    "grid": "default",
    "select": "first_seed",
}
PRESETS = {
    "tiny": {
        "sources": "3x20+6x10",
        "strategies": "none+linear_probe",
        "scratch": False,
        "seeds": 1,
        "different": "digits",
        "examples_per_class": 5,
        "steps": 6,
        "pretrain_steps": 8,
        "image_size": 16,
        "batch_size": 16,
        "grid": "tiny",
    },
}
# The report (`tlx.study`): strategies compared per source and target (no size axis: no rule of
# thumb), accuracy against frozen depth.
REPORT = {
    "compare": "strategy",
    "plots": [
        {"plot": "accuracy_vs_frozen_stages", "facet": ["target", "similarity"]},
        {"plot": "accuracy_vs_examples_per_class", "facet": ["target", "similarity"]},
        {
            "plot": "learning_curves",
            "facet": ["source", "categories", "images_per_category", "source_images", "target"],
        },
    ],
}


def parse_sources(text: str) -> list[tuple[int, int]]:
    """'10x1000+100x100' -> [(10, 1000), (100, 100)]; a malformed entry is named."""
    out = []
    for item in (s for s in text.split("+") if s):
        c, sep, n = item.partition("x")
        if not (sep and c.isdigit() and n.isdigit() and int(c) > 0 and int(n) > 0):
            raise ValueError(f"source_scale: sources entry {item!r} is not CxN (e.g. 100x100)")
        out.append((int(c), int(n)))
    return out


def lr_grid(strategy: str, grid: str) -> list[dict]:
    if grid == "tiny":
        return [{"optim.head_lr": 1e-2}, {"optim.head_lr": 3e-2}] if strategy != "none" else [{}]
    if grid != "default":
        raise ValueError(f"source_scale: grid must be 'default' or 'tiny', got {grid!r}")
    return [{}]


def _source_overrides(a: dict, categories: int, per_class: int) -> dict:
    return {
        "data.fractaldb.num_classes": categories,
        "data.fractaldb.train_per_class": per_class,
        "data.fractaldb.test_per_class": max(1, min(100, per_class // 10)),
        "data.fractaldb.resolution": a["image_size"],
    }


def get_sweep(arg=None) -> list[dict]:
    a = parse_study_arg(arg, ARGS, PRESETS)
    sources = parse_sources(a["sources"])
    cells = []
    for c, n in sources:
        cells.append(
            {
                "name": f"source/{c}x{n}",
                "config": f"{HERE}/pretrain.py:backbone={a['backbone']},source=fractaldb,"
                f"steps={a['pretrain_steps']},image_size={a['image_size']}"
                + (",batch_size=32" if a["grid"] == "tiny" else ""),
                "overrides": _source_overrides(a, c, n),
            }
        )
    strategies = [s for s in a["strategies"].split("+") if s]
    for similarity, target in (("similar", a["similar"]), ("different", a["different"])):
        finetune = (
            f"{HERE}/finetune.py:backbone={a['backbone']},target={target},"
            f"examples_per_class={a['examples_per_class']},subset_seed=0,steps={a['steps']},"
            f"image_size={a['image_size']},batch_size={a['batch_size']}"
        )
        overrides = {"data.fractals.resolution": a["image_size"]} if target == "fractals" else {}
        runs = [(f"{c}x{n}", c, n, s) for c, n in sources for s in strategies]
        runs += [("none", 0, 0, "scratch")] if a["scratch"] else []
        for source, c, n, strategy in runs:
            for seed in range(a["seeds"]):
                cell = {
                    "name": f"{similarity}/{source}/{strategy}/{seed}",
                    "config": f"{finetune},strategy={strategy},seed={seed}",
                    "overrides": overrides,
                    "axes": {
                        "source": source,
                        "categories": c,
                        "images_per_category": n,
                        "source_images": c * n,
                        "target": target,
                        "similarity": similarity,
                        "strategy": strategy,
                        "seed": seed,
                    },
                }
                if strategy != "scratch":
                    cell["init_from"] = f"source/{source}"
                first = f"{similarity}/{source}/{strategy}/0"
                cells.append(
                    choose_rates(cell, seed, a["select"], first, lr_grid(strategy, a["grid"]))
                )
    return cells


def get_config(arg=None):
    """The config of the study's first fine-tuning cell, without init_from (trains alone)."""
    return cell_config(next(c for c in get_sweep(arg) if not c["name"].startswith("source/")))
