"""Where a sweep's runs execute: in this process (`inline`), in local worker processes
(`local`, --parallel=N), or as tasks on a Ray cluster (`ray`). Each is a
`concurrent.futures.Executor` whose tasks are `tlx.sweep`'s runs; run directories, the skipping of
finished runs and the per-run lock are the sweep's own, so every launcher writes the same
results.csv.

Ray (an optional extra: `make ray`) joins the cluster at `address` (`ray start --head` on one
node, `ray start --address=HEAD:6379` on the others; the run directory must be on a file system
every node mounts), or starts a local one when no address is given. Each run is one task with
`cpus` CPUs and `gpus` GPUs.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import multiprocessing
import os
import signal

LAUNCHERS = ("local", "ray")


class Inline(cf.Executor):
    """Runs each task on submit, in this process: --parallel=1."""

    def submit(self, fn, /, *args, **kwargs):
        future = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(e)
        return future


def _die_with_parent(prepare) -> None:
    """In a local worker process: die with the runner (Linux), then prepare as the sweep asks."""
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the runner died before prctl took effect
        os._exit(1)
    prepare()


class Ray(cf.Executor):
    """Each task a Ray task; futures from `ObjectRef.future()`."""

    def __init__(self, address: str = "", cpus: float = 1, gpus: float = 0, prepare=None):
        try:
            import ray
        except ImportError:
            raise ValueError(
                "--launcher=ray needs ray: `make ray` (or pip install -r requirements-ray.txt)"
            ) from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            kwargs = {"address": address} if address else {"include_dashboard": False}
            ray.init(log_to_driver=False, **kwargs)
        self.options = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": 0}
        self.prepare = prepare
        self.refs = []

    def submit(self, fn, /, *args, **kwargs):
        task = self.ray.remote(_in_worker).options(**self.options)
        ref = task.remote(self.prepare, fn, args, kwargs)
        self.refs.append(ref)
        return ref.future()

    def shutdown(self, wait=True, *, cancel_futures=False):
        if cancel_futures:
            for ref in self.refs:
                with contextlib.suppress(Exception):
                    self.ray.cancel(ref)
        if self.started:
            self.ray.shutdown()


def _in_worker(prepare, fn, args, kwargs):
    if prepare is not None:
        prepare()
    return fn(*args, **kwargs)


def make(launcher: str, parallel: int = 1, prepare=None, **ray_options) -> cf.Executor:
    """The executor of `launcher`. `prepare`: called once in this process (inline) or at the start
    of every worker/task (e.g. the JAX compilation cache)."""
    if launcher == "ray":
        return Ray(prepare=prepare, **ray_options)
    if launcher != "local":
        raise ValueError(f"--launcher={launcher!r}: use one of {list(LAUNCHERS)}")
    if parallel > 1:
        context = multiprocessing.get_context("spawn")  # JAX and fork don't mix
        return cf.ProcessPoolExecutor(
            parallel, mp_context=context, initializer=_die_with_parent, initargs=(prepare,)
        )
    if prepare is not None:
        prepare()
    return Inline()
