"""ViT weights -> tlx (`tlx.models.vit`), strictly: big_vision / AugReg .npz files and timm
state dicts, with the position embedding resampled to the model's resolution.

A converter is a list of `Rule`s (source names -> tlx paths, and how to compute the one from the
other), applied as `tlx.convert.torch_to_flax.convert` applies its maps: every source used
once, every model leaf filled, every shape equal to the model's (`jax.eval_shape`), or a
`ConversionError` that lists the names. `ignore` regexes drop source keys knowingly (e.g.
'^pre_logits/', the representation layer of the original ViT's ImageNet-21k files).

Layouts read:
- big_vision (2022 on): `embedding/{kernel,bias}`, `pos_embedding` (1, h*w, D), `cls` (1, 1, D)
  (pool_type 'tok' only), `Transformer/encoderblock_N/...`, `Transformer/encoder_norm/...`,
  `head/...`, '/'-joined keys in an .npz (as big_vision and vision_transformer save them).
- vision_transformer / AugReg: the same, but the position embedding is
  `Transformer/posembed_input/pos_embedding` (1, 1 + h*w, D), its first row the cls token's; it
  is folded into `cls` (cls + pe[0]: the same function), as big_vision's `fix_old_checkpoints`.
- timm `VisionTransformer`: `patch_embed.proj`, `cls_token`, `pos_embed` (1, 1 + h*w, D),
  `blocks.N.{norm1, attn.qkv (fused), attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`, `head`. timm
  trains with the exact GELU: build the model with approximate_gelu=False for its logits. timm's
  global-average models normalise after pooling (`fc_norm`), not before as big_vision: the strict
  report names fc_norm as unused and norm as missing.
Resampling is big_vision's `resample_posemb` recipe: the (h, w, D) grid zoomed bilinearly
(scipy.ndimage.zoom, order 1) to the new grid, the cls token kept as it is.
"""

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
from flax import traverse_util

from tlx import models
from tlx.convert.torch_to_flax import ConversionError
from tlx.models.vit import ViT

# Where big_vision and its predecessors keep the position embedding, newest first.
POSEMB_KEYS = (
    "pos_embedding",
    "Transformer/pos_embedding",
    "Transformer/posembed_input/pos_embedding",
)


@dataclasses.dataclass(frozen=True)
class Rule:
    sources: tuple[str, ...]  # source keys, e.g. ('blocks.0.attn.qkv.weight', ...)
    targets: tuple[str, ...]  # tlx param paths, e.g. ('stage1/encoderblock_0/.../query/kernel',)
    # (source arrays, target shapes) -> target arrays; ValueError = the sources do not fit.
    fn: Callable[[list[np.ndarray], list[tuple]], list[np.ndarray]]


def _copy(arrays, shapes):
    return arrays


# ---------------------------------------------------------------- big_vision names


def big_vision_key(path: str) -> str:
    """tlx path -> big_vision key: 'stage2/encoderblock_4/LayerNorm_0/scale' ->
    'Transformer/encoderblock_4/LayerNorm_0/scale', 'stem/cls' -> 'cls', 'head/bias' same."""
    top, _, rest = path.partition("/")
    if top == "stem":
        return rest
    if re.fullmatch(r"stage\d+", top):
        return f"Transformer/{rest}"
    return path


