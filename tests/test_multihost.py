"""One run over several processes (jax.distributed, gloo on CPU): 2 processes x 2 devices ends
where 1 process x 4 devices does, writes its files once, resumes after kill -9 of both, and a bad
launch is one line naming the problem.

Every run here is `python -m tlx.main` in subprocesses, since each process needs its own device
count (XLA_FLAGS) and jax.distributed cannot be undone in a process.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tlx import checkpoint, freeze, train
from tlx import main as tlx_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
QUIET = ["--config.progress=false", "--config.tensorboard=false", "--config.log_every=1"]
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = str(tmp_path_factory.getbasetemp() / "jax_cache")
    return {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def _launch(workdir, processes, devices, flags, env, per_process=None, extra_env=None):
    """`processes` x `python -m tlx.main` on one workdir, each with `devices` CPU devices."""
    env = {
        **env,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        **(extra_env or {}),
    }
    dist = []
    if processes > 1:
        port = _port()
        dist = [f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}"]
    procs = []
    for i in range(processes):
        ids = [f"--process_id={i}"] if processes > 1 else []
        mine = (per_process or {}).get(i, [])
        cmd = [sys.executable, "-m", "tlx.main", f"--workdir={workdir}", *flags, *mine, *dist, *ids]
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def _wait(procs, timeout=300):
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        out.append((p.returncode, o, e))
    return out


def _run(workdir, processes, devices, flags, env, **kw):
    res = _wait(_launch(workdir, processes, devices, flags, env, **kw))
    for rc, _, err in res:
        assert rc == 0, err[-3000:]
    return res


@pytest.fixture(scope="module")
def source(tmp_path_factory, env):
    """A tiny pre-trained backbone (one process)."""
    src = str(tmp_path_factory.mktemp("source"))
    flags = [
        "--config=configs/pretrain.py:steps=8,batch_size=16,image_size=16",
        "--config.data.fractals.num_classes=4",
        "--config.data.fractals.train_per_class=24",
        "--config.data.fractals.test_per_class=6",
        *QUIET,
    ]
    _run(src, 1, 1, flags, env)
    return src


def _finetune(source, *more):
    spec = (
        f"configs/finetune.py:target=digits,steps={STEPS},batch_size=16,image_size=16,"
        f"strategy=freeze_early,init_from={source}"
    )
    return [f"--config={spec}", *QUIET, "--config.checkpoint_every=2", *more]


def _flat(tree):
    return {freeze.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _params(workdir):
    return _flat(checkpoint.read_variables(workdir))


def _frozen_equal_source(workdir, source):
    """The leaves of the frozen stages, each bit-identical to the source checkpoint's."""
    frozen = json.load(open(os.path.join(workdir, "summary.json")))["frozen_stages"]
    assert frozen, "freeze_early freezes the early stages"
    got, src = _params(workdir), _params(source)
    keys = [k for k in got if k.split("/")[1] in frozen]
    assert keys
    for k in keys:
        np.testing.assert_array_equal(got[k], src[k], err_msg=k)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# Another topology sums the gradient all-reduce in another order (gloo across processes), a few
# ulps apart; AdamW's first steps divide by sqrt(v), so an element whose gradient is near zero
# turns that into up to ~lr. Measured (resnet_tiny, lr 3e-4, 6 steps): the worst element differs
# by 1.3e-5 (it moved 2.8e-5), 0.4% of one kernel's elements by over 1e-6, while the median element
# moved 2.9e-4; a batch fed to the wrong devices or processes would change most elements by ~lr.
TOPOLOGY_ATOL = 5e-5


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a if a[k].size)


@pytest.fixture(scope="module")
def one_by_four(tmp_path_factory, source, env):
    w = str(tmp_path_factory.mktemp("one_by_four"))
    _run(w, 1, 4, _finetune(source), env)
    return w


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory, source, env):
    w = str(tmp_path_factory.mktemp("two_by_two"))
    res = _run(w, 2, 2, _finetune(source), env)
    return w, res


def test_two_processes_end_where_one_process_with_all_devices_does(one_by_four, two_by_two, source):
    w2, res = two_by_two
    assert _max_diff(_params(one_by_four), _params(w2)) <= TOPOLOGY_ATOL
    for w in (one_by_four, w2):
        _frozen_equal_source(w, source)
    s1, s2 = (json.load(open(os.path.join(w, "summary.json"))) for w in (one_by_four, w2))
    assert s2["topology"] == {**s1["topology"], "process_count": 2, "local_device_count": 2}
    assert s2["test_accuracy"] == pytest.approx(s1["test_accuracy"], abs=0.01)
    # Written once, by process 0: one record per logged step and split, one summary line printed.
    recs = _records(w2)
    keys = [(r["step"], r.get("split", "step")) for r in recs]
    assert len(keys) == len(set(keys)) and len(recs) == len(_records(one_by_four))
    assert [s for s, split in keys if split == "step"] == list(range(1, STEPS + 1))
    # (gloo's "Rank N is connected" lines go to stdout from C++: only the summary line counts)
    printed = [[ln for ln in out.splitlines() if "test_accuracy" in ln] for _, out, _ in res]
    assert [len(lines) for lines in printed] == [1, 0]
    assert sorted(os.listdir(os.path.join(w2, "checkpoints"))) == ["4", "6"]


