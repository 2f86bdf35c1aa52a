"""The sweep runner: runs named by config hash, learning rates chosen on validation, dependency
order, and a sweep killed with SIGKILL that finishes as if it never was."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tlx import config as tlx_config
from tlx import study, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(ROOT, "configs/finetune.py")
PRETRAIN = os.path.join(ROOT, "configs/pretrain.py")
# The tiny quadrants sweep: 21 runs of 8 steps (16 cells over 2 seeds, and the source).
TINY = os.path.join(ROOT, "configs/quadrants.py") + ":tiny"
RUNS = 21


def tiny_sweep(tmp_path_factory) -> str:
    """The tiny sweep, finished, in one directory of the session (test_notebook.py shares it:
    the second to ask reads every run)."""
    workdir = str(tmp_path_factory.getbasetemp() / "tiny_quadrants")
    subprocess.run(
        [sys.executable, "-m", "tlx.sweep", f"--config={TINY}", f"--workdir={workdir}"],
        env={**os.environ, "PYTHONPATH": ROOT},
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return workdir


def test_a_run_is_named_by_its_resolved_config_and_nothing_else():
    a = tlx_config.load(FINETUNE + ":target=digits,steps=5")
    same = tlx_config.load(FINETUNE, **{"data.name": "digits", "total_steps": 5})
    other_lr = tlx_config.load(FINETUNE + ":target=digits,steps=5,lr=0.1")
    not_results = tlx_config.load(
        FINETUNE + ":target=digits,steps=5", progress=False, **{"data.data_dir": "/elsewhere"}
    )
    assert sweep.config_hash(a) == sweep.config_hash(not_results)
    assert sweep.config_hash(other_lr) != sweep.config_hash(a)
    # The same run spelled two ways (arg vs override) is one run, unless a default depends on
    # the arg: finetune.py's `target` also turns off flips; the hash sees the difference.
    assert (sweep.config_hash(same) == sweep.config_hash(a)) == (same.to_dict() == a.to_dict())


def test_study_args_take_presets_by_name_then_key_values():
    a = study.parse_study_arg("tiny,seeds=4", {"seeds": 3, "steps": 100}, {"tiny": {"steps": 5}})
    assert a == {"seeds": 4, "steps": 5}
    with pytest.raises(ValueError, match="unknown study preset"):
        study.parse_study_arg("huge", {"seeds": 3}, {"tiny": {}})


STUDY = f'''
GRID = [{{"optim.head_lr": 0.01}}, {{"optim.head_lr": 0.03}}, {{"optim.head_lr": 0.1}}]

def get_sweep(arg=None):
    ft = "{FINETUNE}:target=digits,steps=5"
    return [
        {{"name": "source", "config": "{PRETRAIN}:steps=5"}},
        {{"name": "a0", "config": ft + ",seed=0", "init_from": "source", "grid": GRID,
          "axes": {{"strategy": "a", "seed": 0}}}},
        {{"name": "a1", "config": ft + ",seed=1", "init_from": "source", "grid_from": "a0",
          "axes": {{"strategy": "a", "seed": 1}}}},
        {{"name": "b0", "config": ft + ",seed=0", "init_from": "source",
          "grid": [{{"optim.head_lr": 0.03}}], "axes": {{"strategy": "b", "seed": 0}}}},
    ]
'''


def test_each_cell_takes_the_grid_point_best_on_validation_after_its_dependencies(
    tmp_path, monkeypatch
):
    (tmp_path / "study.py").write_text(STUDY)
    calls = []

    def fake_execute(run_dir, spec, overrides):
        calls.append((os.path.basename(run_dir), spec, overrides))
        # validation accuracy by head LR: 0.03 and 0.1 tie; the first of equals wins
        val = {0.01: 0.5, 0.03: 0.7, 0.1: 0.7}.get(overrides.get("optim.head_lr"), 0.9)
        seed = 1 if "seed=1" in spec else 0
        summary = {"val_accuracy": val, "test_accuracy": val - 0.1 * seed, "wall_s": 1.0}
        return summary, True

    monkeypatch.setattr(sweep, "execute", fake_execute)
    rows = sweep.run_sweep(str(tmp_path / "study.py"), str(tmp_path / "out"), log=lambda _: None)

    source_run = calls[0][0]
    assert calls[0][1].startswith(PRETRAIN)
    assert all(c[2]["init_from"] == str(tmp_path / "out/runs" / source_run) for c in calls[1:])
    # 3 grid points of a0, 1 (the chosen) for a1; b0 is a0's run at 0.03: trained once
    assert len(calls) == 1 + 3 + 1
    assert [c[2].get("optim.head_lr") for c in calls[1:]] == [0.01, 0.03, 0.1, 0.03]
    by_cell = {(r["strategy"], r["seed"]): r for r in rows}
    assert by_cell[("a", 0)]["optim.head_lr"] == 0.03
    assert by_cell[("a", 0)]["grid_size"] == 3
    assert by_cell[("a", 1)]["optim.head_lr"] == 0.03 and by_cell[("a", 1)]["grid_size"] == 1
    assert by_cell[("b", 0)]["run"] == by_cell[("a", 0)]["run"]
    with open(tmp_path / "out/results.csv") as f:
        header = next(csv.reader(f))
    assert header[:3] == ["strategy", "seed", "test_accuracy"]  # axes, then figures
    assert "train_accuracy" in header and "optim.head_lr" in header


def table(workdir, name="results.csv"):
    """A CSV as rows without the columns that time runs, or their means (summary.csv): they
    differ between identical runs."""
    with open(os.path.join(workdir, name)) as f:
        return [
            {k: v for k, v in r.items() if k.removesuffix("_mean") not in sweep.TIMING}
            for r in csv.DictReader(f)
        ]


def sweep_cmd(workdir, *extra):
    return [sys.executable, "-m", "tlx.sweep", f"--config={TINY}", f"--workdir={workdir}", *extra]


def finished_runs(workdir) -> dict:
    runs = os.path.join(workdir, "runs")
    out = {}
    for h in os.listdir(runs) if os.path.isdir(runs) else []:
        path = os.path.join(runs, h, "summary.json")
        if sweep.read_summary(os.path.join(runs, h)) is not None:
            out[h] = (os.stat(path).st_mtime_ns, open(path).read())
    return out


@pytest.mark.slow
def test_a_sweep_killed_with_sigkill_finishes_without_redoing_runs_and_equals_an_uninterrupted_one(
    tmp_path, tmp_path_factory
):
    env = {**os.environ, "PYTHONPATH": ROOT}
    whole = tiny_sweep(tmp_path_factory)

    killed = tmp_path / "killed"
    # Two workers: SIGKILL reaches the runner only; its workers must die with it.
    proc = subprocess.Popen(
        sweep_cmd(killed, "--parallel=2", "--no_report"),
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while len(finished_runs(killed)) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    time.sleep(1)  # the workers get their SIGKILL as the runner dies; let them be gone
    before = finished_runs(killed)
    assert 4 <= len(before) < RUNS
    assert not os.path.exists(killed / "results.csv")

    again = subprocess.run(
        sweep_cmd(killed), env=env, cwd=ROOT, check=True, capture_output=True, text=True
    )
    after = finished_runs(killed)
    assert len(after) == RUNS
    for h, (mtime, text) in before.items():  # finished runs were read, not trained again
        assert after[h] == (mtime, text)
    assert f"({RUNS - len(before)} trained, {len(before)} read)" in again.stdout
    assert table(killed) == table(whole)
    assert table(killed, "summary.csv") == table(whole, "summary.csv")
    assert table(killed, "paired.csv") == table(whole, "paired.csv")


def test_a_diverged_run_is_a_row_and_the_cell_chooses_among_the_others(tmp_path, monkeypatch):
    (tmp_path / "study.py").write_text(STUDY)

    def fake_execute(run_dir, spec, overrides):
        lr = overrides.get("optim.head_lr")
        if lr == 0.1:  # the largest rate diverges: it must not be chosen, nor crash the sweep
            return {"diverged": True, "error": "step 3: ...", "val_accuracy": None,
                    "test_accuracy": None, "wall_s": 0.0}, True  # fmt: skip
        val = {0.01: 0.5, 0.03: 0.4}.get(lr, 0.9)
        return {"val_accuracy": val, "test_accuracy": val, "wall_s": 1.0}, True

    monkeypatch.setattr(sweep, "execute", fake_execute)
    logs = []
    rows = sweep.run_sweep(str(tmp_path / "study.py"), str(tmp_path / "out"), log=logs.append)
    a0 = next(r for r in rows if (r["strategy"], r["seed"]) == ("a", 0))
    assert a0["optim.head_lr"] == 0.01 and a0["diverged_runs"] == 1
    assert any("DIVERGED (step 3: ...)" in line for line in logs)


def test_a_bad_value_in_any_cell_fails_before_any_training(tmp_path, monkeypatch):
    (tmp_path / "study.py").write_text(STUDY.replace('"optim.head_lr": 0.1', '"optim.head_lr": -1'))
    monkeypatch.setattr(sweep, "execute", lambda *a: pytest.fail("trained"))
    with pytest.raises(ValueError, match=r"cell a0: config optim.head_lr=-1"):
        sweep.run_sweep(str(tmp_path / "study.py"), str(tmp_path / "out"), log=lambda _: None)


FINGERPRINTED = f'''
def get_sweep(arg=None):
    return [
        {{"name": "source", "config": "{PRETRAIN}:steps=2,classes=4,image_size=16"}},
        {{"name": "ft", "config": "{FINETUNE}:target=digits,steps=2,image_size=16",
          "init_from": "source", "axes": {{"strategy": "none", "seed": 0}}}},
    ]
'''


def test_a_finished_run_whose_dataset_changed_is_trained_again_and_its_dependents_too(
    tmp_path, monkeypatch
):
    """summary.json's dataset fingerprint against today's (`tlx.data.fingerprint`, real builds):
    equal -> read; different -> trained again, the old run kept, one line saying why; a run that
    starts from a run trained again is trained again too."""
    from tlx import data, train

    (tmp_path / "study.py").write_text(FINGERPRINTED)
    trained = []

    def fake_run(config, run_dir):  # what train.run writes, without the training
        trained.append(config.data.name)
        os.makedirs(os.path.join(run_dir, "checkpoints", "2"))
        fp = data.fingerprint(config.data)
        summary = {"val_accuracy": 0.5, "test_accuracy": 0.5, "wall_s": time.time() % 1000,
                   "dataset": {"name": config.data.name, "fingerprint": fp}}  # fmt: skip
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
        return summary

    monkeypatch.setattr(train, "run", fake_run)

    def sweep_once():
        logs, trained[:] = [], []
        sweep.run_sweep(str(tmp_path / "study.py"), str(tmp_path / "out"), log=logs.append)
        return logs

    sweep_once()
    assert trained == ["fractals", "digits"]
    runs = {}  # dataset name -> run directory
    for path in tmp_path.glob("out/runs/*/summary.json"):
        runs[json.loads(path.read_text())["dataset"]["name"]] = path.parent
    logs = sweep_once()
    assert trained == [] and sum("finished before, read" in line for line in logs) == 2

    def tamper(name):
        path = runs[name] / "summary.json"
        s = json.loads(path.read_text())
        s["dataset"]["fingerprint"], current = "0123456789abcdef", s["dataset"]["fingerprint"]
        path.write_text(json.dumps(s))
        return current

    current = tamper("digits")
    logs = sweep_once()
    assert trained == ["digits"]  # the source is read, the changed target trained again
    h = runs["digits"].name
    (line,) = [line for line in logs if f"{h} trained again" in line]
    assert (
        f"{h} trained again: its dataset digits changed (fingerprint 0123456789abcdef in "
        f"summary.json, {current} as built now); the old run is in runs/{h}/stale/"
    ) in line
    (old,) = (runs["digits"] / "stale").iterdir()
    assert (old / "checkpoints" / "2").is_dir()
    assert "0123456789abcdef" in (old / "summary.json").read_text()
    assert "digits changed" in (old / "why.txt").read_text()
    assert "(1 trained, 1 read; 1 trained again: their data changed)" in logs[-1]

    tamper("fractals")
    logs = sweep_once()
    assert trained == ["fractals", "digits"]
    because = f"the run it starts from, {runs['fractals'].name}, was trained again"
    assert any(f"{runs['digits'].name} trained again: {because}" in line for line in logs)
    sweep_once()
    assert trained == []  # settled: both read


def test_a_summary_without_a_fingerprint_is_read_and_says_it_was_not_checked(tmp_path, monkeypatch):
    from tlx import train

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"val_accuracy": 0.5, "test_accuracy": 0.5, "wall_s": 1}')
    monkeypatch.setattr(train, "run", lambda *a: pytest.fail("trained"))
    summary, trained = sweep.execute(str(run), f"{FINETUNE}:target=digits", {})
    assert not trained and "predates dataset fingerprints" in summary["sweep_note"]
