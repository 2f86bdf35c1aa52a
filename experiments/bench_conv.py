"""ResNet train steps with tlx's fast convolutions, XLA's own and PyTorch eager, side by side.

    .venv/bin/python experiments/bench_conv.py [--repeats=5] [--models=resnet18,resnet50]

One process: every configuration is compiled and warmed up first, then the steps run interleaved
(one step of each configuration per round), so load from other processes falls on all alike;
the table reports medians and minima over the rounds. Models: resnet18 at batch 64, 32 px,
CIFAR stem (3x3/1, no max-pool); resnet50 at batch 32, 64 px, ImageNet stem. Steps:
  full     forward + backward + AdamW update of every parameter, BatchNorm in train mode;
  probe    the backbone frozen (BatchNorm on running statistics, no gradient), the head trained
           with AdamW: a linear probe (JAX differentiates the head alone, XLA prunes the rest);
  forward  tlx only: the forward pass alone (train=False), the floor of the probe step.
JAX steps are bare (value_and_grad + optax.adamw, the backbone passed as an argument);
`fast` is conv='fast' (tlx.models.conv), `xla` is conv='xla' (lax.conv_general_dilated with
XLA's autodiff), both compiled with tlx's compiler options (`tlx.compiler.options()`: on CPU,
convolutions to XLA's Eigen instead of YNNPACK), as every tlx run compiles its steps;
`xla_defaults` is conv='xla' compiled with XLA's default options (YNNPACK convolutions): what a
bare `jax.jit` gets, and what tlx ran before it passed its own. torch:
tlx.convert.torch_reference's torchvision-layout ResNet (CIFAR stem swapped in for resnet18),
torch.set_num_threads(os.cpu_count()). The last lines are `<model>_full_over_torch=`,
`<model>_probe_over_torch=` (median fast / median torch), the same for xla and xla_defaults,
and `<model>_probe_over_forward=` (fast: the freeze contract, at most 1.15). CPU s is
this process's CPU time per step (torch's OpenMP threads spin while they wait, which counts).
Under load (other processes on the cores) torch eager slows down far more than XLA: compare the
minima then, and note the load average printed beside the figures.
"""

import argparse
import os
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tlx import compiler, models

NUM_CLASSES = 10
SETUPS = {  # model -> (batch, size, stem)
    "resnet18": (64, 32, "cifar"),
    "resnet34": (64, 32, "cifar"),
    "resnet50": (32, 64, "imagenet"),
}
STAGES = ("stem", "stage1", "stage2", "stage3", "stage4")


