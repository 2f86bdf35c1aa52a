"""ViT backbones (big_vision's layout in tlx's stages) and their strict weight converters."""

import functools
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tlx import freeze, models
from tlx.convert import vit as convert_vit
from tlx.convert.torch_to_flax import ConversionError
from tlx.models import vit

# A tiny ViT for everything that computes: 16 px, patch 4 (16 tokens), 5 blocks in 4 stages.
TINY = dict(patch_size=4, width=24, depth=5, mlp_dim=48, num_heads=2)


def tiny(pool_type="tok", num_classes=7, **kw):
    return vit.ViT(num_classes, pool_type=pool_type, **{**TINY, **kw})


def shapes(model, size=16):
    x = jnp.zeros((1, size, size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]


def init(model, size=16, seed=0):
    """Random params in numpy (no compile): every leaf away from zero, so each shows in the
    logits (the model's own init has a zero head and cls token)."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        noise = 0.2 * rng.standard_normal(s.shape).astype(np.float32)
        return 1 + noise if freeze.path_str(path).endswith("scale") else noise

    return jax.tree_util.tree_map_with_path(leaf, shapes(model, size))


_APPLY = {}


def logits(model, params, x):
    """model.apply, jitted once per model."""
    fn = _APPLY.setdefault(repr(model), jax.jit(lambda p, x: model.apply({"params": p}, x)))
    return np.asarray(fn(params, x))


@functools.cache
def ti4_shapes():
    return shapes(models.build("vit_ti4", 10), 32)


def images(n=2, size=16, seed=3):
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def count(tree):
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(tree))


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize(
    "name,variant,expected",
    [
        ("vit_ti16", "Ti", 5_717_224),  # timm's vit_tiny_patch16_224: 5,717,416 = this + D
        ("vit_b16", "B", 86_566_888),  # timm's vit_base_patch16_224: 86,567,656 = this + D
    ],
)
def test_parameter_count_equals_big_vision_at_224(name, variant, expected):
    """big_vision's ViT has D fewer parameters than timm's: its position embedding has no row
    for the cls token."""
    model = models.build(name, 1000)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    assert count(shapes["params"]) == expected == vit.param_count(variant, 16, 224, 1000)
    assert set(shapes) == {"params"}  # no batch_stats


def test_registered_vits_build_with_their_variant():
    for name, (variant, patch, pool) in {
        "vit_ti4": ("Ti", 4, "gap"),
        "vit_ti16": ("Ti", 16, "tok"),
        "vit_s16": ("S", 16, "tok"),
        "vit_b16": ("B", 16, "tok"),
    }.items():
        m = models.build(name, 10)
        assert (m.width, m.depth, m.mlp_dim, m.num_heads) == tuple(vit.VARIANTS[variant].values())
        assert (m.patch_size, m.pool_type) == (patch, pool)


@pytest.mark.parametrize("pool_type", ["tok", "gap"])
def test_forward_shape_and_stage_layout(pool_type):
    model = tiny(pool_type)
    params = init(model)
    assert logits(model, params, images(3)).shape == (3, 7)
    assert freeze.stage_names(params) == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    assert set(params["stem"]) == {"embedding", "pos_embedding"} | (
        {"cls"} if pool_type == "tok" else set()
    )
    assert params["stem"]["pos_embedding"].shape == (1, 16, 24)
    # 5 blocks in 4 stages, numbered globally as in big_vision's Transformer.
    blocks = {s: sorted(k for k in params[s] if k.startswith("encoderblock_")) for s in params}
    assert blocks["stage1"] == ["encoderblock_0", "encoderblock_1"]
    assert [blocks[f"stage{k}"] for k in (2, 3, 4)] == [
        ["encoderblock_2"],
        ["encoderblock_3"],
        ["encoderblock_4"],
    ]
    assert "encoder_norm" in params["stage4"]
    # The head is a plain Dense (the feature cache and init_reinit=['^head/'] rely on it).
    assert {k: v.shape for k, v in params["head"].items()} == {"kernel": (24, 7), "bias": (7,)}


def test_block_paths_are_big_vision_names_under_a_stage():
    params = init(tiny())
    paths = freeze.leaf_paths(params)
    block = sorted(p.split("/", 2)[2] for p in paths if p.startswith("stage2/encoderblock_2/"))
    att = "MultiHeadDotProductAttention_1"
    assert block == sorted(
        [f"LayerNorm_{i}/{leaf}" for i in (0, 2) for leaf in ("bias", "scale")]
        + [f"MlpBlock_3/Dense_{i}/{leaf}" for i in (0, 1) for leaf in ("bias", "kernel")]
        + [
            f"{att}/{n}/{leaf}"
            for n in ("query", "key", "value", "out")
            for leaf in ("bias", "kernel")
        ]
    )
    assert params["stage2"]["encoderblock_2"][att]["query"]["kernel"].shape == (24, 2, 12)
    assert params["stage2"]["encoderblock_2"][att]["out"]["kernel"].shape == (2, 12, 24)
    assert all(re.search(r"^stage\d+/encoderblock_\d+/", p) for p in paths if "encoderblock" in p)


def test_stages_split_the_blocks_evenly():
    assert [list(r) for r in vit.stage_blocks(12, 4)] == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8],
        [9, 10, 11],
    ]
    assert [len(r) for r in vit.stage_blocks(12, 5)] == [3, 3, 2, 2, 2]
    with pytest.raises(ValueError, match="num_stages"):
        vit.stage_blocks(3, 4)


def test_frozen_bn_and_train_change_nothing_and_stem_is_refused():
    model, params, x = tiny(), init(tiny()), images()
    frozen = model.clone(frozen_bn=("stem", "stage1"), axis_name=None)
    out, mutated = jax.jit(
        lambda p, x: frozen.apply(
            {"params": p, "batch_stats": {}}, x, True, mutable=["batch_stats"]
        )
    )(params, x)
    np.testing.assert_array_equal(np.asarray(out), logits(model, params, x))
    assert mutated == {"batch_stats": {}}
    assert models.build("vit_ti4", 10, stem=None).num_classes == 10
    with pytest.raises(ValueError, match="ResNets only"):
        models.build("vit_ti4", 10, stem="cifar")


# ---------------------------------------------------------------- freeze presets


# The presets by the stages they freeze (tlx.strategies.presets), on any backbone's stages.
PRESETS = {
    "linear_probe": lambda stages: stages,
    "freeze_most": lambda stages: stages[:-1],
    "freeze_early": lambda stages: stages[:2],
    "none": lambda stages: [],
}


def _frozen_tops(mask):
    return {top for top, sub in mask.items() if all(jax.tree.leaves(sub))}


@pytest.mark.parametrize(
    "strategy,frozen",
    [
        ("linear_probe", {"stem", "stage1", "stage2", "stage3", "stage4"}),
        ("freeze_most", {"stem", "stage1", "stage2", "stage3"}),
        ("freeze_early", {"stem", "stage1"}),
        ("none", set()),
    ],
)
def test_freeze_presets_compile_to_masks_on_a_vit(strategy, frozen):
    params = ti4_shapes()
    patterns = freeze.stage_patterns(PRESETS[strategy](freeze.stage_names(params)[:-1]))
    mask = freeze.frozen_mask(params, patterns)
    assert _frozen_tops(mask) == frozen
    assert not any(jax.tree.leaves(mask["head"]))
    trainable, _ = freeze.count(params, mask)
    assert (
        trainable
        == {
            "linear_probe": 192 * 10 + 10,
            "freeze_most": 3 * 444_864 + 2 * 192 + 1930,  # 3 Ti blocks, encoder_norm, head
            "freeze_early": 9 * 444_864 + 2 * 192 + 1930,
            "none": vit.param_count("Ti", 4, 32, 10, "gap"),
        }[strategy]
    )
    assert set(freeze.frozen_stages(params, patterns)) == frozen


def test_block_regex_freezes_single_blocks():
    """Per-block depth (a later freeze_blocks=K) is a regex over global block numbers."""
    params = ti4_shapes()
    pattern = r"^stem/|^stage\d+/encoderblock_([0-4])/"  # the stem and the first 5 blocks
    flat = traverse_util.flatten_dict(freeze.frozen_mask(params, [pattern]), sep="/")
    blocks = {p: re.search(r"encoderblock_(\d+)/", p) for p in flat}
    frozen_blocks = {int(m.group(1)) for p, m in blocks.items() if m and flat[p]}
    assert frozen_blocks == {0, 1, 2, 3, 4}
    assert all(flat[p] for p, m in blocks.items() if m and int(m.group(1)) < 5)
    assert all(flat[p] for p in flat if p.startswith("stem/"))
    assert not any(flat[p] for p, m in blocks.items() if m is None and not p.startswith("stem/"))


# ---------------------------------------------------------------- big_vision .npz


def test_big_vision_names_are_the_published_ones():
    keys = set(convert_vit.to_big_vision(init(tiny())))
    for k in (
        "embedding/kernel",
        "pos_embedding",
        "cls",
        "Transformer/encoderblock_0/LayerNorm_0/scale",
        "Transformer/encoderblock_4/MultiHeadDotProductAttention_1/query/kernel",
        "Transformer/encoderblock_4/MultiHeadDotProductAttention_1/out/bias",
        "Transformer/encoderblock_2/LayerNorm_2/bias",
        "Transformer/encoderblock_3/MlpBlock_3/Dense_1/kernel",
        "Transformer/encoder_norm/scale",
        "head/kernel",
    ):
        assert k in keys, k
    assert all(
        k.split("/")[0] in ("embedding", "pos_embedding", "cls", "Transformer", "head")
        for k in keys
    )


@pytest.mark.parametrize("pool_type", ["tok", "gap"])
def test_npz_round_trip_is_exact(tmp_path, pool_type):
    model = tiny(pool_type)
    params = init(model)
    path = str(tmp_path / "vit.npz")
    convert_vit.save_npz(path, convert_vit.to_big_vision(params))
    flat = convert_vit.read_npz(path)
    variables, notes = convert_vit.from_big_vision(flat, model)
    assert notes == []
    back = convert_vit.to_big_vision(variables["params"])
    assert sorted(back) == sorted(flat)
    for k in flat:
        assert back[k].dtype == flat[k].dtype and np.array_equal(back[k], flat[k]), k
    x = images()
    np.testing.assert_array_equal(logits(model, variables["params"], x), logits(model, params, x))


def test_registered_name_sizes_its_head_from_the_file():
    params = init(models.build("vit_ti4", 13), 32)
    flat = convert_vit.to_big_vision(params)
    variables, _ = convert_vit.from_big_vision(flat, "vit_ti4")
    assert variables["params"]["head"]["bias"].shape == (13,)
    assert variables["params"]["stem"]["pos_embedding"].shape == (1, 64, 192)  # 32 px


def test_mismatched_npz_names_every_missing_unused_and_misshaped_key():
    model = tiny()
    flat = convert_vit.to_big_vision(init(model))
    del flat["Transformer/encoderblock_3/LayerNorm_2/scale"]
    del flat["cls"]
    flat["Transformer/encoderblock_9/LayerNorm_0/scale"] = np.zeros(24, np.float32)
    flat["pre_logits/kernel"] = np.zeros((24, 24), np.float32)
    flat["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"] = np.zeros((24, 40), np.float32)
    flat["Transformer/encoder_norm/bias"] = np.zeros(25, np.float32)
    with pytest.raises(ConversionError) as info:
        convert_vit.from_big_vision(flat, model)
    err, text = info.value, str(info.value)
    assert sorted(err.missing) == ["Transformer/encoderblock_3/LayerNorm_2/scale", "cls"]
    assert sorted(err.unused) == [
        "Transformer/encoderblock_9/LayerNorm_0/scale",
        "pre_logits/kernel",
    ]
    assert err.unfilled == [] and err.duplicates == []
    assert sorted(s.split(" ->")[0] for s in err.shapes) == [
        "Transformer/encoder_norm/bias",
        "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel",
    ]
    assert "(24, 40) vs (24, 48)" in text
    for name in (*err.missing, *err.unused, "Transformer/encoder_norm/bias"):
        assert name in text
    # Knowingly dropped keys are not reported.
    with pytest.raises(ConversionError) as info:
        convert_vit.from_big_vision(flat, model, ignore=[r"^pre_logits/"])
    assert info.value.unused == ["Transformer/encoderblock_9/LayerNorm_0/scale"]


def test_a_cls_checkpoint_for_a_gap_model_is_refused():
    flat = convert_vit.to_big_vision(init(tiny("tok")))
    with pytest.raises(ConversionError) as info:
        convert_vit.from_big_vision(flat, tiny("gap"))
    assert info.value.unused == ["cls"]


def test_vision_transformer_layout_folds_the_cls_position_into_cls():
    """AugReg / vision_transformer files keep (1, 1 + h*w, D) under Transformer/posembed_input:
    cls + pe[0] enters the encoder either way, so the logits are the same."""
    model = tiny()
    params = init(model)
    flat = convert_vit.to_big_vision(params)
    pe_cls = np.random.default_rng(0).standard_normal((1, 1, 24)).astype(np.float32)
    old = {k: v for k, v in flat.items() if k != "pos_embedding"}
    old["Transformer/posembed_input/pos_embedding"] = np.concatenate(
        [pe_cls, flat["pos_embedding"]], axis=1
    )
    old["cls"] = flat["cls"] - pe_cls
    variables, notes = convert_vit.from_big_vision(old, model)
    assert any("folded" in n for n in notes)
    np.testing.assert_array_equal(
        variables["params"]["stem"]["pos_embedding"], flat["pos_embedding"]
    )
    x = images()
    np.testing.assert_allclose(
        logits(model, variables["params"], x), logits(model, params, x), atol=1e-5
    )


# ---------------------------------------------------------------- position embeddings


def test_resample_is_identity_at_the_same_grid_and_bilinear_on_a_new_one():
    rng = np.random.default_rng(0)
    pe = rng.standard_normal((1, 16, 5)).astype(np.float32)
    assert convert_vit.resample_posemb(pe, 4) is pe
    # A plane a*i + b*j + c is reproduced exactly by bilinear zoom (corners aligned).
    i, j = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    plane = (2 * i - j + 1).reshape(1, 16, 1).astype(np.float64)
    out = convert_vit.resample_posemb(plane, 7).reshape(7, 7)
    ii, jj = np.meshgrid(np.linspace(0, 3, 7), np.linspace(0, 3, 7), indexing="ij")
    np.testing.assert_allclose(out, 2 * ii - jj + 1, atol=1e-9)
    with pytest.raises(ValueError, match="square"):
        convert_vit.resample_posemb(pe[:, :15], 4)


def test_converting_for_the_same_resolution_keeps_the_logits_and_a_new_one_runs():
    model = tiny()
    params = init(model)
    flat = convert_vit.to_big_vision(params)
    same, notes = convert_vit.from_big_vision(flat, model, image_size=16)
    assert notes == []
    x = images()
    np.testing.assert_array_equal(logits(model, same["params"], x), logits(model, params, x))
    bigger, notes = convert_vit.from_big_vision(flat, model, image_size=24)
    assert notes == ["position embedding resampled from a 4^2 grid to 6^2"]
    assert bigger["params"]["stem"]["pos_embedding"].shape == (1, 36, 24)
    np.testing.assert_array_equal(bigger["params"]["stem"]["cls"], params["stem"]["cls"])
    out = logits(model, bigger["params"], images(size=24))
    assert out.shape == (2, 7) and np.isfinite(out).all()


# ---------------------------------------------------------------- timm


def test_timm_round_trip_is_exact_and_names_are_timms():
    model = tiny()
    params = init(model)
    state = convert_vit.to_timm(params)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.bias"} <= set(
        state
    )
    assert state["blocks.4.attn.qkv.weight"].shape == (72, 24)
    assert state["pos_embed"].shape == (1, 17, 24)
    variables, _ = convert_vit.from_timm(state, model)
    got = traverse_util.flatten_dict(variables["params"], sep="/")
    want = traverse_util.flatten_dict(params, sep="/")
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.array_equal(got[k], want[k]), k


def test_mismatched_timm_state_dict_names_every_key():
    model = tiny()
    state = convert_vit.to_timm(init(model))
    del state["blocks.2.mlp.fc2.bias"]
    state["fc_norm.weight"] = np.zeros(24, np.float32)
    state["blocks.1.attn.qkv.weight"] = np.zeros((60, 24), np.float32)
    with pytest.raises(ConversionError) as info:
        convert_vit.from_timm(state, model)
    err = info.value
    assert err.missing == ["blocks.2.mlp.fc2.bias"] and err.unused == ["fc_norm.weight"]
    assert len(err.shapes) == 1 and "blocks.1.attn.qkv.weight" in err.shapes[0]


HAS_TORCH = importlib.util.find_spec("torch") is not None


def torch_vit(width, depth, heads, mlp, patch, num_classes, grid):
    """A ViT in timm's VisionTransformer layout (class token pooling), from torch alone."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            attn = (q @ k.transpose(-2, -1) * (d // heads) ** -0.5).softmax(-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention()
            self.norm2, self.mlp = nn.LayerNorm(width, eps=1e-6), Mlp()

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, width, patch, patch)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class VisionTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = PatchEmbed()
            self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
            self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, width) * 0.02)
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(width, eps=1e-6)
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            x = self.patch_embed(x)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
            return self.head(self.norm(self.blocks(x))[:, 0])

    return VisionTransformer()


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed (optional extra)")
def test_timm_layout_torch_vit_gives_the_same_logits():
    import torch

    torch.manual_seed(0)
    net = torch_vit(24, 5, 2, 48, 4, 7, grid=4).eval()
    with torch.no_grad():  # LayerNorm affines away from 1/0
        for m in net.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    model = tiny(approximate_gelu=False)
    variables, notes = convert_vit.from_timm(state, model)
    assert notes == ["the cls token's position embedding was folded into cls"]
    x = images()
    with torch.no_grad():
        ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    got = logits(model, variables["params"], x)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_load_reads_an_npz_by_extension(tmp_path):
    model = tiny("gap")
    params = init(model)
    path = str(tmp_path / "bv.npz")
    convert_vit.save_npz(path, convert_vit.to_big_vision(params))
    variables, _ = convert_vit.load(path, model)
    assert np.array_equal(variables["params"]["head"]["kernel"], params["head"]["kernel"])
