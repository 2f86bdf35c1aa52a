"""Where a sweep's runs execute: Ray tasks write the same results.csv as the local launcher, and
several independent sweeps on one directory (the SLURM-array pattern) train every run once."""

import csv
import os
import re
import subprocess
import sys

import pytest
from test_sweep import ROOT, TINY, tiny_sweep

TIMING = {"run", "wall_s", "cell_wall_s"}


def table(path):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def sweep(workdir, *flags):
    return subprocess.Popen(
        [sys.executable, "-m", "tlx.sweep", f"--config={TINY}", f"--workdir={workdir}", *flags],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_ray_tasks_write_the_results_of_the_local_launcher(tmp_path, tmp_path_factory):
    pytest.importorskip("ray")
    local = table(os.path.join(tiny_sweep(tmp_path_factory), "results.csv"))
    p = sweep(tmp_path, "--launcher=ray", "--no_report")
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
    assert "(21 trained, 0 read)" in out, out[-2000:]
    assert table(tmp_path / "results.csv") == local


@pytest.mark.slow
def test_independent_sweeps_on_one_directory_train_every_run_once(tmp_path, tmp_path_factory):
    """Two `tlx.sweep` processes started together (as two tasks of a SLURM array would be) share
    the runs through the per-run lock: each run is trained by one of them and read by the other."""
    local = table(os.path.join(tiny_sweep(tmp_path_factory), "results.csv"))
    procs = [sweep(tmp_path, "--no_report") for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outs]
    trained = [h for o in outs for h in re.findall(r"s  ([0-9a-f]{12}) trained:", o)]
    assert len(trained) == len(set(trained)) == 21
    for o in outs:
        assert re.search(r"21 runs \(\d+ trained, \d+ read\)", o)
    assert table(tmp_path / "results.csv") == local


def test_the_ray_launcher_without_ray_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    from tlx import sweep as sweep_lib

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setattr(sweep_lib, "execute", lambda *a: pytest.fail("trained"))
    rc = sweep_lib.main(
        [f"--config={TINY}", f"--workdir={tmp_path}", "--launcher=ray", "--no_report"]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == (
        "tlx.sweep: ValueError: --launcher=ray needs ray: `make ray` (or pip install -r "
        "requirements-ray.txt)"
    )