def test_pmap_spans_both_processes(tmp_path, source, env):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _run(a, 1, 4, _finetune(source, "--config.parallel=pmap"), env)
    _run(b, 2, 2, _finetune(source, "--config.parallel=pmap"), env)
    assert _max_diff(_params(a), _params(b)) <= TOPOLOGY_ATOL
    _frozen_equal_source(b, source)


def test_both_processes_killed_resume_and_end_as_the_uninterrupted_run(
    tmp_path, two_by_two, source, env
):
    w = str(tmp_path / "killed")
    procs = _launch(w, 2, 2, _finetune(source), env, extra_env={train.PAUSE_AFTER_SAVE: "2"})
    marks = [os.path.join(w, ".paused"), os.path.join(w, ".paused.1")]
    deadline = time.time() + 300
    while not all(map(os.path.exists, marks)) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    assert [rc for rc, _, _ in _wait(procs)] == [-signal.SIGKILL] * 2
    assert not os.path.exists(os.path.join(w, "summary.json"))
    _run(w, 2, 2, _finetune(source), env)
    summary = json.load(open(os.path.join(w, "summary.json")))
    assert summary["resumed_from"] == 2
    whole = two_by_two[0]
    assert _max_diff(_params(whole), _params(w)) == 0.0  # the same topology: bit for bit
    rec_a = [{k: v for k, v in r.items() if k != "images_per_s"} for r in _records(whole)]
    rec_b = [{k: v for k, v in r.items() if k != "images_per_s"} for r in _records(w)]
    assert rec_a == rec_b


def test_a_run_of_two_processes_resumes_as_one(tmp_path, source, env):
    """Another topology resumes the same run (checkpoints restore onto any mesh)."""
    w = str(tmp_path / "run")
    procs = _launch(w, 2, 2, _finetune(source), env, extra_env={train.PAUSE_AFTER_SAVE: "4"})
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(w, ".paused.1")) and time.time() < deadline:
        assert all(p.poll() is None for p in procs)
        time.sleep(0.1)
    while not os.path.exists(os.path.join(w, ".paused")) and time.time() < deadline:
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    _wait(procs)
    _run(w, 1, 1, _finetune(source), env)
    assert json.load(open(os.path.join(w, "summary.json")))["resumed_from"] == 4
    _frozen_equal_source(w, source)


# -- bad launches ---------------------------------------------------------------------------------
def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("tlx.main:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_a_global_batch_the_devices_do_not_divide_is_refused_on_every_process(
    tmp_path, source, env
):
    res = _wait(_launch(str(tmp_path), 2, 2, _finetune(source, "--config.batch_size=6"), env))
    for rc, _, err in res:
        assert rc == 1
        assert "batch_size=6 must be divisible by the 4 devices (2 processes x 2)" in _one_line(err)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_processes_with_different_configs_are_refused_before_training(tmp_path, source, env):
    per = {1: ["--config.optim.lr=0.02"]}
    res = _wait(_launch(str(tmp_path), 2, 2, _finetune(source), env, per_process=per))
    for rc, _, err in res:
        assert rc == 1
        assert "the processes resolved different configs: process(es) [1]" in _one_line(err)
    assert not os.path.exists(tmp_path / "config.json")


def test_an_unreachable_coordinator_is_named_within_the_timeout(tmp_path, capsys):
    port = _port()  # free: nobody serves it
    t = time.time()
    rc = tlx_main.main(
        [
            "--config=configs/pretrain.py:tiny",
            f"--workdir={tmp_path}",
            f"--coordinator=127.0.0.1:{port}",
            "--num_processes=2",
            "--process_id=1",
            "--dist_timeout=1.5",
        ]
    )
    assert rc == 1 and time.time() - t < 30
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"tlx.main: LaunchError: process 1 of 2 cannot reach the coordinator at 127.0.0.1:{port}"
        " within 1.5 s"
    ), err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_processes=2", "--process_id=1"], "--num_processes/--process_id need"),
        (["--coordinator=node01", "--num_processes=2", "--process_id=0"], "is not HOST:PORT"),
        (["--coordinator=h:1", "--num_processes=2"], "needs --num_processes=N and --process_id"),
        (["--coordinator=h:1", "--num_processes=2", "--process_id=2"], "must be in 0..1"),
        (["--coordinator=auto", "--process_id=0"], "--coordinator=auto takes the process count"),
    ],
)
def test_bad_distributed_flags_are_one_line(tmp_path, capsys, flags, message):
    rc = tlx_main.main(["--config=configs/pretrain.py:tiny", f"--workdir={tmp_path}", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("tlx.main: LaunchError:") and message in err, err
    assert len(err.splitlines()) == 1
