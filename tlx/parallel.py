"""How a step runs on devices: `jit` over a data-parallel mesh (default) or `pmap`.

Both take the same per-batch step function; with pmap the function sees a per-device shard
and averages across the named axis `data` itself (gradients and BatchNorm statistics).

Both span every process of a multi-process run (`tlx.distributed`): the mesh holds all devices,
each process feeds its rows of a global batch (`local_rows`), and what comes back to the host
(`get_state`, `metrics`) is the same on every process.
"""

import jax
import numpy as np
from flax import jax_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tlx import compiler

AXIS = "data"
MODES = ("jit", "pmap")


class Runner:
    """Places state and batches and compiles steps for one parallel mode."""

    def __init__(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"parallel={mode!r}: use 'jit' or 'pmap'")
        self.mode = mode
        self.devices = jax.local_devices()
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.mesh = Mesh(np.array(jax.devices()), (AXIS,))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(AXIS))

    @property
    def axis_name(self) -> str | None:
        """The BatchNorm/gradient axis the model and step must use (None under jit: XLA
        computes statistics over the global batch itself)."""
        return AXIS if self.mode == "pmap" else None

    def local_rows(self, batch_size: int) -> slice:
        """This process's rows of a global batch of `batch_size`."""
        local = batch_size // self.process_count
        return slice(self.process_index * local, (self.process_index + 1) * local)

    # -- state -------------------------------------------------------------------------------
    def put_state(self, state):
        if self.process_count > 1:  # the same values on every process, from the host
            state = jax.tree.map(host_copy, state)
        if self.mode == "pmap":
            return jax_utils.replicate(state, self.devices)
        return jax.device_put(state, self.replicated)

    def get_state(self, state):
        """The state as one (unreplicated) copy, e.g. for saving or evaluation."""
        if self.mode == "pmap":
            if self.process_count > 1:  # x[0] would be process 0's shard: take a local one
                return jax.tree.map(lambda x: x.addressable_data(0)[0], state)
            return jax_utils.unreplicate(state)
        return state

    def save_state(self, state):
        """The state to hand to a checkpoint save. With several processes under pmap each holds
        its own copy of it, which orbax would write once per process: host arrays instead (orbax
        writes those from process 0). Under jit the state is one global array already."""
        state = self.get_state(state)
        if self.mode == "pmap" and self.process_count > 1:
            return jax.tree.map(host_copy, state)
        return state

    # -- batches ------------------------------------------------------------------------------
    def put_batch(self, batch: dict):
        if self.mode == "pmap":
            n = len(self.devices)
            return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch
        )

    def put_eval_batch(self, batch: dict):
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch
        )

    # -- steps -------------------------------------------------------------------------------
    def train_step(self, fn):
        """fn(state, batch) -> (state, metrics); pmap'd fns must pmean themselves."""
        if self.mode == "pmap":
            return compiler.pmap(fn, axis_name=AXIS, donate_argnums=0)
        return compiler.jit(
            fn,
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )

    def eval_step(self, fn):
        """fn(variables, batch) -> sums; always jit over the mesh (no BatchNorm sync in eval)."""
        return compiler.jit(
            fn, in_shardings=(self.replicated, self.batch_sharding), out_shardings=self.replicated
        )

    def metrics(self, metrics):
        if self.mode == "pmap":
            metrics = jax.tree.map(lambda x: x.addressable_data(0), metrics)
        m = jax.device_get(metrics)
        return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in m.items()}


def host_copy(x):
    """A numpy copy of `x`: a host value, a local array, or a global one replicated across
    processes (read from this process's own shard)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def check_batch_size(batch_size: int, what: str = "batch_size") -> None:
    """A global batch must split evenly over every device of every process."""
    n, processes = jax.device_count(), jax.process_count()
    if batch_size % n:
        where = f" ({processes} processes x {jax.local_device_count()})" * (processes > 1)
        raise ValueError(
            f"{what}={batch_size} must be divisible by the {n} devices{where}: "
            f"use a multiple of {n}"
        )
