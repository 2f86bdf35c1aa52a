"""The train loop end to end: run-directory contract, resume, init_from, and that transfer works."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tlx import checkpoint, train
from tlx import config as tlx_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_FRACTALS = {
    "data.fractals.num_classes": 6,
    "data.fractals.train_per_class": 40,
    "data.fractals.test_per_class": 10,
}


def cfg(spec, **overrides):
    return tlx_config.load(os.path.join(ROOT, spec), progress=False, tensorboard=False, **overrides)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    c = cfg("configs/pretrain.py:steps=60,batch_size=32", eval_every=30, **SMALL_FRACTALS)
    summary = train.run(c, workdir)
    return workdir, summary


def test_run_directory_contract(pretrained):
    workdir, summary = pretrained
    for key in ("test_accuracy", "params_trainable", "params_frozen", "opt_state_bytes", "wall_s"):
        assert key in summary
    assert json.load(open(os.path.join(workdir, "summary.json"))) == summary
    assert json.load(open(os.path.join(workdir, "config.json")))["total_steps"] == 60
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_records = [r for r in records if "split" not in r]
    assert [r["step"] for r in train_records] == [20, 40, 60]
    assert {"loss", "lr", "images_per_s"} <= set(train_records[0])
    assert {(r["step"], r["split"]) for r in records if "split" in r} == {
        (30, "val"),
        (60, "train"),
        (60, "val"),
        (60, "test"),
    }
    assert summary["test_accuracy"] > 0.5  # 6 classes: chance is 0.17
    assert checkpoint.find_state_dir(workdir).endswith("checkpoints/60/state")
    prov = summary["provenance"]  # what it ran on, outside the config (not in the run's hash)
    assert prov["packages"]["jax"] == jax.__version__ and prov["backend"] == jax.default_backend()
    assert {"commit", "dirty", "cpu", "devices", "xla_flags"} <= set(prov)
    assert "provenance" not in json.load(open(os.path.join(workdir, "config.json")))


def test_finetuning_on_digits_from_pretrained_beats_chance_by_far(pretrained, tmp_path):
    c = cfg(
        f"configs/finetune.py:target=digits,strategy=freeze_early,steps=80,batch_size=32,"
        f"init_from={pretrained[0]}"
    )
    summary = train.run(c, str(tmp_path))
    assert summary["test_accuracy"] > 0.6, summary  # 10 classes: chance is 0.1
    report = json.load(open(tmp_path / "load_report.json"))
    assert report["reinitialised"] == ["params/head/bias", "params/head/kernel"]
    assert summary["frozen_stages"] == ["stem", "stage1"]
    assert summary["params_frozen"] > 0


def test_linear_probe_keeps_the_backbone_and_its_statistics_bit_identical(pretrained, tmp_path):
    c = cfg(
        f"configs/finetune.py:target=digits,strategy=linear_probe,steps=20,batch_size=32,"
        f"init_from={pretrained[0]}"
    )
    train.run(c, str(tmp_path))
    before = checkpoint.read_variables(pretrained[0])
    after = checkpoint.read_variables(str(tmp_path))
    for coll in ("params", "batch_stats"):
        for path, a in before[coll].items():
            if path == "head":
                continue
            jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, after[coll][path])
    assert after["params"]["head"]["kernel"].shape == (64, 10)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """A finished 8-step run extended to 16 steps (resume='force': another total_steps is another
    config) ends bit-identical to a 16-step run (a constant schedule: the first 8 steps agree)."""
    base = dict(SMALL_FRACTALS, **{"optim.schedule": "constant", "eval_train": False})
    full = train.run(
        cfg("configs/pretrain.py:steps=16,batch_size=16", **base), str(tmp_path / "full")
    )
    part = str(tmp_path / "part")
    train.run(cfg("configs/pretrain.py:steps=8,batch_size=16", **base), part)
    longer = cfg("configs/pretrain.py:steps=16,batch_size=16", **base)
    with pytest.raises(checkpoint.ResumeMismatch, match=r"total_steps: 8 -> 16.*new workdir"):
        train.run(longer, part)
    resumed = train.run(longer, part, resume="force")
    assert resumed["resumed_from"] == 8
    a = checkpoint.read_variables(str(tmp_path / "full"))
    b = checkpoint.read_variables(part)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)
    assert resumed["test_accuracy"] == full["test_accuracy"]
    history = json.load(open(os.path.join(part, "config.json")))["resume_history"]
    assert [h["changed"] for h in history] == [{"total_steps": [8, 16]}]


def test_a_finished_run_asked_again_with_its_config_is_read_not_trained(pretrained, capsys):
    workdir, summary = pretrained
    before = os.stat(os.path.join(workdir, "summary.json")).st_mtime_ns
    c = cfg("configs/pretrain.py:steps=60,batch_size=32", eval_every=30, **SMALL_FRACTALS)
    assert train.run(c, workdir) == summary
    assert "finished before with this config; nothing to do" in capsys.readouterr().err
    assert os.stat(os.path.join(workdir, "summary.json")).st_mtime_ns == before


def test_a_finished_run_asked_with_another_config_is_refused_untouched(pretrained):
    workdir, _ = pretrained
    files = {n: open(os.path.join(workdir, n)).read() for n in ("config.json", "summary.json")}
    c = cfg("configs/pretrain.py:steps=40,batch_size=32,lr=1e-3", eval_every=30, **SMALL_FRACTALS)
    with pytest.raises(checkpoint.ResumeMismatch) as e:
        train.run(c, workdir)
    assert "optim.lr: 0.002 -> 0.001" in str(e.value) and "total_steps: 60 -> 40" in str(e.value)
    assert "\n" not in str(e.value)
    assert files == {n: open(os.path.join(workdir, n)).read() for n in files}


def test_a_v1_config_json_is_compared_after_migration(tmp_path):
    """A run directory written under config v1: resumed by today's equal config, not refused."""
    c = cfg("configs/pretrain.py:steps=4,batch_size=16,image_size=16", **SMALL_FRACTALS)
    train.run(c, str(tmp_path))
    tree = json.load(open(tmp_path / "config.json"))
    v1 = {k: v for k, v in tree.items() if k not in ("strategy", "feature_cache")}
    v1["config_version"] = 1
    v1["freeze"] = {**tree["freeze"], "strategy": "none", "feature_cache": True}
    assert tlx_config.migrate(v1) == tree
    (tmp_path / "config.json").write_text(json.dumps(v1))
    assert train.run(c, str(tmp_path))["steps"] == 4  # read: the same run


