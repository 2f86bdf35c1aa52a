"""The fast convolution equals XLA's (values and gradients) on every shape the ResNets use, keeps
flax's parameters, and leaves a frozen backbone's backward pass to be pruned."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlx import models
from tlx.models import conv as conv_lib
from tlx.models.conv import Conv, conv, xla_conv

CASES = [  # (H, W, C_in, C_out, k, stride, padding): the ResNets' convolutions, small
    (8, 8, 3, 8, 3, 1, 1),  # CIFAR stem
    (8, 8, 8, 8, 3, 1, 1),  # BasicBlock conv1/conv2, Bottleneck conv2
    (7, 9, 6, 5, 3, 1, 1),  # odd sizes
    (8, 8, 8, 16, 3, 2, 1),  # first block of a stage
    (7, 7, 6, 4, 3, 2, 1),  # stride 2 over an odd size
    (8, 8, 8, 12, 1, 1, 0),  # Bottleneck conv1/conv3, stage1 downsample
    (8, 8, 8, 16, 1, 2, 0),  # downsample of a stage
    (7, 7, 6, 4, 1, 2, 0),
    (18, 18, 3, 8, 7, 2, 3),  # ImageNet stem
    (17, 15, 3, 4, 7, 2, 3),
    (4, 4, 6, 8, 3, 2, 1),  # a last stage at 2x2 (im2col: XLA's is slow there)
    (3, 3, 4, 5, 3, 1, 1),
    (2, 2, 6, 5, 3, 1, 1),
    (1, 1, 4, 4, 3, 1, 1),
    (8, 8, 4, 4, 3, 1, "SAME"),
    (9, 8, 4, 4, 3, 2, "VALID"),
]


def _data(h, w, cin, cout, k, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
    return x, kernel


def _rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@pytest.mark.parametrize("h,w,cin,cout,k,stride,padding", CASES)
def test_conv_equals_xla_conv_forward_and_gradients(h, w, cin, cout, k, stride, padding):
    x, kernel = _data(h, w, cin, cout, k)
    y, ref = conv(x, kernel, stride, padding), xla_conv(x, kernel, stride, padding)
    assert y.shape == ref.shape
    assert _rel(y, ref) < 1e-5
    probe = jnp.asarray(np.random.default_rng(1).standard_normal(ref.shape), jnp.float32)

    def loss(fn):
        return jax.jit(jax.grad(lambda x, k: jnp.sum(fn(x, k, stride, padding) * probe), (0, 1)))

    for got, want in zip(loss(conv)(x, kernel), loss(xla_conv)(x, kernel), strict=True):
        assert _rel(got, want) < 1e-4


def test_conv_module_has_nn_conv_parameters_and_output():
    x, _ = _data(9, 9, 4, 6, 3)
    ref = nn.Conv(6, (3, 3), (2, 2), padding=1, use_bias=False)
    variables = ref.init(jax.random.key(0), x)
    for impl in ("fast", "xla", "auto"):
        module = Conv(6, (3, 3), 2, padding=1, impl=impl)
        ours = module.init(jax.random.key(0), x)
        assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, variables)
        assert _rel(module.apply(variables, x), ref.apply(variables, x)) < 1e-5


def test_auto_is_fast_on_cpu_and_xla_on_accelerators():
    assert conv_lib.resolve("auto", "cpu") == "fast"
    assert conv_lib.resolve("auto", "gpu") == "xla"
    assert conv_lib.resolve("auto", "tpu") == "xla"
    assert conv_lib.resolve("xla", "cpu") == "xla"
    with pytest.raises(ValueError, match="unknown conv impl 'winograd'"):
        conv_lib.resolve("winograd")


def _resnet_loss(model, variables, x):
    # BatchNorm on running statistics: in train mode a batch of 2 at 1x1 pixels amplifies
    # float32 rounding through the batch variance, whichever convolution runs.
    def loss(params):
        logits = model.apply({**variables, "params": params}, x, train=False)
        return jnp.sum(logits**2)

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


def test_resnet_fast_and_xla_convs_share_parameters_logits_and_gradients():
    """(The ImageNet stem's 7x7/2 and max-pool: the torch test below, both impls.)"""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
    fast = models.build("resnet_tiny", 5, conv="fast")
    ref = models.build("resnet_tiny", 5, conv="xla")
    variables = ref.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, fast.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, variables
    )
    (lf, gf), (lr, gr) = _resnet_loss(fast, variables, x), _resnet_loss(ref, variables, x)
    assert abs(float(lf - lr)) < 1e-5 * abs(float(lr))
    for path, got in jax.tree_util.tree_leaves_with_path(gf):
        want = gr
        for key in path:
            want = want[key.key]
        assert _rel(got, want) < 1e-4, jax.tree_util.keystr(path)


def test_frozen_backbone_backward_is_pruned():
    """Differentiating the head alone compiles to the forward's products and no more."""
    model = models.build("resnet_tiny", 5, conv="fast")
    x = jnp.ones((2, 16, 16, 3))
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]

    def forward(params, x):
        return model.apply({**variables, "params": params}, x)

    def probe(head, backbone, x):
        return jnp.sum(forward({**backbone, "head": head}, x) ** 2)

    def count(f, *args):
        text = jax.jit(f).lower(*args).compile().as_text()
        return text.count(" convolution("), text.count(" dot(")

    fwd_convs, fwd_dots = count(forward, params, x)
    backbone = {k: v for k, v in params.items() if k != "head"}
    probe_convs, probe_dots = count(jax.grad(probe), params["head"], backbone, x)
    assert fwd_convs > 0
    assert probe_convs == fwd_convs
    assert probe_dots <= fwd_dots + 2  # the head's own gradient


@pytest.mark.parametrize(
    "backbone,size,impl",
    [("resnet18", 40, "fast"), ("resnet18", 40, "xla"), ("resnet50", 64, "fast")],  # 50: 2x2 last
)
def test_converted_torchvision_resnet_gives_torch_logits(backbone, size, impl):
    torch = pytest.importorskip("torch")
    from tlx.convert import torch_reference, torch_to_flax

    torch.manual_seed(0)
    net = torch_reference.build(backbone, num_classes=1000)
    with torch.no_grad():  # BatchNorm statistics and affine parameters away from 0/1
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    variables = torch_to_flax.convert(backbone, {k: v.numpy() for k, v in net.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
    model = models.build(backbone, 1000, conv=impl)
    got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
    net.eval()
    with torch.no_grad():
        ref = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
