"""Train-step speed of tlx's mobile backbones against the same step in PyTorch eager, side by side.

    .venv/bin/python experiments/bench_backbones.py [--repeats=10] [--batch=32] [--size=96]

One process, one machine: every configuration is compiled/warmed up first, then the steps run
interleaved (one step of each configuration per round) so that load from other processes falls on
all of them alike; the table reports medians (and minima) over the rounds. Steps:
  full    forward + backward + SGD-momentum update of every parameter, BatchNorm in train mode
          (fine-tuning the whole network);
  frozen  the backbone frozen (BatchNorm on running statistics, no gradient), only the classifier
          trained (a linear probe; JAX differentiates the head alone, XLA prunes the rest).
The torch side uses tlx.convert.torch_reference (torchvision / lukemelas layouts) with
torch.set_num_threads(os.cpu_count()). `tlx grouped` is the same tlx model on XLA's own
convolutions (depthwise_impl='grouped': feature_group_count=C for depthwise, nn.Conv for 1x1),
the naive version. Needs the optional extra (torch): requirements-pretrained.txt.
The last line is `mobilenet_v2_full_over_torch=X` (median tlx / median torch).
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tlx import compiler, models

NUM_CLASSES = 10


def tlx_step(backbone, mode, batch, size, depthwise_impl="shifted"):
    """A compiled train step and its state; returns (run_once, compile_seconds)."""
    stages = ("stem", "stage1", "stage2", "stage3", "stage4")
    model = models.build(
        backbone,
        NUM_CLASSES,
        depthwise_impl=depthwise_impl,
        frozen_bn=stages if mode == "frozen" else (),
    )
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    y = jnp.asarray(np.arange(batch) % NUM_CLASSES)
    variables = jax.jit(lambda: model.init(jax.random.key(0), x[:1], train=False))()
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(0.01, momentum=0.9)

    if mode == "full":
        state = (params, stats, tx.init(params))

        def step(state, x, y):
            params, stats, opt = state

            def loss_fn(params):
                logits, upd = model.apply(
                    {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
                )
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

            (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), upd["batch_stats"], opt), loss
    else:
        head = params["head"]
        state = (head, tx.init(head))
        backbone = {k: v for k, v in params.items() if k != "head"}

        def step(state, x, y):
            head, opt = state

            def loss_fn(head):
                logits, _ = model.apply(
                    {"params": {**backbone, "head": head}, "batch_stats": stats},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                )
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            loss, grads = jax.value_and_grad(loss_fn)(head)
            updates, opt = tx.update(grads, opt, head)
            return (optax.apply_updates(head, updates), opt), loss

    t0 = time.perf_counter()
    compiled = compiler.jit(step, donate_argnums=0).lower(state, x, y).compile()
    compile_s = time.perf_counter() - t0
    box = [state]

    def run():
        box[0], loss = compiled(box[0], x, y)
        loss.block_until_ready()

    run()
    return run, compile_s


def torch_step(backbone, mode, batch, size):
    import torch

    from tlx.convert import torch_reference

    torch.manual_seed(0)
    net = torch_reference.build(backbone, NUM_CLASSES)
    head = net.classifier[1] if backbone == "mobilenet_v2" else net._fc
    if mode == "full":
        net.train()
        trainable = list(net.parameters())
    else:
        net.eval()  # BatchNorm on running statistics, dropout off
        for p in net.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
        trainable = list(head.parameters())
    opt = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch, 3, size, size)).astype(np.float32))
    y = torch.from_numpy(np.arange(batch) % NUM_CLASSES)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()

    run()
    return run, 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--backbones", default="mobilenet_v2,efficientnet_lite0")
    parser.add_argument("--modes", default="full,frozen", help="full, frozen or both")
    parser.add_argument(
        "--grouped",
        default="mobilenet_v2",
        help="backbones to also time with XLA's grouped depthwise ('' for none)",
    )
    args = parser.parse_args()

    import torch

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), batch {args.batch}, {args.size} px, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    configs = {}  # (backbone, mode, impl) -> (run, compile_s)
    for backbone in args.backbones.split(","):
        for mode in args.modes.split(","):
            impls = ["tlx", "torch"]
            if mode == "full" and backbone in args.grouped.split(","):
                impls.append("tlx grouped")
            for impl in impls:
                if impl == "torch":
                    configs[(backbone, mode, impl)] = torch_step(
                        backbone, mode, args.batch, args.size
                    )
                else:
                    dw = "grouped" if impl == "tlx grouped" else "shifted"
                    configs[(backbone, mode, impl)] = tlx_step(
                        backbone, mode, args.batch, args.size, dw
                    )
                print(
                    f"  ready: {backbone} {mode} {impl} "
                    f"(compile {configs[(backbone, mode, impl)][1]:.1f} s)",
                    flush=True,
                )

    times = {key: [] for key in configs}
    for _ in range(args.repeats):
        for key, (run, _) in configs.items():
            t0 = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t0)

    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    low = {k: 1e3 * float(np.min(v)) for k, v in times.items()}
    print(
        f"\n{args.repeats} interleaved rounds; load average at the end {os.getloadavg()[0]:.1f}\n"
    )
    print("| backbone | step | impl | median ms | min ms | img/s | / torch (median) | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for (backbone, mode, impl), (_, compile_s) in configs.items():
        key = (backbone, mode, impl)
        ratio = med[key] / med[(backbone, mode, "torch")]
        print(
            f"| {backbone} | {mode} | {impl} | {med[key]:.0f} | {low[key]:.0f} | "
            f"{args.batch / med[key] * 1e3:.0f} | {ratio:.2f} | "
            f"{compile_s:.1f} |"
        )
    load = os.getloadavg()[0]
    if load > 1.5:
        print(
            f"\nNote: load average {load:.1f} on {threads} cores. Under contention torch's eager "
            "OpenMP threads slow down far more than XLA's, which flatters the medians; the "
            "minima (least disturbed steps) are the fairer comparison then."
        )
    if ("mobilenet_v2", "full", "tlx") in med:
        key, ref = ("mobilenet_v2", "full", "tlx"), ("mobilenet_v2", "full", "torch")
        print(f"\nmobilenet_v2_full_over_torch_min={low[key] / low[ref]:.2f}")
        print(f"mobilenet_v2_full_over_torch={med[key] / med[ref]:.2f}")


if __name__ == "__main__":
    main()
