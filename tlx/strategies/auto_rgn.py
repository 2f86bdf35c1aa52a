"""auto_rgn (Lee et al. 2023, "Surgical fine-tuning"): a per-tensor LR multiplier
(||g|| / ||w||) / max over the transferred trainable tensors, the gradient averaged over `batches`
training batches of its own stream, re-estimated at the start of each epoch. The multipliers live
in the optimizer state (`tlx.transforms.scale_by_multipliers`): no recompilation when they change.
"""

import jax
import jax.numpy as jnp
import numpy as np

from tlx import compiler, transforms
from tlx import step as step_lib
from tlx.strategies.base import Strategy, register


def _check(k):
    if k.batches < 1:
        raise ValueError(f"strategy.auto_rgn.batches={k.batches}: use >= 1")


def multipliers(grads, params, eligible) -> dict:
    """m_i = (||g_i|| / ||w_i||) / max_j (||g_j|| / ||w_j||) over the eligible tensors (a tree of
    bools); 1 for the others and for eligible tensors with ||w|| = 0 (a zero-initialised tensor
    has no relative gradient norm)."""
    flat_e = jax.tree.leaves(eligible)
    ratios = []
    for g, w, e in zip(jax.tree.leaves(grads), jax.tree.leaves(params), flat_e, strict=True):
        if e:
            wn = jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32))))
            gn = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            ratios.append((wn > 0, jnp.where(wn > 0, gn / jnp.where(wn > 0, wn, 1.0), 0.0)))
        else:
            ratios.append(None)
    top = jnp.max(jnp.stack([r for _, r in filter(None, ratios)] or [jnp.float32(1.0)]))
    top = jnp.where(top > 0, top, 1.0)
    out = [
        jnp.float32(1.0) if x is None else jnp.where(x[0], x[1] / top, 1.0).astype(jnp.float32)
        for x in ratios
    ]
    return jax.tree.unflatten(jax.tree.structure(params), out)


def _hook(ctx):
    compiled = {}  # phase index -> jitted gradient of the mean loss (every leaf)

    def hook(info, state):
        if info.done % info.steps_per_epoch:
            return state
        if info.phase not in compiled:
            model = info.model.clone(axis_name=None)
            r = info.runner
            compiled[info.phase] = compiler.jit(
                step_lib.make_grad_fn(model, info.label_smoothing),
                in_shardings=(r.replicated, r.replicated, r.batch_sharding),
                out_shardings=r.replicated,
            )
        grad_fn = compiled[info.phase]
        # Its own stream: the training data order stays that of every other strategy.
        epoch = info.done // info.steps_per_epoch
        seed = int(np.random.SeedSequence([info.seed, epoch, 0xA9]).generate_state(1)[0])
        it = info.dataset.train_iter(info.batch_size, seed=seed)
        host = info.runner.get_state(state)
        total = None
        for _ in range(int(ctx.knobs.batches)):
            g = grad_fn(host["params"], host["batch_stats"], info.runner.put_eval_batch(next(it)))
            total = g if total is None else jax.tree.map(jnp.add, total, g)
        mean = jax.tree.map(lambda x: x / ctx.knobs.batches, total)
        labels = info.setup.labels
        eligible = jax.tree.map(lambda lbl: lbl.split(":")[0] == "backbone", labels)
        rgn = multipliers(mean, host["params"], eligible)
        mult = jax.tree.map(lambda r, s: r * jnp.float32(s), rgn, info.lr_mult)
        host = dict(jax.device_get(host))
        host["opt_state"] = transforms.set_multipliers(host["opt_state"], jax.device_get(mult))
        return info.runner.put_state(host)

    return hook


AUTO_RGN = register(
    Strategy(
        "auto_rgn",
        "per-tensor LR from the relative gradient norm, each epoch",
        knobs={"batches": 4},
        check=_check,
        lr_mult=lambda ctx: jax.tree.map(lambda _: 1.0, ctx.params),
        hook=_hook,
    )
)
