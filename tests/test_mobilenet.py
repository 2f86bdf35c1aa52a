"""MobileNetV2 and EfficientNet-Lite0 keep the backbone contract (stage names, head, frozen BN)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tlx import freeze, models
from tlx.models.mobilenet_v2 import InvertedResidualNet, make_divisible


def _init(name, num_classes=10, size=32, **kwargs):
    model = models.build(name, num_classes, **kwargs)
    init = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((2, size, size, 3))))
    return model, init()


def _count(tree):
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "name,params_1000",
    [
        ("mobilenet_v2", 3_504_872),  # torchvision's count
        ("efficientnet_lite0", 4_652_008),  # TF's EfficientNet-Lite0
    ],
)
def test_parameter_count_matches_the_reference_architecture(name, params_1000):
    model = models.build(name, 1000)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    assert _count(shapes["params"]) == params_1000


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_top_level_modules_are_stem_stages_head(name):
    model = models.build(name, 10)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))[
        "params"
    ]
    assert freeze.stage_names(params) == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    # The head is the classifier alone, so a linear probe trains only it.
    assert set(traverse_util.flatten_dict(params["head"], sep="/")) == {"kernel", "bias"}
    assert params["head"]["kernel"].shape == (1280, 10)
    assert "last_conv" in params["stage4"] and "conv" in params["stem"]


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_stages_halve_the_resolution_like_resnet(name):
    """stageK runs at 1/2^(K+1) of the input, as in tlx's ResNets (stem: 1/2)."""
    model = models.build(name, 10)
    _, inter = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.key(0),
            jnp.zeros((1, 64, 64, 3)),
            capture_intermediates=lambda m, _: (
                m.name in ("stem", "stage1", "stage2", "stage3", "stage4")
            ),
        )
    )
    sizes = {k: v["__call__"][0].shape[1] for k, v in inter["intermediates"].items()}
    assert sizes == {"stem": 32, "stage1": 16, "stage2": 8, "stage3": 4, "stage4": 2}


def test_frozen_bn_stages_keep_their_running_statistics():
    stages = (((1, 8, 1, 1, 3),), ((6, 16, 2, 2, 3),), ((6, 24, 1, 2, 3),))
    model = InvertedResidualNet(10, stages, 8, 32, frozen_bn=("stem", "stage1"))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = jax.jit(lambda: model.init(jax.random.key(0), x))()
    _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    before, after = variables["batch_stats"], updates["batch_stats"]
    for stage in ("stem", "stage1"):
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before[stage], after[stage])))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before["stage2"], after["stage2"])
    assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize("padding", ["torch", "same"])
def test_shifted_and_grouped_depthwise_give_the_same_network(padding):
    """A small net of the family (3x3 and 5x5, strides 1 and 2): same outputs and gradients."""
    stages = (((1, 8, 1, 1, 3),), ((6, 16, 2, 2, 3),), ((6, 24, 2, 2, 5),))

    def net(impl):
        return InvertedResidualNet(
            10, stages, stem_features=8, last_features=32, padding=padding, depthwise_impl=impl
        )

    x = jax.random.normal(jax.random.key(2), (4, 33, 32, 3))
    variables = jax.jit(lambda: net("shifted").init(jax.random.key(0), x))()

    def run(model):
        def loss(params, train):
            v = {"params": params, "batch_stats": variables["batch_stats"]}
            logits, _ = model.apply(v, x, train=train, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(logits))

        return jax.jit(lambda p: (loss(p, True), jax.grad(loss)(p, False)))(variables["params"])

    (l1, g1), (l2, g2) = run(net("shifted")), run(net("grouped"))
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def test_width_multiplier_rounds_channels_to_multiples_of_8():
    assert make_divisible(32 * 0.5) == 16 and make_divisible(24 * 0.35) == 8
    assert make_divisible(1280 * 1.4) == 1792
    model = models.build("mobilenet_v2", 10, width=0.5)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert shapes["params"]["stem"]["conv"]["kernel"].shape == (3, 3, 3, 16)
    assert shapes["params"]["head"]["kernel"].shape == (1280, 10)  # max(1, width) * 1280


def test_resnet_only_stem_option_is_refused_with_a_clear_error():
    assert models.build("mobilenet_v2", 10, stem="imagenet").num_classes == 10
    with pytest.raises(ValueError, match="ResNets only"):
        models.build("efficientnet_lite0", 10, stem="cifar")
