"""The strategy interface: the registry, knobs from short args, a strategy defined outside tlx,
the generic step's loss terms, and configs and run directories written before the interface."""

import csv
import gzip
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlx import checkpoint, models, strategies, sweep, train
from tlx import config as tlx_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
QUIET = {"progress": False, "tensorboard": False, "eval_train": False}


def cfg(spec, **overrides):
    return tlx_config.load(os.path.join(ROOT, spec), **QUIET, **overrides)


# -- registry and knobs ----------------------------------------------------------------------------
def test_every_builtin_strategy_is_registered_with_its_knob_block():
    assert {
        "none", "linear_probe", "freeze_most", "freeze_early", "freeze_stages",
        "gradual_unfreeze", "layer_decay", "lp_ft", "l2_sp", "surgical", "auto_rgn", "scratch",
    } <= set(strategies.names())  # fmt: skip
    c = cfg("configs/finetune.py:strategy=l2_sp")
    assert c.strategy.to_dict() == {
        "name": "l2_sp",
        "l2_sp": {"alpha": 0.1, "beta": 0.01, "form": "loss"},
    }
    assert cfg("configs/finetune.py:strategy=none").strategy.to_dict() == {"name": "none"}


def test_a_knob_is_set_by_its_own_name_or_its_config_path():
    c = cfg("configs/finetune.py:strategy=l2_sp,alpha=0.5,form=proximal")
    assert (c.strategy.l2_sp.alpha, c.strategy.l2_sp.form) == (0.5, "proximal")
    c = cfg("configs/finetune.py:strategy=lp_ft", **{"strategy.lp_ft.lp_fraction": 0.25})
    assert c.strategy.lp_ft.lp_fraction == 0.25


def test_a_knob_of_another_strategy_is_an_error_naming_the_knobs():
    with pytest.raises(ValueError, match=r"unknown config arg 'alpha'.*'lp_ft' knobs.*lp_fraction"):
        cfg("configs/finetune.py:strategy=lp_ft,alpha=0.5")


def test_a_strategy_implies_its_config_defaults_and_explicit_args_win():
    assert cfg("configs/finetune.py:strategy=l2_sp").optim.weight_decay == 0.0
    c = cfg("configs/finetune.py:strategy=scratch,lr=0.003")
    assert (c.optim.lr, c.optim.head_lr) == (0.003, 1e-3)


def test_registering_a_name_twice_needs_replace():
    s = strategies.Strategy("none")
    with pytest.raises(ValueError, match="registered already"):
        strategies.register(s)
    with pytest.raises(ValueError, match="frozen or phases"):
        strategies.register(strategies.Strategy("x", frozen=lambda c: [], phases=lambda c: []))


def test_a_strategy_defined_outside_tlx_trains_with_its_loss_term():
    """A strategy with a loss term only: its gradient is added, nothing else changes."""
    lam = 0.5
    strategies.register(
        strategies.Strategy(
            "test_head_l2",
            loss=lambda ctx: lambda p: 0.5 * lam * jnp.sum(jnp.square(p["head"]["kernel"])),
        ),
        replace=True,
    )
    model = models.build("resnet_tiny", 5)
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
    batch = {"image": x, "label": jnp.arange(8) % 5}
    variables = model.init(jax.random.key(0), x[:1], train=False)
    head = jax.random.normal(jax.random.key(2), variables["params"]["head"]["kernel"].shape)
    variables["params"]["head"]["kernel"] = head  # not zero: the term has a gradient
    out = {}
    for name in ("none", "test_head_l2"):
        c = tlx_config.base()
        tlx_config.set_strategy(c, name)
        c.optim.name, c.optim.momentum, c.optim.weight_decay = "sgd", 0.0, 0.0
        c.optim.schedule, c.optim.lr, c.optim.head_lr = "constant", 0.1, 0.1
        plan = strategies.plan(c, variables)
        state, _ = jax.jit(plan.train_step(model))(plan.init_state(variables), batch)
        out[name] = np.asarray(state["params"]["head"]["kernel"])
    np.testing.assert_allclose(out["test_head_l2"] - out["none"], -0.1 * lam * head, atol=1e-6)


# -- configs and run directories from before the interface ----------------------------------------
def test_every_v1_study_config_migrates_to_the_hash_its_cell_resolves_today():
    """300 configs resolved by the pre-interface code (config v1) for the committed studies and
    the tiny preset: migrated, each hashes to what today's code resolves for the same cell, so
    their finished runs are read, not trained again. A change of a config file's defaults makes
    this fail, as it must: old runs would then no longer be what the study asks for."""
    with gzip.open(os.path.join(DATA, "v1_study_configs.json.gz"), "rt") as f:
        entries = json.load(f)
    cells, old_to_new = {}, {}
    for e in entries:
        by_name = cells.setdefault(
            e["study"], {c.get("name"): c for c in sweep.load_study(_in_root(e["study"]))}
        )
        parent = old_to_new[e["init_run"]] if e["init_run"] else None
        _, today = sweep.resolve(by_name[e["cell"]], e["point"], parent)
        migrated = tlx_config.migrate(e["config"])
        if parent:
            migrated["init_from"] = f"sweep:{parent}"
        assert sweep.config_hash(migrated) == today, (e["study"], e["cell"], e["point"])
        old_to_new.setdefault(e["hash"], today)
    assert len(entries) == 300


def _in_root(spec):
    return os.path.join(ROOT, spec)


def test_freeze_bn_stats_off_migrates_to_the_bn_mode_that_trains_statistics():
    old = {"freeze": {"strategy": "freeze_stages", "stages": 2, "bn": "frozen",
                      "freeze_bn_stats": False, "feature_cache": False}}  # fmt: skip
    new = tlx_config.migrate(old)
    assert new["strategy"] == {"name": "freeze_stages", "freeze_stages": {"stages": 2}}
    assert new["freeze"] == {"bn": "train_stats", "patterns": []}
    assert new["feature_cache"] is False and new["config_version"] == tlx_config.CONFIG_VERSION


def test_a_v1_sweep_directory_is_migrated_and_read_not_trained_again(tmp_path):
    """A tiny quadrants sweep run by the pre-interface code (config.json + summary.json of each
    run): today's sweep renames its runs to today's hashes and trains nothing."""
    work = tmp_path / "tiny"
    shutil.copytree(os.path.join(DATA, "v1_tiny_sweep"), work)
    logs = []
    rows = sweep.run_sweep(_in_root("configs/quadrants.py:tiny"), str(work), log=logs.append)
    assert any("migrated 21 run(s)" in line for line in logs)
    assert "(0 trained, 21 read)" in logs[-1]
    with open(os.path.join(DATA, "v1_tiny_sweep", "results.csv")) as f:
        before = list(csv.DictReader(f))
    timing = {"run", "wall_s", "cell_wall_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in before] == [
        {k: str(v) for k, v in r.items() if k not in timing} for r in rows
    ]
    for run in os.listdir(work / "runs"):  # each keeps its v1 config beside today's
        assert os.path.exists(work / "runs" / run / "config.v1.json")


def test_resuming_a_checkpoint_of_another_structure_is_a_clear_error(tmp_path):
    spec = "configs/finetune.py:target=digits,image_size=16,batch_size=16,steps=4"
    train.run(cfg(spec + ",strategy=layer_decay", checkpoint_every=2), str(tmp_path))
    with pytest.raises(checkpoint.InitError, match=r"cannot resume .*checkpoints/4.*new workdir"):
        train.run(cfg(spec.replace("steps=4", "steps=6") + ",strategy=none"), str(tmp_path))
