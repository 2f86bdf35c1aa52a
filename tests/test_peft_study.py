"""The PEFT study's cells (configs/peft.py): the quadrants under freezing and parameter-efficient
strategies from one pre-trained ViT, each cell a valid config, and the learning-rate grids."""

import itertools
import os

import pytest

from tlx import config as tlx_config
from tlx import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.path.join(ROOT, "configs/peft.py")
STRATEGIES = (
    "linear_probe",
    "freeze_most",
    "none",
    "lora",
    "bitfit",
    "adapter",
    "vpt",
    "vpt_deep",
)
QUADRANTS = list(itertools.product(("similar", "different"), ("small", "large")))


@pytest.fixture(scope="module")
def study():
    return tlx_config.load_module(PATH, "study")


def test_the_default_study_is_a_source_then_4_quadrants_by_8_strategies_by_3_seeds(study):
    cells = study.get_sweep()
    assert len(cells) == 1 + 4 * 8 * 3
    assert len({c["name"] for c in cells}) == len(cells)
    source, *runs = cells
    assert source["name"] == "source" and "init_from" not in source and "axes" not in source
    assert "pretrain.py:backbone=vit_ti4,source=fractals,steps=1000," in source["config"]
    assert {c["init_from"] for c in runs} == {"source"}
    assert {frozenset(c["axes"]) for c in runs} == {
        frozenset({"target", "similarity", "size", "examples_per_class", "strategy", "seed"})
    }
    got = [tuple(c["axes"][k] for k in ("similarity", "size", "strategy", "seed")) for c in runs]
    assert sorted(got) == sorted(
        (sim, size, st, seed)
        for (sim, size), st, seed in itertools.product(QUADRANTS, STRATEGIES, range(3))
    )
    for c in runs:  # select=first_seed: seeds 1 and 2 train at seed 0's choice
        a = c["axes"]
        if a["seed"] == 0:
            assert "grid" in c and "grid_from" not in c
        else:
            assert c["grid_from"] == f"{a['similarity']}/{a['size']}/{a['strategy']}/0"
            assert "grid" not in c


@pytest.mark.parametrize("arg", ["tiny", None])
def test_every_cell_resolves_to_a_valid_vit_ti4_config_at_every_grid_point(study, arg):
    spec = PATH + (f":{arg}" if arg else "")
    cells = sweep.load_study(spec)
    assert len(cells) == 1 + 4 * 8 * (2 if arg == "tiny" else 3)
    sweep.check_configs(cells)  # what run_sweep does before any training: raises on a bad one
    for c in cells:
        config, _ = sweep.resolve(c, (c.get("grid") or [{}])[0], "0" * 12 if "axes" in c else None)
        assert config.model.name == "vit_ti4"


def test_vpt_deep_is_vpt_with_deep_prompts(study):
    a = dict(study.ARGS)
    assert study.strategy_arg("vpt_deep", a) == "strategy=vpt,prompts=10,deep=true"
    assert study.strategy_arg("vpt", a) == "strategy=vpt,prompts=10"
    assert study.strategy_arg("lora", a) == "strategy=lora,rank=8"
    assert study.strategy_arg("freeze_most", a) == "strategy=freeze_most"
    cells = {c["name"]: c for c in study.get_sweep("tiny")}
    deep = sweep.resolve(cells["similar/small/vpt_deep/0"], {}, "0" * 12)[0]
    shallow = sweep.resolve(cells["similar/small/vpt/0"], {}, "0" * 12)[0]
    assert (deep.strategy.name, deep.strategy.vpt.deep) == ("vpt", True)
    assert deep.strategy.vpt.prompts == 2  # the tiny preset's
    assert (shallow.strategy.name, shallow.strategy.vpt.deep) == ("vpt", False)


def test_an_unknown_strategy_is_named(study):
    with pytest.raises(ValueError, match=r"unknown strategies \['dora'\]"):
        study.get_sweep("strategies=lora+dora")


def test_an_unknown_grid_is_named(study):
    with pytest.raises(ValueError, match="grid must be full, default or tiny, got 'huge'"):
        study.get_sweep("grid=huge")


def test_peft_strategies_choose_the_rate_of_what_they_train_with_the_head_at_1e_2(study):
    for strategy in ("lora", "bitfit", "adapter", "vpt", "vpt_deep"):
        assert study.lr_grid(strategy, "full") == [
            {"optim.lr": 1e-3, "optim.head_lr": 1e-2},
            {"optim.lr": 3e-3, "optim.head_lr": 1e-2},
            {"optim.lr": 1e-2, "optim.head_lr": 1e-2},
        ]
    assert study.lr_grid("linear_probe", "full") == [
        {"optim.head_lr": 1e-2},
        {"optim.head_lr": 3e-2},
    ]
    # freezing presets and full fine-tuning: the quadrants study's grid
    assert study.lr_grid("none", "full") == study.QUADRANTS.lr_grid("none", "full")
    assert len(study.lr_grid("freeze_most", "full")) == 3
    cells = {c["name"]: c for c in study.get_sweep()}
    assert cells["different/large/adapter/0"]["grid"] == study.lr_grid("adapter", "full")
    assert len(cells["similar/small/linear_probe/0"]["grid"]) == 2
    # The tiny grid too varies what a probe trains, the head's rate, not the unused backbone's.
    probe = [{"optim.head_lr": 1e-2}, {"optim.head_lr": 3e-2}]
    assert study.lr_grid("linear_probe", "tiny") == probe
    assert study.lr_grid("lora", "tiny") == [{"optim.lr": 1e-3}, {"optim.lr": 3e-3}]
