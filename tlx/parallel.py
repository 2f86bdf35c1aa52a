"""How a step runs on devices: `jit` over a data-parallel mesh (default) or `pmap`.

Both take the same per-batch step function; with pmap the function sees a per-device shard
and averages across the named axis `data` itself (gradients and BatchNorm statistics).
"""

import jax
import numpy as np
from flax import jax_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
MODES = ("jit", "pmap")


class Runner:
    """Places state and batches and compiles steps for one parallel mode."""

    def __init__(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"parallel={mode!r}: use 'jit' or 'pmap'")
        self.mode = mode
        self.devices = jax.local_devices()
        self.mesh = Mesh(np.array(jax.devices()), (AXIS,))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(AXIS))

    @property
    def axis_name(self) -> str | None:
        """The BatchNorm/gradient axis the model and step must use (None under jit: XLA
        computes statistics over the global batch itself)."""
        return AXIS if self.mode == "pmap" else None

    def check_batch_size(self, batch_size: int, what: str = "batch_size") -> None:
        n = len(jax.devices())
        if batch_size % n:
            raise ValueError(f"{what}={batch_size} must be divisible by the {n} devices")

    # -- state -------------------------------------------------------------------------------
    def put_state(self, state):
        if self.mode == "pmap":
            return jax_utils.replicate(state, self.devices)
        return jax.device_put(state, self.replicated)

    def get_state(self, state):
        """The state as one (unreplicated) copy, e.g. for saving or evaluation."""
        if self.mode == "pmap":
            return jax_utils.unreplicate(state)
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
            return jax.pmap(fn, axis_name=AXIS, donate_argnums=0)
        return jax.jit(
            fn,
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )

    def eval_step(self, fn):
        """fn(variables, batch) -> sums; always jit over the mesh (no BatchNorm sync in eval)."""
        return jax.jit(
            fn, in_shardings=(self.replicated, self.batch_sharding), out_shardings=self.replicated
        )

    def metrics(self, metrics):
        m = jax.device_get(metrics)
        if self.mode == "pmap":
            m = jax.tree.map(lambda x: x[0], m)
        return {k: float(v) for k, v in m.items()}