def test_an_lr_that_diverges_mid_run_stops_it_keeping_the_last_finite_checkpoint(tmp_path):
    """lr 1e6 (SGD, no warmup): the loss goes non-finite within a few steps; the run stops with
    an error naming the step, every checkpoint kept is finite, and failed.json says diverged."""
    over = {"optim.name": "sgd", "optim.warmup_steps": 0, "optim.schedule": "constant"}
    c = cfg(
        "configs/pretrain.py:steps=12,batch_size=16,image_size=16,lr=1e6",
        checkpoint_every=1,
        max_to_keep=2,
        **over,
        **SMALL_FRACTALS,
    )
    with pytest.raises(train.NonFiniteError, match=r"^step (\d+): .*last finite checkpoint") as e:
        train.run(c, str(tmp_path))
    bad = int(e.value.args[0].split()[1].rstrip(":"))
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps and max(steps) == bad - 1 < 12
    for leaf in jax.tree.leaves(checkpoint.read_variables(str(tmp_path))):
        assert np.all(np.isfinite(leaf))
    assert json.load(open(tmp_path / "failed.json"))["status"] == "diverged"
    assert not os.path.exists(tmp_path / "summary.json")
    with pytest.raises(train.NonFiniteError, match="diverged before"):  # not trained again
        train.run(c, str(tmp_path))


def test_non_finite_weights_before_training_are_named_not_blamed_on_an_update():
    """The step checks only the leaves it trains; frozen ones are checked once, before step 1."""
    params = {"stem": {"conv": {"kernel": np.ones(3)}}, "stage1": {"w": np.array([1.0, 2.0])}}
    train._check_finite_start(params, cfg("configs/pretrain.py:steps=2"))  # all finite: fine
    params["stage1"]["w"][1] = np.nan
    params["head"] = {"kernel": np.full(2, np.inf)}
    c = cfg("configs/finetune.py:target=digits,steps=2,init_from=runs/pre")
    with pytest.raises(
        checkpoint.InitError,
        match=r"^init_from='runs/pre' has non-finite values in 2 parameter\(s\) \(head/kernel, "
        r"stage1/w\): it is corrupt or from a diverged run",
    ):
        train._check_finite_start(params, c)


def test_init_from_a_checkpoint_of_another_backbone_is_a_clear_error(pretrained, tmp_path):
    c = cfg(
        f"configs/finetune.py:backbone=resnet18,target=digits,steps=2,init_from={pretrained[0]}"
    )
    with pytest.raises(checkpoint.InitError, match="shape mismatch"):
        train.run(c, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints" / "0")


def test_cli_rejects_an_unknown_config_key(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tlx.main",
            "--config=configs/finetune.py:target=digits",
            f"--workdir={tmp_path}",
            "--config.optim.learning_rate=0.1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "learning_rate" in out.stderr


def test_config_rejects_an_unknown_arg():
    with pytest.raises(ValueError, match="unknown config arg 'stratgy'.*strategy"):
        cfg("configs/finetune.py:stratgy=none")


def test_pretraining_logs_fewshot_probes_every_n_steps(tmp_path):
    over = {"fewshot.every": 2, "fewshot.targets": ["digits"], "fewshot.shots": [3]}
    c = cfg("configs/pretrain.py:steps=4,batch_size=16,image_size=16", **SMALL_FRACTALS, **over)
    train.run(c, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    probes = [r for r in records if r.get("split") == "fewshot"]
    assert [r["step"] for r in probes] == [2, 4]
    assert all(0.0 <= r["digits_3shot"] <= 1.0 for r in probes)
