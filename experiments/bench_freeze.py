"""Train-step time of every strategy: tlx's step against a bare JAX step of the same trainable set,
and against a forward-only pass of the same batch.

  python experiments/bench_freeze.py [--models resnet_tiny,resnet18] [--batch 64] [--repeats 7]
  python experiments/bench_freeze.py --models vit_ti4 --strategies none,linear_probe,lora

The tlx step is what `train.run` compiles (`strategies.plan(...).train_step`: multi_transform
over the optimizer groups, set_to_zero for frozen leaves, the strategy's transforms). The bare
step is the same math written directly: the gradient of the trainable leaves only, one
`optax.adamw` over them, the strategy's multipliers and L2-SP term by hand. Steps are interleaved
(one of each per round) so machine noise hits all alike; figures are medians. The ratios are of
process CPU time (all of XLA's threads), which other jobs on the machine disturb far less than wall
time; the wall-time ratio is printed beside each. Last lines:
`over_bare=` per strategy (tlx / bare, aim <= 1.05), `none_over_scratch=` (images/s of
strategy=none over scratch, aim >= 0.95), `linear_probe_over_forward=` (XLA prunes the frozen
backward: close to 1) and, for the strategies tagged 'peft' (lora, bitfit, adapter, vpt),
`S_over_none=` (their step over full fine-tuning's). A strategy that adds parameters (LoRA's
factors) trains them in the bare step too, the model running as the plan runs it (`plan.model`).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tlx import compiler, freeze, models, strategies
from tlx import config as tlx_config
from tlx.step import cross_entropy

STRATEGIES = (
    "none linear_probe freeze_most freeze_early freeze_stages gradual_unfreeze layer_decay lp_ft "
    "l2_sp surgical auto_rgn scratch"
).split()


def setup(name, strategy, batch, size, classes, dtype="float32"):
    c = tlx_config.load(
        f"configs/finetune.py:backbone={name},strategy={strategy},steps=1000,"
        f"batch_size={batch},image_size={size}"
    )
    model = models.build(
        name, classes, stem=c.model.stem or None, dtype=models.compute_dtype(dtype)
    )
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
    variables = {"batch_stats": {}, **model.init(jax.random.key(0), x[:1], train=False)}
    plan = strategies.plan(c, variables, steps_per_epoch=100, from_checkpoint=True)
    return c, model, variables, plan, {"image": x, "label": jnp.arange(batch) % classes}


def timed(step, state, batch):
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m)

    return run


def build_tlx(c, model, variables, plan, batch):
    step = compiler.jit(plan.train_step(model), donate_argnums=0)
    return timed(step, plan.init_state(jax.tree.map(jnp.array, variables)), batch)


def build_bare(c, model, variables, plan, batch):
    """The same trainable set and math, without tlx: no multi_transform, no labels."""
    mask = plan.phases[0].mask
    params = plan.init_state(variables)["params"]  # with a strategy's new leaves
    paths = freeze.leaf_paths(params)
    flat = dict(zip(paths, jax.tree.leaves(params), strict=True))
    is_frozen = dict(zip(paths, jax.tree.leaves(mask), strict=True))
    trainable = {p: v for p, v in flat.items() if not is_frozen[p]}
    frozen = {p: v for p, v in flat.items() if is_frozen[p]}
    treedef = jax.tree.structure(params)
    mults = dict(zip(paths, jax.tree.leaves(plan.lr_mult), strict=True)) if plan.lr_mult else {}
    l2 = strategies.knobs_of(c) if c.strategy.name == "l2_sp" else None
    o = c.optim
    tx = optax.adamw(
        o.lr, b1=o.momentum, b2=o.b2, weight_decay=o.weight_decay, mask=lambda t: {
            p: v.ndim > 1 for p, v in t.items()}
    )  # fmt: skip
    phase_model = plan.model(model)
    w0 = dict(trainable)

    def step(state, batch):
        tr, frozen, opt_state, bs = state  # frozen leaves: inputs (as loaded), not constants

        def loss_fn(tr):
            params = jax.tree.unflatten(treedef, [tr[p] if p in tr else frozen[p] for p in paths])
            logits, new = phase_model.apply(
                {"params": params, "batch_stats": bs}, batch["image"], train=True,
                mutable=["batch_stats"],
            )  # fmt: skip
            return cross_entropy(logits, batch["label"]), new.get("batch_stats", {})

        (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(tr)
        if l2 is not None:
            g = {
                p: g[p] + (l2.beta * tr[p] if p.startswith("head/") else l2.alpha * (tr[p] - w0[p]))
                for p in g
            }
        u, opt_state = tx.update(g, opt_state, tr)
        if mults:
            u = {p: u[p] * mults[p] for p in u}
        return (optax.apply_updates(tr, u), frozen, opt_state, bs), loss

    state = (trainable, frozen, tx.init(trainable), variables["batch_stats"])
    return timed(compiler.jit(step, donate_argnums=0), jax.tree.map(jnp.array, state), batch)


def build_forward(model, variables, batch):
    fwd = compiler.jit(lambda v, x: model.apply(v, x, train=False))
    return lambda: jax.block_until_ready(fwd(variables, batch["image"]))


def bench(name, batch, size, repeats, names):
    classes = 10
    fns = {}
    for s in names:
        c, model, variables, plan, b = setup(name, s, batch, size, classes)
        fns[s] = build_tlx(c, model, variables, plan, b)
        fns[f"{s}/bare"] = build_bare(c, model, variables, plan, b)
    fns["forward"] = build_forward(model, variables, b)
    for fn in fns.values():  # compile and warm up
        fn()
        fn()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    med = lambda d: {k: statistics.median(v) for k, v in d.items()}  # noqa: E731
    return med(wall), med(cpu)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet_tiny")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    names = args.strategies.split(",")
    print(
        f"backend={jax.default_backend()} devices={jax.device_count()} batch={args.batch} "
        f"image={args.size}x{args.size} repeats={args.repeats} (median ms)"
    )
    print(
        f"{'model':<12} {'strategy':<17} {'tlx ms':>8} {'bare ms':>8} {'over_bare':>9} {'img/s':>7}"
    )
    lines = []
    for name in args.models.split(","):
        t, cpu = bench(name, args.batch, args.size, args.repeats, names)
        for s in names:
            r = t[s] / t[f"{s}/bare"]
            print(
                f"{name:<12} {s:<17} {1e3 * t[s]:8.1f} {1e3 * t[f'{s}/bare']:8.1f} {r:9.3f} "
                f"{args.batch / t[s]:7.0f}"
            )
            r_cpu = cpu[s] / cpu[f"{s}/bare"]
            lines.append(f"{name} {s}: over_bare={r_cpu:.3f} (wall: {r:.3f})")
        print(f"{name:<12} {'forward':<17} {1e3 * t['forward']:8.1f}")
        if "none" in names and "scratch" in names:
            lines.append(
                f"{name}: none_over_scratch={cpu['scratch'] / cpu['none']:.3f} "
                f"(wall: {t['scratch'] / t['none']:.3f})"
            )
        if "linear_probe" in names:
            lines.append(
                f"{name}: linear_probe_over_forward={t['linear_probe'] / t['forward']:.3f}"
            )
        for s in (s for s in strategies.tagged("peft") if s in names and "none" in names):
            lines.append(f"{name}: {s}_over_none={t[s] / t['none']:.3f}")
    print("\n".join(lines))
    np.testing.assert_(all(np.isfinite(list(t.values()))))


if __name__ == "__main__":
    main()
