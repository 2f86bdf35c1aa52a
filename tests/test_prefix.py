"""The frozen-prefix cache (tlx.features): at every freeze depth of a ResNet, a MobileNetV2 and a
ViT, the cached path trains on the same batches in the same order as the image path and ends
with the same parameters; the freeze-depth axis (tlx.models.stage_names) of every backbone."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlx import compiler, data, features, freeze, models, strategies
from tlx import config as tlx_config
from tlx.models import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "configs/finetune.py:target=digits,augment=false,image_size=16,batch_size=32"
STEPS = 6


def cfg(spec=SPEC, **overrides):
    base = {"progress": False, "tensorboard": False, "eval_train": False}
    return tlx_config.load(os.path.join(ROOT, spec), **base, **overrides)


def small_vit(num_classes):
    return vit.ViT(num_classes, patch_size=4, width=32, depth=4, mlp_dim=64, num_heads=2)


BACKBONES = {
    "resnet_tiny": lambda n: models.build("resnet_tiny", n),
    "mobilenet_v2": lambda n: models.build("mobilenet_v2", n, width=0.35),
    "vit": small_vit,
}


def both_paths(tmp_path, backbone, depth, steps=STEPS):
    """(image batches, cached batches, image state, cached state, cache info) after `steps`
    updates of strategy freeze_stages at `depth` from one random init, on each path."""
    c = cfg(f"{SPEC},strategy=freeze_stages,stages={depth}", **{"data.data_dir": str(tmp_path)})
    dataset = data.load(c.data)
    model = BACKBONES[backbone](dataset.num_classes)
    dummy = jnp.zeros((1, *dataset.image_shape), jnp.float32)
    variables = jax.device_get(model.init(jax.random.key(1), dummy, train=False))
    variables.setdefault("batch_stats", {})
    plan = strategies.plan(c, variables, dataset.num_examples["train"] // c.batch_size)
    state = plan.init_state(variables)
    assert features.cut(c, plan, dataset) is not None
    fdata, suffix, info = features.cached(c, dataset, model, state, c.batch_size, plan)
    out = []
    for ds, m in ((dataset, model), (fdata, suffix)):
        step = compiler.jit(plan.train_step(m))
        it, s, batches = ds.train_iter(c.batch_size, seed=c.seed), state, []
        for _ in range(steps):
            batch = next(it)
            batches.append(batch)
            s, _ = step(s, batch)
        out.append((batches, jax.device_get(s)))
    (ib, istate), (fb, fstate) = out
    return model, variables, ib, fb, istate, fstate, info


CASES = [
    ("resnet_tiny", 1),
    ("resnet_tiny", 2),
    ("resnet_tiny", 3),
    ("mobilenet_v2", 2),
    ("mobilenet_v2", 4),
    ("vit", 2),
    ("vit", 4),
]


@pytest.mark.parametrize("backbone,depth", CASES)
def test_cached_path_trains_like_the_image_path(tmp_path, backbone, depth):
    model, variables, ib, fb, istate, fstate, info = both_paths(tmp_path, backbone, depth)
    stages = freeze.stage_names(variables["params"])[:-1]
    assert info["frozen"] == models.frozen_at_depth(stages, depth)
    prefix = compiler.jit(lambda v, x: features.prefix(model, v, x, info["cut"]))
    for i, f in zip(ib, fb, strict=True):  # the same examples, in the same order
        np.testing.assert_array_equal(i["label"], f["label"])
        np.testing.assert_allclose(prefix(variables, i["image"]), f["image"], atol=1e-6, rtol=0)
    mask = freeze.frozen_mask(variables["params"], freeze.stage_patterns(info["frozen"]))
    worst = 0.0
    for p, a, b, m in zip(
        freeze.leaf_paths(istate["params"]),
        jax.tree.leaves(istate["params"]),
        jax.tree.leaves(fstate["params"]),
        jax.tree.leaves(mask),
        strict=True,
    ):
        if m:
            np.testing.assert_array_equal(a, b, err_msg=p)  # the frozen prefix, bit for bit
        worst = max(worst, float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))
    print(f"{backbone} depth {depth}: max |image - cached| = {worst:.3g}")
    assert worst <= 1e-5
    jax.tree.map(np.testing.assert_array_equal, istate["batch_stats"], fstate["batch_stats"])
