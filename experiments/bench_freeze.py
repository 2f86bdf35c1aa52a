"""Train-step time of each freeze preset beside a forward-only pass of the same batch.

  python experiments/bench_freeze.py [--models resnet_tiny,resnet18] [--batch 64] [--repeats 7]

Steps are interleaved (one of each per round) so machine noise hits all alike; figures are
medians. The last line, `linear_probe_over_forward=X` for resnet18, is the check that XLA prunes
the backward pass of the frozen backbone (X close to 1).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tlx import freeze, models, optim, train

PRESETS = ("none", "freeze_early", "freeze_most", "linear_probe")


def build(name, strategy, x, y, classes):
    spec = freeze.default_config()
    spec.strategy = strategy
    model = models.build(name, classes, stem="cifar")
    variables = model.init(jax.random.key(0), x[:1], train=False)
    mask = freeze.frozen_mask(spec, variables["params"])
    model = model.clone(frozen_bn=freeze.frozen_stages(spec, variables["params"]))
    labels = optim.group_labels(variables["params"], mask, ["^head/"])
    cfg = optim.default_config()
    cfg.head_lr = 1e-2
    tx, _ = optim.make(cfg, labels, 1000)
    state = {
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt_state": tx.init(variables["params"]),
        "step": jnp.int32(0),
    }
    step = jax.jit(train.make_train_step(model, tx, labels), donate_argnums=0)
    batch = {"image": x, "label": y}
    holder = {"state": state}

    def run():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m["loss"])

    return run


def build_forward(name, x, classes):
    model = models.build(name, classes, stem="cifar")
    variables = model.init(jax.random.key(0), x[:1], train=False)
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return lambda: jax.block_until_ready(fwd(variables, x))


def bench(name, batch, size, repeats):
    classes = 10
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
    y = jnp.arange(batch) % classes
    fns = {"forward": build_forward(name, x, classes)}
    fns |= {p: build(name, p, x, y, classes) for p in PRESETS}
    for fn in fns.values():  # compile and warm up
        fn()
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet_tiny,resnet18")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(
        f"backend={jax.default_backend()} devices={jax.device_count()} batch={args.batch} "
        f"image={args.size}x{args.size} repeats={args.repeats} (median ms)"
    )
    print(f"{'model':<12} {'step':<13} {'ms':>9} {'x forward':>10} {'img/s':>9}")
    ratios = {}
    for name in args.models.split(","):
        t = bench(name, args.batch, args.size, args.repeats)
        for k, v in t.items():
            print(
                f"{name:<12} {k:<13} {1e3 * v:9.1f} {v / t['forward']:10.2f} {args.batch / v:9.0f}"
            )
        ratios[name] = t["linear_probe"] / t["forward"]
    for name, r in ratios.items():
        print(f"{name}: linear_probe_over_forward={r:.3f}")
    if "resnet18" in ratios:
        print(f"linear_probe_over_forward={ratios['resnet18']:.3f}")
    np.testing.assert_(all(np.isfinite(list(ratios.values()))))


if __name__ == "__main__":
    main()
