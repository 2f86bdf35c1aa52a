"""Parameter-efficient fine-tuning against freezing, on a ViT: the seed's quadrants under
linear_probe, freeze_most, full fine-tuning, LoRA, BitFit, adapters and VPT.

  python -m tlx.sweep --config=configs/peft.py --workdir=runs/peft
  python -m tlx.sweep --config=configs/peft.py:tiny --workdir=/tmp/peft_tiny

`backbone` (vit_ti4: ViT-Ti, patch 4, average pooling, 5.4M parameters) is pre-trained on 30
fractal classes for `pretrain_steps`; each strategy is then fine-tuned on the targets of
configs/quadrants.py (similar: 10 new fractal classes; different: mnist5k; small: `small`
examples per class, large: all) over `seeds` seeds. The strategies: linear_probe (the head only),
freeze_most (all but the last stage, i.e. the last 3 of 12 encoder blocks), none (everything),
lora (rank `lora_rank` factors on query/key/value/out, Hu et al. 2021), bitfit (biases and
LayerNorms, Ben Zaken et al. 2022), adapter (Houlsby bottleneck of width `adapter_dim` after
attention and MLP), vpt (`prompts` prompt tokens at the first block's input, VPT-shallow) and
vpt_deep (at every block's input, VPT-deep; Jia et al. 2022); the head trains in all of them.
Learning rates (`lr`: everything trained but the head, i.e. the backbone, or the factors,
adapters, biases or prompts; `head_lr`: the new head) are chosen from a grid per strategy by
validation accuracy, on the first seed (select=first_seed) or on every seed (select=cell).

Each run's summary.json holds `params_trainable` and `params_frozen` (results.csv too); the report
(`tlx.report`) adds the trained share of the model's parameters per strategy and plots test
accuracy against it (plots/accuracy_vs_trained_fraction.png).

Args: strategies ('+'-separated, from those above), seeds, similar, different (mnist5k | digits),
small, sizes (small+large | small | large), steps, pretrain_steps, image_size, batch_size,
lora_rank, adapter_dim, prompts, grid (full | default: the configs' own rates | tiny), select
(first_seed | cell). Preset `tiny`: a few steps at 16 px, for tests (which swap in a 4-block ViT
with backbone=...); from the command line it runs vit_ti4 itself, in minutes.
"""

import os

from tlx import config as tlx_config
from tlx.study import cell_config, choose_rates, parse_study_arg

HERE = os.path.dirname(os.path.abspath(__file__))
QUADRANTS = tlx_config.load_module(os.path.join(HERE, "quadrants.py"), "study")
ARGS = {
    "backbone": "vit_ti4",
    "strategies": "linear_probe+freeze_most+none+lora+bitfit+adapter+vpt+vpt_deep",
    "seeds": 3,
    "similar": "fractals",
    "different": "mnist5k",
    "small": 10,
    "sizes": "small+large",
    "steps": 150,
    "batch_size": 64,
    "pretrain_steps": 1000,
    "image_size": 32,
    "lora_rank": 8,
    "adapter_dim": 8,
    "prompts": 10,
    "grid": "full",
    "select": "first_seed",
}
PRESETS = {
    "tiny": {
        "seeds": 2,
        "different": "digits",
        "small": 5,
        "steps": 6,
        "batch_size": 16,
        "pretrain_steps": 8,
        "image_size": 16,
        "lora_rank": 2,
        "adapter_dim": 4,
        "prompts": 2,
        "grid": "tiny",
    },
}
# Freezing presets and full fine-tuning: the quadrants study's rates. The parameter-efficient
# strategies train new or few parameters from their init (zero B, zero up-projection, random
# prompts), which their papers train at larger rates than pre-trained weights (LoRA on ViT-B
# 1e-3 to 5e-3 with Adam, VPT's prompts at SGD base rates of 0.1 and more).
PEFT = ("lora", "bitfit", "adapter", "vpt", "vpt_deep")
# The quadrants study's report, and test accuracy against the trained share of the parameters.
REPORT = {
    **QUADRANTS.REPORT,
    "plots": [
        *QUADRANTS.REPORT["plots"][:-1],
        {"plot": "accuracy_vs_trained_fraction", "facet": ["similarity", "size"]},
        QUADRANTS.REPORT["plots"][-1],
    ],
}


