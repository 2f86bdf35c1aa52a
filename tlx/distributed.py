"""One run over several processes (hosts): JAX's multi-controller runtime, as tlx.main starts it.

  python -m tlx.main --config=... --workdir=DIR --coordinator=HOST:PORT --num_processes=N
      --process_id=I        # every process, I = 0..N-1; process 0 serves HOST:PORT
  python -m tlx.main --config=... --workdir=DIR --coordinator=auto
                            # SLURM, Open MPI, TPU pods: jax detects the cluster itself

Every process runs the same program on its rows of each global batch (`Runner` builds the mesh
over all processes' devices). What they must agree on is checked (`check_same`); what only one
may do (writing files) is done by process 0 (`is_main`), with `barrier`s where the others must
wait for it. A single process (no --coordinator) needs none of this: each helper is a no-op.
"""

import hashlib
import json
import socket
import time

import jax
import numpy as np

DEFAULT_TIMEOUT_S = 300


class LaunchError(ValueError):
    """A multi-process launch that cannot work (bad flags, an unreachable coordinator, processes
    that disagree); one line naming the problem and the fix."""


def initialize(
    coordinator: str | None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """`jax.distributed.initialize` from tlx.main's flags; `coordinator=None`: one process.

    JAX aborts the whole process (no exception) when it cannot reach the coordinator, so a
    process other than 0 first waits for the coordinator's port to accept connections, up to
    `timeout_s`, and raises LaunchError naming the address if it never does."""
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise LaunchError(
                "--num_processes/--process_id need --coordinator=HOST:PORT (or --coordinator=auto)"
            )
        return
    # On CPU, cross-process collectives need gloo (the default in this jaxlib; set for older).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator == "auto":
        if num_processes is not None or process_id is not None:
            raise LaunchError(
                "--coordinator=auto takes the process count and id from the cluster: drop "
                "--num_processes/--process_id, or give --coordinator=HOST:PORT"
            )
        try:
            jax.distributed.initialize(initialization_timeout=int(timeout_s))
        except (ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LaunchError(
                f"--coordinator=auto: jax found no cluster to join ({first}); run under srun "
                "(SLURM), mpirun (Open MPI) or on a TPU VM, or give --coordinator=HOST:PORT "
                "--num_processes=N --process_id=I"
            ) from None
        return
    host, port = _address(coordinator)
    if num_processes is None or process_id is None:
        raise LaunchError(
            f"--coordinator={coordinator} needs --num_processes=N and --process_id=I (0..N-1)"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise LaunchError(
            f"--process_id={process_id} must be in 0..{num_processes - 1} "
            f"(--num_processes={num_processes})"
        )
    if process_id != 0:
        _wait_for(host, port, timeout_s, coordinator, process_id, num_processes)
    jax.distributed.initialize(
        coordinator, num_processes, process_id, initialization_timeout=int(timeout_s)
    )


def _address(coordinator: str) -> tuple[str, int]:
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(
            f"--coordinator={coordinator!r} is not HOST:PORT (e.g. node01:29500), nor 'auto'"
        )
    return host.strip("[]"), int(port)


def _wait_for(host, port, timeout_s, coordinator, process_id, num_processes) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise LaunchError(
                    f"process {process_id} of {num_processes} cannot reach the coordinator at "
                    f"{coordinator} within {timeout_s:g} s ({e.strerror or e}): start process 0 "
                    "with the same --coordinator (it serves that address), check the host name "
                    "and port, or raise --dist_timeout"
                ) from None
            time.sleep(0.2)


def is_multi() -> bool:
    return jax.process_count() > 1


def is_main() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (no-op for one process)."""
    if is_multi():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast(values: list[int]) -> list[int]:
    """Process 0's integers, on every process."""
    if not is_multi():
        return list(values)
    from jax.experimental import multihost_utils

    out = multihost_utils.broadcast_one_to_all(np.asarray(values, np.int64))
    return [int(v) for v in np.asarray(out)]


def fingerprint(tree) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()


def check_same(tree, what: str = "config") -> None:
    """Raise LaunchError on every process when the processes' `tree`s differ (by a hash
    exchanged among them): one run needs one config."""
    if not is_multi():
        return
    from jax.experimental import multihost_utils

    mine = np.frombuffer(bytes.fromhex(fingerprint(tree)), np.uint8)
    hashes = np.asarray(multihost_utils.process_allgather(mine))
    others = [i for i in range(len(hashes)) if not np.array_equal(hashes[i], hashes[0])]
    if others:
        raise LaunchError(
            f"the processes resolved different {what}s: process(es) {others} differ from "
            f"process 0 ({hashes[others[0]].tobytes().hex()[:12]} vs "
            f"{hashes[0].tobytes().hex()[:12]}): launch every process with the same --config and "
            "--config.* flags, the same code and the same data"
        )


def describe() -> dict:
    """The topology of this run, for summary.json."""
    return {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "platform": jax.devices()[0].platform,
    }
