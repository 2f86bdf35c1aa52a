"""tlx's compiler options: on CPU, convolutions leave YNNPACK for XLA's Eigen (see tlx.compiler)."""

import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from tlx import compiler, models
from tlx.parallel import Runner

OPTION = "xla_cpu_experimental_ynn_fusion_type"
DIMS = ("NHWC", "HWIO", "NHWC")
# XLA_FLAGS naming the option overrides tlx's (tested below); the HLO tests need tlx's own.
ours_apply = pytest.mark.skipif(OPTION in os.environ.get("XLA_FLAGS", ""), reason="XLA_FLAGS")


def _conv_grads(x, k):
    f = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DIMS)  # noqa: E731
    return jax.grad(lambda x, k: jnp.sum(f(x, k) ** 2), argnums=(0, 1))(x, k)


def _ynn_ops(hlo: str) -> set:
    """The ops inside the computations that YNNPACK fusions call."""
    bodies, current = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m:
            current = bodies.setdefault(m.group(1), [])
        elif current is not None:
            current.append(line)
    ops = set()
    for line in hlo.splitlines():
        m = re.search(r"kind=kCustom, calls=%?([\w.\-]+).*__ynn_fusion", line)
        if m:
            ops |= set(re.findall(r"= \S+ ([a-z\-]+)\(", "\n".join(bodies[m.group(1)])))
    return ops


def test_options_on_cpu_name_the_fusion_types_without_convolutions():
    opts = compiler._options("cpu", "")
    assert opts == {OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
    assert compiler.options("gpu") is None and compiler.options("tpu") is None


@ours_apply
def test_compiled_steps_keep_dots_in_ynnpack_and_convolutions_out():
    # ResNet-18's first stage (compiled, not run): YNNPACK takes convolutions this size.
    x, k, w = jnp.ones((64, 32, 32, 64)), jnp.ones((3, 3, 64, 64)), jnp.ones((64, 64))

    def f(x, k, w):
        y = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=DIMS)
        return jnp.sum(jnp.tanh(y.reshape(-1, 64) @ w))

    grad = jax.grad(f, argnums=(1, 2))
    default = _ynn_ops(jax.jit(grad).lower(x, k, w).compile().as_text())
    ours = _ynn_ops(compiler.jit(grad).lower(x, k, w).compile().as_text())
    # What this jaxlib does by default (the premise of the option): convolutions in YNNPACK.
    assert {"convolution", "dot"} <= default
    assert "dot" in ours and "convolution" not in ours


@ours_apply
def test_runner_steps_compile_with_the_options_and_give_xlas_values():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 32, 32, 64)), jnp.float32)
    k = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 64, 64)), jnp.float32) * 0.05
    runner = Runner("jit")
    step = runner.eval_step(lambda k, batch: _conv_grads(batch, k))
    hlo = step.lower(k, runner.put_eval_batch(x)).compile().as_text()
    assert "convolution" not in _ynn_ops(hlo)
    ours = step(k, runner.put_eval_batch(x))
    ref = jax.jit(_conv_grads)(x, k)  # YNNPACK's convolutions: the same math, other rounding
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_the_users_xla_flags_win_and_an_unknown_option_falls_back_with_a_warning(monkeypatch):
    assert compiler._options("cpu", f"--{OPTION}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT") is None
    monkeypatch.setattr(compiler, "CPU_OPTIONS", {"xla_cpu_no_such_option_in_any_jaxlib": "1"})
    compiler._options.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert compiler._options("cpu", "") is None
        assert any(
            "refuses" in str(w.message) and "XLA's defaults" in str(w.message) for w in caught
        )
    finally:
        compiler._options.cache_clear()


def test_a_resnet_forward_with_the_options_equals_xlas_defaults():
    model = models.build("resnet_tiny", 5, conv="xla")
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 32, 32, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x[:1], train=False)
    apply = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
    np.testing.assert_allclose(
        compiler.jit(apply)(variables, x), jax.jit(apply)(variables, x), rtol=1e-4, atol=1e-4
    )
