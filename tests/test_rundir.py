"""The run directory's owner, `tlx.rundir.RunDir`: the run hash, its records, their atomic writes
and what it refuses."""

import json
import os

import pytest

from tlx import config as tlx_config
from tlx import rundir, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Computed with tlx before RunDir existed (tlx.sweep.config_hash at commit 3a7c210): every
# existing run directory is named by these hashes, so they must not change.
PINNED = {
    "configs/finetune.py:backbone=resnet_tiny,target=digits,strategy=linear_probe": "04dbe36c025f",
    "configs/pretrain.py:backbone=resnet_tiny,source=fractals": "79c635884fd7",
    "configs/finetune.py:target=digits,strategy=lp_ft,lp_fraction=0.3": "ffab41050746",
}


@pytest.mark.parametrize("spec", sorted(PINNED))
def test_the_hash_of_a_known_config_is_the_one_it_had_before_rundir(spec):
    config = tlx_config.load(os.path.join(ROOT, spec))
    assert rundir.config_hash(config) == PINNED[spec]
    assert sweep.config_hash(config) == PINNED[spec]  # the sweep's name for it


def test_the_hash_of_a_config_json_ignores_what_computes_nothing_as_before():
    tree = {
        "seed": 0,
        "optim": {"lr": 0.1, "name": "sgd"},
        "progress": True,
        "model": {"dtype": "float32", "name": "resnet_tiny"},
        "init_from": "sweep:0123456789ab",
        "resume_history": [1],
    }
    assert rundir.config_hash(tree) == "aef798c78a24"
    other = {
        "seed": 0,
        "model": {"dtype": "bfloat16"},
        "data": {"data_dir": "/x", "name": "digits"},
    }
    assert rundir.config_hash(other) == "f35b08d751c6"


def test_the_file_hasher_is_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert rundir.file_sha256(str(path)) == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_write_json_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    run = rundir.RunDir(tmp_path)
    run.write("summary.json", {"a": 1})
    run.write("summary.json", {"a": 2})
    assert run.summary() == {"a": 2}
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]


@pytest.mark.parametrize("name", ["config.json", "summary.json"])
def test_a_record_that_is_not_json_is_unreadable_not_absent(tmp_path, name):
    (tmp_path / name).write_text('{"seed": 0, "tot')
    run = rundir.RunDir(tmp_path)
    read = run.config if name == "config.json" else run.summary
    with pytest.raises(
        rundir.Unreadable, match=rf"{name} cannot be read: not JSON.*--resume=force"
    ):
        read()
    assert read(force=True) is None
    assert rundir.RunDir(tmp_path / "none").summary() is None  # absent: None


def test_an_unreadable_config_with_state_is_refused_and_forced_into_the_history(tmp_path):
    (tmp_path / "config.json").write_text("{")
    run = rundir.RunDir(tmp_path)
    with pytest.raises(rundir.Unreadable, match="config.json cannot be read"):
        run.check_resume({"seed": 0}, "ckpt")
    history, changed = run.check_resume({"seed": 0}, "ckpt", resume="force")
    assert changed and history[0]["changed"] == {"config.json": ["<unreadable>", "<this config>"]}
    assert run.check_resume({"seed": 0}, None) == ([], False)  # no state: starts over


def test_a_diverged_run_reads_as_a_finished_summary(tmp_path):
    run = rundir.RunDir(tmp_path)
    assert run.finished() is None
    run.write_failed("diverged", RuntimeError("step 3: the training loss is nan\nmore"))
    assert run.finished() == {
        "diverged": True,
        "error": "step 3: the training loss is nan",
        "val_accuracy": None,
        "test_accuracy": None,
        "wall_s": 0.0,
    }


def test_start_over_unmarks_the_run_writes_its_config_and_truncates_metrics(tmp_path):
    run = rundir.RunDir(tmp_path)
    run.write("summary.json", {})
    run.write_failed("failed", ValueError("x"))
    lines = [{"step": 1}, {"step": 2}, {"step": 3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run.start_over({"seed": 1}, [{"changed": {}}], 2)
    assert run.summary() is None and run.failed() is None
    assert run.config() == {"seed": 1, "resume_history": [{"changed": {}}]}
    assert [r["step"] for r in run.metrics()] == [1, 2]


def test_a_lock_on_a_directory_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "makedirs", refuse)
    with pytest.raises(
        rundir.NotWritable, match=r"workdir .* is not writable \(Permission denied\)"
    ):
        with rundir.lock(str(tmp_path / "run")):
            pass
