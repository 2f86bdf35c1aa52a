"""Train-step time in bfloat16 against float32 (`config.model.dtype`): tlx's own step (what
`train.run` compiles, from `bench_freeze`), the same model, batch and strategy in both dtypes.

  python experiments/bench_precision.py [--models resnet_tiny,vit_ti4] [--strategies none]

Steps are interleaved (one of each per round), figures are medians of wall time. Last lines:
`MODEL STRATEGY: bf16_over_f32=` (step time in bf16 / in float32: below 1 where the hardware has
fast bf16 kernels, e.g. tensor cores; XLA:CPU mostly converts) and the images/s of each.
"""

import argparse
import statistics
import time

import jax
import numpy as np
from bench_freeze import build_tlx, setup

DTYPES = ("float32", "bfloat16")


def bench(name, strategy, batch, size, repeats):
    fns = {}
    for dtype in DTYPES:
        c, model, variables, plan, b = setup(name, strategy, batch, size, 10, dtype)
        fns[dtype] = build_tlx(c, model, variables, plan, b)
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
    ap.add_argument("--models", default="resnet_tiny,vit_ti4")
    ap.add_argument("--strategies", default="none,linear_probe")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    device = jax.devices()[0]
    print(
        f"backend={jax.default_backend()} device={device.device_kind} batch={args.batch} "
        f"image={args.size}x{args.size} repeats={args.repeats} (median wall ms)"
    )
    lines = []
    for name in args.models.split(","):
        for s in args.strategies.split(","):
            t = bench(name, s, args.batch, args.size, args.repeats)
            f32, bf16 = t["float32"], t["bfloat16"]
            print(f"{name:<12} {s:<13} f32 {1e3 * f32:8.1f}  bf16 {1e3 * bf16:8.1f}")
            lines.append(
                f"{name} {s}: bf16_over_f32={bf16 / f32:.3f} "
                f"(img/s f32 {args.batch / f32:.0f}, bf16 {args.batch / bf16:.0f})"
            )
            np.testing.assert_(all(np.isfinite(list(t.values()))))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
