"""lora (Hu et al. 2021, "LoRA: low-rank adaptation"): the backbone frozen, each targeted kernel W
runs as W + (alpha / rank) A B, with A (in, rank) random and B (rank, out) zero (the run starts as
the base model); A, B and the head train. `merge` folds the factors into plain weights, `export`
writes them as a checkpoint `init_from` reads (or a big_vision .npz for `tlx.convert.vit`).

Factors sit beside their kernel: `.../query/lora_a`, `.../query/lora_b`. A kernel's in/out split:
query/key/value (D, heads, D/heads) after its first axis; every other kernel (Dense, the
attention's `out` (heads, D/heads, D), a conv) before its last. The model sees merged kernels
(`apply_params`), so the merged export computes the same function.
"""

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tlx.strategies.base import Strategy, register

ATTENTION = r"MultiHeadDotProductAttention_1/(query|key|value|out)/kernel$"
MLP = r"MlpBlock_3/Dense_[01]/kernel$"
FACTORS = ("lora_a", "lora_b")


def _check(k):
    if int(k.rank) < 1:
        raise ValueError(f"strategy.lora.rank={k.rank}: use a rank >= 1")
    try:
        re.compile(k.targets)
    except re.error as e:
        raise ValueError(
            f"strategy.lora.targets={k.targets!r} is not a valid regex ({e})"
        ) from None


def target_regex(knobs) -> str:
    return f"(?:{knobs.targets})|(?:{MLP})" if knobs.mlp else knobs.targets


def _split(path: str, ndim: int) -> int:
    """How many leading axes of a kernel are its inputs."""
    return 1 if re.search(r"/(query|key|value)/kernel$", path) else ndim - 1


def targets(params, regex: str) -> list[str]:
    """The kernels (paths, '/'-joined, ndim >= 2, not in the head) that `regex` selects."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    return [
        p
        for p, x in flat.items()
        if not p.startswith("head/")
        and p.endswith("/kernel")
        and len(x.shape) >= 2
        and re.search(regex, p)
    ]


def _init(ctx, params, rng):
    regex = target_regex(ctx.knobs)
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    chosen = targets(params, regex)
    cnn = not any("MultiHeadDotProductAttention" in p for p in flat)
    if not chosen and cnn and ctx.knobs.targets == ATTENTION:
        # A CNN: the default targets are a ViT's attention (and MLP) Dense kernels. A conv kernel
        # (kh, kw, in, out) factors as (kh*kw*in, rank) x (rank, out), peft's Conv2d LoRA of
        # Hu et al. 2021's W + BA (github.com/huggingface/peft, src/peft/tuners/lora/layer.py).
        raise ValueError(
            "strategy=lora targets the Dense kernels of a ViT's attention by default and this "
            "model has no attention (a CNN): use a ViT backbone (vit_ti4, vit_s16, ...), or "
            "select conv kernels with strategy.lora.targets (e.g. '^stage3/.*/kernel$')"
        )
    if not chosen:
        raise ValueError(
            f"strategy.lora.targets={regex!r} selects no kernel; the kernels are:\n  "
            + "\n  ".join(p for p in flat if p.endswith("/kernel"))
        )
    r = int(ctx.knobs.rank)
    out = dict(flat)
    for i, path in enumerate(chosen):
        shape = flat[path].shape
        k = _split(path, len(shape))
        fan_in, fan_out = math.prod(shape[:k]), math.prod(shape[k:])
        bound = 1.0 / math.sqrt(fan_in)  # peft's kaiming_uniform(a=sqrt(5)) for A
        base = path[: -len("kernel")]
        key = jax.random.fold_in(rng, i)
        out[base + "lora_a"] = jax.random.uniform(key, (fan_in, r), jnp.float32, -bound, bound)
        out[base + "lora_b"] = jnp.zeros((r, fan_out), jnp.float32)
    return traverse_util.unflatten_dict(out, sep="/")


def merge(params, alpha: float):
    """Plain params: every kernel with factors beside it replaced by W + (alpha / rank) A B, the
    factors dropped. `alpha` is the run's `strategy.lora.alpha`."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    out = {p: x for p, x in flat.items() if p.rsplit("/", 1)[-1] not in FACTORS}
    for p, a in flat.items():
        if not p.endswith("/lora_a"):
            continue
        base = p[: -len("lora_a")]
        w, b = flat[base + "kernel"], flat[base + "lora_b"]
        delta = (alpha / a.shape[1]) * (a @ b)
        out[base + "kernel"] = w + delta.reshape(w.shape).astype(w.dtype)
    return traverse_util.unflatten_dict(out, sep="/")


def _frozen(ctx):
    # Everything but the factors and the head (lookaheads: re.search over '/'-joined paths).
    return [r"^(?!head/)(?!.*/lora_[ab]$)"]


def trainable_count(params, knobs) -> int:
    """The factors' size: rank x (fan_in + fan_out) per targeted kernel (without the head)."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    total = 0
    for p in targets(params, target_regex(knobs)):
        shape = flat[p].shape
        k = _split(p, len(shape))
        total += int(knobs.rank) * (math.prod(shape[:k]) + math.prod(shape[k:]))
    return total


def export(workdir: str, out: str) -> str:
    """The merged (plain) params and batch_stats of the LoRA run in `workdir`, written to `out`:
    a '.npz' path gets big_vision's layout (`tlx.convert.vit.load` reads it, ViTs only), any
    other path an orbax state directory that `init_from=OUT` reads. Returns `out`."""
    from tlx import checkpoint

    with open(os.path.join(workdir, "config.json")) as f:
        cfg = json.load(f)
    if cfg["strategy"]["name"] != "lora":
        raise ValueError(f"{workdir} is a {cfg['strategy']['name']!r} run, not a lora run")
    variables = checkpoint.read_variables(workdir)
    params = jax.tree.map(np.asarray, merge(variables["params"], cfg["strategy"]["lora"]["alpha"]))
    if out.endswith(".npz"):
        from tlx.convert import vit as convert_vit

        convert_vit.save_npz(out, convert_vit.to_big_vision(params))
        return out
    import orbax.checkpoint as ocp

    plain = {"params": params, "batch_stats": variables.get("batch_stats", {})}
    ocp.PyTreeCheckpointer().save(os.path.join(os.path.abspath(out), "state"), plain)
    return out


LORA = register(
    Strategy(
        "lora",
        "low-rank factors on the attention kernels train, the backbone is frozen",
        knobs={"rank": 8, "alpha": 8.0, "targets": ATTENTION, "mlp": False},
        check=_check,
        frozen=_frozen,
        init_params=_init,
        apply_params=lambda ctx, params: merge(params, float(ctx.knobs.alpha)),
        tags=("peft",),
    )
)
