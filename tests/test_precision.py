"""Mixed precision (`config.model.dtype=bfloat16`): the model computes in bf16, while parameters,
optimizer state and BatchNorm statistics stay float32 (in the step and in the checkpoint), the
loss is taken on float32 logits, frozen leaves stay bit-identical, and a tiny run trains like its
float32 twin."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tlx import checkpoint, freeze, models, step, train
from tlx import config as tlx_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRACTALS = {
    "data.fractals.num_classes": 6,
    "data.fractals.train_per_class": 40,
    "data.fractals.test_per_class": 10,
}
# The stated tolerance: bf16 and float32 pre-training of the same tiny run end within this much
# test accuracy of each other (60 test images: 1.7 pp per image).
TOLERANCE = 0.10
pytestmark = pytest.mark.slow


def cfg(spec, **overrides):
    return tlx_config.load(os.path.join(ROOT, spec), progress=False, tensorboard=False, **overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for dtype in ("float32", "bfloat16"):
        workdir = str(tmp_path_factory.mktemp(dtype))
        c = cfg(
            "configs/pretrain.py:steps=60,batch_size=32,image_size=16",
            log_every=10,
            **FRACTALS,
            **{"model.dtype": dtype},
        )
        out[dtype] = workdir, train.run(c, workdir)
    return out


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "split" not in r]


def test_bf16_trains_like_float32(runs):
    (_, f32), (w16, bf16) = runs["float32"], runs["bfloat16"]
    losses = _losses(w16)
    assert losses[-1] < 0.7 * losses[0], losses  # the loss falls
    assert bf16["test_accuracy"] > 0.5  # 6 classes: chance is 0.17
    assert abs(bf16["test_accuracy"] - f32["test_accuracy"]) <= TOLERANCE, (bf16, f32)
    assert json.load(open(os.path.join(w16, "config.json")))["model"]["dtype"] == "bfloat16"


def test_params_opt_state_and_statistics_are_float32_in_the_checkpoint(runs):
    state_dir = checkpoint.find_state_dir(runs["bfloat16"][0])
    tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
    dtypes = {}
    for k in ("params", "opt_state", "batch_stats"):
        for p, m in jax.tree_util.tree_leaves_with_path(tree[k]):
            if m.shape:  # arrays (scalars are counts and steps)
                dtypes[f"{k}/{freeze.path_str(p)}"] = np.dtype(m.dtype)
    assert any(k.startswith("opt_state/") for k in dtypes)
    assert set(dtypes.values()) == {np.dtype(np.float32)}, {
        k: v for k, v in dtypes.items() if v != np.float32
    }


def test_the_model_computes_in_bf16_and_the_loss_takes_float32_logits():
    model = models.build("resnet_tiny", 5, dtype=models.compute_dtype("bfloat16"))
    x = jnp.zeros((2, 16, 16, 3), jnp.float32)
    v = model.init(jax.random.key(0), x, train=False)
    assert {leaf.dtype for leaf in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
    jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(v, x))
    assert "conv_general_dilated" in jaxpr and "bf16[2,16,16" in jaxpr
    logits, _ = step._forward(model, v["params"], v["batch_stats"], x)
    assert logits.dtype == jnp.float32
    with pytest.raises(ValueError, match="model.dtype='float16': use 'float32' or 'bfloat16'"):
        models.compute_dtype("float16")


def test_frozen_leaves_stay_bit_identical_in_bf16(runs, tmp_path):
    source = runs["float32"][0]
    c = cfg(
        f"configs/finetune.py:target=digits,strategy=freeze_early,steps=10,batch_size=32,"
        f"image_size=16,init_from={source}",
        **{"model.dtype": "bfloat16"},
    )
    summary = train.run(c, str(tmp_path))
    before, after = (_flat(checkpoint.read_variables(w)) for w in (source, str(tmp_path)))
    frozen = summary["frozen_stages"]
    assert frozen
    kept = [k for k in after if k.split("/")[1] in frozen]
    assert kept and any(k.startswith("batch_stats/") for k in kept)
    for k in kept:  # params and BatchNorm statistics of the frozen stages
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    # while the stages that train did move
    moved = [k for k in after if k.startswith("params/stage") and k.split("/")[1] not in frozen]
    assert moved and any(not np.array_equal(after[k], before[k]) for k in moved)


def _flat(variables):
    return {f"{c}/{freeze.path_str(p)}": np.asarray(x) for c in variables
            for p, x in jax.tree_util.tree_leaves_with_path(variables[c])}  # fmt: skip