def to_big_vision(params: Mapping) -> dict[str, np.ndarray]:
    """A tlx ViT's params as big_vision's flat '/'-joined dict (what its .npz files hold)."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    return {big_vision_key(k): np.asarray(v) for k, v in flat.items()}


def read_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def save_npz(path: str, flat: Mapping[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})


# ---------------------------------------------------------------- position embeddings


def _square(tokens: int) -> int | None:
    g = math.isqrt(tokens)
    return g if g * g == tokens else None


def resample_posemb(posemb: np.ndarray, grid: int | tuple[int, int]) -> np.ndarray:
    """(1, h*w, D) embeddings of a square grid -> (1, H*W, D) for `grid` (H, W), bilinearly
    (big_vision's recipe); the same array when the grid is unchanged."""
    new = (grid, grid) if isinstance(grid, int) else tuple(grid)
    old = _square(posemb.shape[1])
    if old is None:
        raise ValueError(f"{posemb.shape[1]} position embeddings are not a square grid")
    if (old, old) == new:
        return posemb
    zoom = (new[0] / old, new[1] / old, 1)
    out = scipy.ndimage.zoom(posemb.reshape(old, old, -1), zoom, order=1)
    return out.reshape(1, new[0] * new[1], -1).astype(posemb.dtype)


def _posemb_fn(has_cls_row: bool, model_cls: bool, notes: list):
    """Rule function for (pos_embedding[, cls]) -> (stem/pos_embedding[, stem/cls])."""

    def fn(arrays, shapes):
        pe = arrays[0]
        if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != shapes[0][2]:
            raise ValueError(f"position embedding {pe.shape}, the model's {shapes[0]}")
        row, grid = (pe[:, :1], pe[:, 1:]) if has_cls_row else (None, pe)
        new = _square(shapes[0][1])
        if grid.shape[1] != shapes[0][1]:
            if new is None or _square(grid.shape[1]) is None:
                raise ValueError(f"cannot resample {grid.shape[1]} tokens to {shapes[0][1]}")
            notes.append(
                f"position embedding resampled from a {_square(grid.shape[1])}^2 grid to {new}^2"
            )
        out = [resample_posemb(grid, new) if new else grid]
        if model_cls:
            cls = arrays[1]
            if row is not None:
                cls = cls + row
                notes.append("the cls token's position embedding was folded into cls")
            out.append(cls)
        elif row is not None:
            notes.append("the cls row of the position embedding was dropped (pool_type='gap')")
        return out

    return fn


def _posemb_rule(source_pe: str, source_cls: str, pe_tokens: int, model_cls: bool, notes):
    has_cls_row = _has_cls_row(pe_tokens)
    sources = (source_pe, source_cls) if model_cls else (source_pe,)
    targets = ("stem/pos_embedding", "stem/cls") if model_cls else ("stem/pos_embedding",)
    return Rule(sources, targets, _posemb_fn(has_cls_row, model_cls, notes))


# ---------------------------------------------------------------- target model


def _model(backbone, num_classes: int | None, **model_kwargs) -> ViT:
    if isinstance(backbone, ViT):
        return backbone
    if num_classes is None:
        raise ValueError("the file has no head/bias: pass num_classes")
    model = models.build(backbone, num_classes, **model_kwargs)
    if not isinstance(model, ViT):
        raise ValueError(f"{backbone!r} is not a ViT (tlx.models.vit)")
    return model


def target_shapes(model: ViT, image_size: int) -> dict:
    """Flat {tlx path: ShapeDtypeStruct} of the model's params at a square image size."""
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
    return traverse_util.flatten_dict(dict(shapes), sep="/")


def _apply(rules: Sequence[Rule], source: Mapping, expected: Mapping, name: str, ignore) -> dict:
    used = [s for r in rules for s in r.sources]
    duplicates = sorted({s for s in used if used.count(s) > 1})
    ignored = {k for k in source if any(re.search(p, k) for p in ignore)}
    unused = [k for k in source if k not in set(used) and k not in ignored]
    missing = [s for s in used if s not in source]
    targets = [t for r in rules for t in r.targets]
    unfilled = [t for t in expected if t not in targets]
    unfilled += [f"(map bug) {t}" for t in targets if t not in expected]
    out, mismatched = {}, []
    for r in rules:
        if any(s not in source for s in r.sources) or any(t not in expected for t in r.targets):
            continue
        arrays = [np.asarray(source[s], dtype=np.float32) for s in r.sources]
        want = [tuple(expected[t].shape) for t in r.targets]
        where = f"{', '.join(r.sources)} -> {', '.join(r.targets)}"
        try:
            values = r.fn(arrays, want)
        except ValueError as e:
            mismatched.append(f"{where}: {e}")
            continue
        label = r.sources[0] if len(r.sources) == 1 else ", ".join(r.sources)
        for t, v, w in zip(r.targets, values, want, strict=True):
            if v.shape != w:
                mismatched.append(f"{label} -> {t}: {v.shape} vs {w}")
            else:
                out[t] = np.ascontiguousarray(v, dtype=np.float32)
    if unused or missing or unfilled or mismatched or duplicates:
        raise ConversionError(name, unused, missing, unfilled, mismatched, duplicates)
    return {"params": traverse_util.unflatten_dict(out, sep="/")}


def _convert(source, backbone, rules_fn, head_bias, pe_key, num_classes, image_size, ignore, kw):
    if num_classes is None and head_bias in source:
        num_classes = int(np.shape(source[head_bias])[0])
    model = _model(backbone, num_classes, **kw)
    if image_size is None:  # the file's resolution (any, if it has no position embedding)
        tokens = np.shape(source[pe_key])[1] if pe_key in source else 0
        grid = _square(tokens - 1) if _has_cls_row(tokens) else _square(tokens)
        image_size = (grid or 1) * model.patch_size
    expected = target_shapes(model, image_size)
    notes: list[str] = []
    rules = rules_fn(expected, notes)
    name = backbone if isinstance(backbone, str) else f"ViT(width={model.width})"
    return _apply(rules, source, expected, name, ignore), notes


def _has_cls_row(tokens: int) -> bool:
    return tokens > 1 and _square(tokens) is None and _square(tokens - 1) is not None


def from_big_vision(
    flat: Mapping[str, np.ndarray],
    backbone: str | ViT,
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    ignore: Sequence[str] = (),
    **model_kwargs,
) -> tuple[dict, list[str]]:
    """A big_vision / AugReg flat dict -> (`{'params': ...}`, notes), strictly.

    `backbone`: a MODELS name (its head sized from the file's head/bias unless `num_classes`)
    or a ViT module. `image_size`: the resolution to convert for (default: the file's); the
    position embedding is resampled to it. Raises ConversionError."""
    pe_key = next((k for k in POSEMB_KEYS if k in flat), POSEMB_KEYS[0])

    def rules(expected, notes):
        out = [
            Rule((big_vision_key(p),), (p,), _copy)
            for p in expected
            if p not in ("stem/pos_embedding", "stem/cls")
        ]
        tokens = np.shape(flat[pe_key])[1] if pe_key in flat else 0
        return out + [_posemb_rule(pe_key, "cls", tokens, "stem/cls" in expected, notes)]

    return _convert(
        flat, backbone, rules, "head/bias", pe_key, num_classes, image_size, ignore, model_kwargs
    )


# ---------------------------------------------------------------- timm


def _timm_stage_paths(expected) -> dict[int, str]:
    """Block index -> 'stageK/encoderblock_N'."""
    out = {}
    for p in expected:
        m = re.match(r"(stage\d+)/encoderblock_(\d+)/", p)
        if m:
            out[int(m.group(2))] = f"{m.group(1)}/encoderblock_{m.group(2)}"
    return out


def _conv(arrays, shapes):  # torch (O, I, kh, kw) -> flax (kh, kw, I, O)
    return [np.transpose(arrays[0], (2, 3, 1, 0)), arrays[1]]


def _linear(arrays, shapes):  # torch Linear (O, I) -> Dense (I, O)
    return [arrays[0].T, arrays[1]]


def _qkv(arrays, shapes):
    """timm's fused qkv Linear (3D, D) + (3D,) -> query/key/value kernels (D, H, D/H), biases."""
    w, b = arrays
    d, h, dh = shapes[0]
    if w.shape != (3 * h * dh, d) or b.shape != (3 * h * dh,):
        raise ValueError(f"qkv {w.shape} + {b.shape}, the model's ({3 * h * dh}, {d}) + (3D,)")
    kernels = [k.T.reshape(d, h, dh) for k in np.split(w, 3, axis=0)]
    biases = [x.reshape(h, dh) for x in np.split(b, 3)]
    return [kernels[0], biases[0], kernels[1], biases[1], kernels[2], biases[2]]


def _proj(arrays, shapes):
    """timm's attn.proj Linear (D, D) -> out kernel (H, D/H, D)."""
    h, dh, d = shapes[0]
    return [arrays[0].T.reshape(h, dh, d), arrays[1]]


def timm_rules(expected: Mapping, notes: list, pe_tokens: int) -> list[Rule]:
    last = max(p.split("/")[0] for p in expected if p.startswith("stage") and "encoder_norm" in p)
    rules = [
        Rule(
            ("patch_embed.proj.weight", "patch_embed.proj.bias"),
            ("stem/embedding/kernel", "stem/embedding/bias"),
            _conv,
        ),
        _posemb_rule("pos_embed", "cls_token", pe_tokens, "stem/cls" in expected, notes),
        Rule(
            ("norm.weight", "norm.bias"),
            (f"{last}/encoder_norm/scale", f"{last}/encoder_norm/bias"),
            _copy,
        ),
        Rule(("head.weight", "head.bias"), ("head/kernel", "head/bias"), _linear),
    ]
    for i, path in sorted(_timm_stage_paths(expected).items()):
        src, att = f"blocks.{i}", f"{path}/MultiHeadDotProductAttention_1"
        for torch_name, flax_name in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            rules.append(
                Rule(
                    (f"{src}.{torch_name}.weight", f"{src}.{torch_name}.bias"),
                    (f"{path}/{flax_name}/scale", f"{path}/{flax_name}/bias"),
                    _copy,
                )
            )
        rules.append(
            Rule(
                (f"{src}.attn.qkv.weight", f"{src}.attn.qkv.bias"),
                tuple(
                    f"{att}/{n}/{leaf}"
                    for n in ("query", "key", "value")
                    for leaf in ("kernel", "bias")
                ),
                _qkv,
            )
        )
        rules.append(
            Rule(
                (f"{src}.attn.proj.weight", f"{src}.attn.proj.bias"),
                (f"{att}/out/kernel", f"{att}/out/bias"),
                _proj,
            )
        )
        for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            rules.append(
                Rule(
                    (f"{src}.mlp.{fc}.weight", f"{src}.mlp.{fc}.bias"),
                    (f"{path}/MlpBlock_3/{dense}/kernel", f"{path}/MlpBlock_3/{dense}/bias"),
                    _linear,
                )
            )
    return rules


def from_timm(
    state_dict: Mapping[str, np.ndarray],
    backbone: str | ViT,
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    ignore: Sequence[str] = (),
    **model_kwargs,
) -> tuple[dict, list[str]]:
    """A timm ViT state dict (name -> array) -> (`{'params': ...}`, notes), strictly; arguments
    as `from_big_vision`. For timm's logits pass approximate_gelu=False (a model kwarg)."""
    tokens = np.shape(state_dict["pos_embed"])[1] if "pos_embed" in state_dict else 0
    return _convert(
        state_dict,
        backbone,
        lambda expected, notes: timm_rules(expected, notes, tokens),
        "head.bias",
        "pos_embed",
        num_classes,
        image_size,
        ignore,
        model_kwargs,
    )


def to_timm(params: Mapping) -> dict[str, np.ndarray]:
    """A tlx ViT ('tok' pooling) as a timm state dict of numpy arrays (pos_embed's cls row is
    zero, cls_token carries it): `from_timm` of it gives the same params back, bit for bit."""
    p = traverse_util.flatten_dict(dict(params), sep="/")
    stem = {k[5:]: np.asarray(v) for k, v in p.items() if k.startswith("stem/")}
    d = stem["pos_embedding"].shape[-1]
    out = {
        "patch_embed.proj.weight": np.transpose(stem["embedding/kernel"], (3, 2, 0, 1)),
        "patch_embed.proj.bias": stem["embedding/bias"],
        "cls_token": stem["cls"],
        "pos_embed": np.concatenate([np.zeros((1, 1, d), np.float32), stem["pos_embedding"]], 1),
    }
    blocks = {}
    for k, v in p.items():
        m = re.match(r"stage\d+/encoderblock_(\d+)/(.*)", k)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = np.asarray(v)
        elif k.endswith("encoder_norm/scale"):
            out["norm.weight"] = np.asarray(v)
        elif k.endswith("encoder_norm/bias"):
            out["norm.bias"] = np.asarray(v)
    for i, b in sorted(blocks.items()):
        s, att = f"blocks.{i}", "MultiHeadDotProductAttention_1"
        out[f"{s}.norm1.weight"], out[f"{s}.norm1.bias"] = (
            b["LayerNorm_0/scale"],
            b["LayerNorm_0/bias"],
        )
        qkv = [b[f"{att}/{n}/kernel"] for n in ("query", "key", "value")]
        out[f"{s}.attn.qkv.weight"] = np.concatenate([k.reshape(d, -1).T for k in qkv], 0)
        out[f"{s}.attn.qkv.bias"] = np.concatenate(
            [b[f"{att}/{n}/bias"].reshape(-1) for n in ("query", "key", "value")]
        )
        out[f"{s}.attn.proj.weight"] = b[f"{att}/out/kernel"].reshape(-1, d).T
        out[f"{s}.attn.proj.bias"] = b[f"{att}/out/bias"]
        out[f"{s}.norm2.weight"], out[f"{s}.norm2.bias"] = (
            b["LayerNorm_2/scale"],
            b["LayerNorm_2/bias"],
        )
        for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            out[f"{s}.mlp.{fc}.weight"] = b[f"MlpBlock_3/{dense}/kernel"].T
            out[f"{s}.mlp.{fc}.bias"] = b[f"MlpBlock_3/{dense}/bias"]
    out["head.weight"], out["head.bias"] = (
        np.asarray(p["head/kernel"]).T,
        np.asarray(p["head/bias"]),
    )
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def load(path: str, backbone: str | ViT, **kwargs) -> tuple[dict, list[str]]:
    """A ViT weight file by its kind: .npz (big_vision / AugReg) or a torch file (.pth, .pt,
    .bin: timm; reading it needs torch). kwargs as `from_big_vision`."""
    if path.endswith(".npz"):
        return from_big_vision(read_npz(path), backbone, **kwargs)
    from tlx.convert.torch_to_flax import read_torch_file

    return from_timm(read_torch_file(path), backbone, **kwargs)