def strategy_arg(name: str, a: dict) -> str:
    """The finetune.py args of a study strategy ('vpt_deep' -> 'strategy=vpt,...,deep=true')."""
    return {
        "lora": f"strategy=lora,rank={a['lora_rank']}",
        "adapter": f"strategy=adapter,dim={a['adapter_dim']}",
        "vpt": f"strategy=vpt,prompts={a['prompts']}",
        "vpt_deep": f"strategy=vpt,prompts={a['prompts']},deep=true",
    }.get(name, f"strategy={name}")


def lr_grid(strategy: str, grid: str) -> list[dict]:
    """Learning rates a cell chooses from (3 candidates, 2 for the linear probe)."""
    if grid == "default":
        return [{}]
    if grid == "tiny":  # two candidates: the choice is exercised, cheaply
        if strategy == "linear_probe":  # the backbone LR does nothing here
            return [{"optim.head_lr": 1e-2}, {"optim.head_lr": 3e-2}]
        return [{"optim.lr": 1e-3}, {"optim.lr": 3e-3}]
    if grid != "full":
        raise ValueError(f"peft: grid must be full, default or tiny, got {grid!r}")
    if strategy == "linear_probe":  # the backbone LR does nothing here
        return [{"optim.head_lr": h} for h in (1e-2, 3e-2)]
    if strategy in PEFT:
        return [{"optim.lr": lr, "optim.head_lr": 1e-2} for lr in (1e-3, 3e-3, 1e-2)]
    return QUADRANTS.lr_grid(strategy, "full")


def _overrides(a: dict, tiny: bool, role: str, target: str) -> dict:
    out = {"eval_batch_size": 64} if tiny else {}
    if target == "fractals":
        out["data.fractals.resolution"] = a["image_size"]
        if tiny:
            out.update(QUADRANTS.TINY_FRACTALS, **{"data.fractals.resolution": a["image_size"]})
            out["data.fractals.num_classes"] = 6 if role == "source" else 10
    return out


def get_sweep(arg=None) -> list[dict]:
    a = parse_study_arg(arg, ARGS, PRESETS)
    tiny = a["grid"] == "tiny"
    strategies = [s for s in a["strategies"].split("+") if s]
    known = ("linear_probe", "freeze_most", "none", "freeze_early", *PEFT)
    unknown = [s for s in strategies if s not in known]
    if unknown:
        raise ValueError(f"peft: unknown strategies {unknown}; use some of {'+'.join(known)}")
    cells = [
        {
            "name": "source",
            "config": f"{HERE}/pretrain.py:backbone={a['backbone']},source=fractals,"
            f"steps={a['pretrain_steps']},image_size={a['image_size']}"
            + (",batch_size=32" if tiny else ""),
            "overrides": _overrides(a, tiny, "source", "fractals"),
        }
    ]
    for q in QUADRANTS.conditions(a):
        for strategy in strategies:
            for seed in range(a["seeds"]):
                cell = {
                    "name": f"{q['similarity']}/{q['size']}/{strategy}/{seed}",
                    "config": f"{HERE}/finetune.py:backbone={a['backbone']},"
                    f"target={q['target']},{strategy_arg(strategy, a)},"
                    f"examples_per_class={q['examples_per_class']},subset_seed=0,steps={a['steps']},"
                    f"seed={seed},image_size={a['image_size']},batch_size={a['batch_size']}",
                    "overrides": _overrides(a, tiny, "target", q["target"]),
                    "init_from": "source",
                    "axes": {**q, "strategy": strategy, "seed": seed},
                }
                first = f"{q['similarity']}/{q['size']}/{strategy}/0"
                cells.append(
                    choose_rates(cell, seed, a["select"], first, lr_grid(strategy, a["grid"]))
                )
    return cells


def get_config(arg=None):
    """The config of the study's first fine-tuning cell, without init_from (trains alone)."""
    return cell_config(get_sweep(arg)[1])