def jax_step(backbone, mode, impl):
    """A compiled step and its state; returns run() (one step, blocking)."""
    conv = "xla" if impl == "xla_defaults" else impl
    options = None if impl == "xla_defaults" else compiler.options()
    batch, size, stem = SETUPS[backbone]
    frozen = STAGES if mode == "probe" else ()
    model = models.build(backbone, NUM_CLASSES, stem=stem, conv=conv, frozen_bn=frozen)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    y = jnp.asarray(np.arange(batch) % NUM_CLASSES)
    variables = jax.jit(lambda: model.init(jax.random.key(0), x[:1], train=False))()
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adamw(1e-3)

    def loss(params, stats):
        logits, upd = model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    if mode == "full":
        state = (params, stats, tx.init(params))

        def step(state):
            params, stats, opt = state
            (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(params, stats)
            updates, opt = tx.update(grads, opt, params)
            return (optax.apply_updates(params, updates), upd["batch_stats"], opt), value

        compiled = jax.jit(step, donate_argnums=0).lower(state).compile(options)
    elif mode == "probe":
        backbone_params = {k: v for k, v in params.items() if k != "head"}
        state = (params["head"], tx.init(params["head"]))

        def step(state, backbone_params, stats):
            head, opt = state
            (value, _), grads = jax.value_and_grad(
                lambda h: loss({**backbone_params, "head": h}, stats), has_aux=True
            )(head)
            updates, opt = tx.update(grads, opt, head)
            return (optax.apply_updates(head, updates), opt), value

        lowered = jax.jit(step, donate_argnums=0).lower(state, backbone_params, stats)
        compiled = functools_partial(lowered.compile(options), backbone_params, stats)
    else:  # forward
        state = None

        def step(_, variables):
            return None, model.apply(variables, x, train=False)

        lowered = jax.jit(step).lower(None, variables)
        compiled = functools_partial(lowered.compile(options), variables)
    box = [state]

    def run():
        box[0], out = compiled(box[0])
        jax.block_until_ready(out)

    run()
    return run


def functools_partial(compiled, *args):
    return lambda state: compiled(state, *args)


def torch_step(backbone, mode):
    import torch

    from tlx.convert import torch_reference

    batch, size, stem = SETUPS[backbone]
    torch.manual_seed(0)
    net = torch_reference.build(backbone, NUM_CLASSES)
    if stem == "cifar":
        net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)

        def forward(self, x):
            x = torch.nn.functional.relu(self.bn1(self.conv1(x)))
            for i in range(1, 5):
                x = getattr(self, f"layer{i}")(x)
            return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))

        net.forward = types.MethodType(forward, net)
    if mode == "full":
        net.train()
        trainable = list(net.parameters())
    else:
        net.eval()  # BatchNorm on running statistics
        for p in net.parameters():
            p.requires_grad_(False)
        for p in net.fc.parameters():
            p.requires_grad_(True)
        trainable = list(net.fc.parameters())
    opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch, 3, size, size)).astype(np.float32))
    y = torch.from_numpy(np.arange(batch) % NUM_CLASSES)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()

    run()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--modes", default="full,probe")
    parser.add_argument("--impls", default="fast,xla,xla_defaults,torch")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f}; "
        f"tlx compiler options {compiler.options()}",
        flush=True,
    )
    configs = {}  # (model, mode, impl) -> run
    for backbone in args.models.split(","):
        modes = args.modes.split(",")
        if "probe" in modes and "fast" in args.impls.split(","):
            modes.append("forward")
        for mode in modes:
            for impl in args.impls.split(","):
                if mode == "forward" and impl != "fast":
                    continue
                t0 = time.perf_counter()
                if impl == "torch":
                    configs[(backbone, mode, impl)] = torch_step(backbone, mode)
                else:
                    configs[(backbone, mode, impl)] = jax_step(backbone, mode, impl)
                print(
                    f"  ready: {backbone} {mode} {impl} ({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )

    times = {key: [] for key in configs}
    cpu = {key: [] for key in configs}  # this process's CPU seconds (all threads) per step
    for _ in range(args.repeats):
        for key, run in configs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            times[key].append(time.perf_counter() - t0)
            cpu[key].append(time.process_time() - c0)

    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    low = {k: 1e3 * float(np.min(v)) for k, v in times.items()}
    load = os.getloadavg()[0]
    print(f"\n{args.repeats} interleaved rounds; load average at the end {load:.1f}\n")
    print(
        "| model | batch, px | step | conv | median ms | min ms | / torch median | / torch min "
        "| CPU s (median) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (backbone, mode, impl), m in med.items():
        batch, size, _ = SETUPS[backbone]
        ref = (backbone, "probe" if mode == "forward" else mode, "torch")
        ratio = f"{m / med[ref]:.2f}" if ref in med else "-"
        ratio_min = f"{low[(backbone, mode, impl)] / low[ref]:.2f}" if ref in low else "-"
        print(
            f"| {backbone} | {batch}, {size} | {mode} | {impl} | {m:.0f} | "
            f"{low[(backbone, mode, impl)]:.0f} | {ratio} | {ratio_min} | "
            f"{np.median(cpu[(backbone, mode, impl)]):.2f} |"
        )
    print()
    for backbone in args.models.split(","):
        for impl, tag in (("fast", ""), ("xla", "_xla"), ("xla_defaults", "_xla_defaults")):
            for mode in ("full", "probe"):
                key, ref = (backbone, mode, impl), (backbone, mode, "torch")
                if key in med and ref in med:
                    print(f"{backbone}_{mode}{tag}_over_torch={med[key] / med[ref]:.2f}")
        if (backbone, "forward", "fast") in med and (backbone, "probe", "fast") in med:
            ratio = med[(backbone, "probe", "fast")] / med[(backbone, "forward", "fast")]
            print(f"{backbone}_probe_over_forward={ratio:.2f}")


if __name__ == "__main__":
    main()
