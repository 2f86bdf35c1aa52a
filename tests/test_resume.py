"""kill -9 and resume: a run SIGKILLed after any checkpoint (phase boundaries included) and
resumed ends bit-identical to the uninterrupted run, and metrics.jsonl holds each record once.

Each case: the uninterrupted run in this process; the same command in a subprocess
(`python -m tlx.main`) paused after the save of step k (train.PAUSE_AFTER_SAVE) and killed with
SIGKILL there, once per kill point, each resuming the last; then a resume here to the end.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tlx import config as tlx_config
from tlx import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
TINY = {
    "data.fractals.num_classes": 4,
    "data.fractals.train_per_class": 24,
    "data.fractals.test_per_class": 6,
    "progress": False,
    "tensorboard": False,
    "checkpoint_every": 1,
    "log_every": 1,
    "eval_train": False,
}
PRETRAIN = f"configs/pretrain.py:steps={STEPS},batch_size=16,image_size=16"
FINETUNE = f"configs/finetune.py:target=digits,steps={STEPS},batch_size=16,image_size=16"
pytestmark = pytest.mark.slow


def _env(tmp_path_factory):
    cache = str(tmp_path_factory.getbasetemp() / "jax_cache")
    return {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def _overrides(spec, extra):
    over = dict(TINY, **extra)
    if not spec.startswith("configs/pretrain"):
        over = {k: v for k, v in over.items() if not k.startswith("data.fractals")}
    return over


def _run_here(spec, workdir, **extra):
    c = tlx_config.load(os.path.join(ROOT, spec), **_overrides(spec, extra))
    return train.run(c, str(workdir))


def _kill_after(spec, workdir, step, env, **extra):
    """`python -m tlx.main` on `workdir`, SIGKILLed once it has saved `step`."""
    flags = [f"--config.{k}={json.dumps(v) if not isinstance(v, str) else v}"
             for k, v in _overrides(spec, extra).items()]  # fmt: skip
    paused = os.path.join(workdir, ".paused")
    if os.path.exists(paused):
        os.remove(paused)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlx.main", f"--config={spec}", f"--workdir={workdir}", *flags],
        env={**env, train.PAUSE_AFTER_SAVE: str(step)},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while not os.path.exists(paused) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert open(paused).read() == str(step)


def _state(workdir):
    return ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(STEPS), "state")
    )


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in f]


def _check_equal(whole, killed, s_whole, s_killed):
    a, b = _state(whole), _state(killed)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)
    rec_a, rec_b = _records(whole), _records(killed)
    keys = [(r["step"], r.get("split", "train")) for r in rec_b]
    assert len(keys) == len(set(keys)), keys  # each record once
    assert [s for s, split in keys if split == "train"] == list(range(1, STEPS + 1))
    assert rec_a == rec_b  # the same losses and accuracies, bit for bit
    for k in ("test_accuracy", "val_accuracy", "test_loss", "opt_state_bytes"):
        assert s_whole[k] == s_killed[k], k


def _case(tmp_path, env, spec, kills, **extra):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    s_whole = _run_here(spec, whole, **extra)
    for step in kills:
        _kill_after(spec, str(killed), step, env, **extra)
    s_killed = _run_here(spec, killed, **extra)
    assert s_killed["resumed_from"] == kills[-1]
    _check_equal(str(whole), str(killed), s_whole, s_killed)
    return s_whole


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return _env(tmp_path_factory)


@pytest.fixture(scope="module")
def source(tmp_path_factory, env):
    """Pre-training killed after steps 2 and 4 (its uninterrupted run is the source below)."""
    tmp = tmp_path_factory.mktemp("pretrain")
    _case(tmp, env, PRETRAIN, [2, 4])
    return str(tmp / "whole")


def test_pretraining_killed_twice_resumes_bit_identical(source):
    assert os.path.exists(os.path.join(source, "summary.json"))


def test_a_cached_linear_probe_killed_resumes_bit_identical(source, tmp_path, env):
    spec = FINETUNE + f",strategy=linear_probe,augment=false,init_from={source}"
    summary = _case(tmp_path, env, spec, [3])
    assert summary["feature_cache"]


def test_gradual_unfreeze_killed_on_and_off_its_phase_boundaries_resumes_bit_identical(
    source, tmp_path, env
):
    """every_steps=2: phases start at steps 0, 2, 4; killed on the boundary 2, then off it (3)."""
    spec = FINETUNE + f",strategy=gradual_unfreeze,every_steps=2,init_from={source}"
    summary = _case(tmp_path, env, spec, [2, 3])
    assert [p["start"] for p in summary["phases"]] == [0, 2, 4]


def test_lp_ft_killed_on_and_off_its_phase_boundary_resumes_bit_identical(source, tmp_path, env):
    """lp_fraction=0.5: the probe phase is steps 1..3, the fine-tuning phase 4..6 (a fresh
    optimizer); killed on the boundary (3), then off it (5)."""
    spec = FINETUNE + f",strategy=lp_ft,init_from={source}"
    summary = _case(tmp_path, env, spec, [3, 5])
    assert [p["start"] for p in summary["phases"]] == [0, 3]
