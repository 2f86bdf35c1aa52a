"""Parameter-efficient fine-tuning strategies on a tiny ViT (depth 4, width 32, patch 4, 16 px):
LoRA, BitFit, adapters and VPT train exactly their parameters (and the head), start where the
strategy says, leave the frozen backbone bit for bit, and a LoRA run exports plain weights."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tlx import checkpoint, freeze, models, strategies, train
from tlx import config as tlx_config
from tlx.convert import vit as convert_vit
from tlx.models import vit
from tlx.strategies import adapter, lora, vpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, MLP, DEPTH, CLASSES = 32, 64, 4, 5
TINY = functools.partial(
    vit.ViT, patch_size=4, width=WIDTH, depth=DEPTH, mlp_dim=MLP, num_heads=2, pool_type="gap"
)
HEAD = WIDTH * CLASSES + CLASSES


@pytest.fixture(scope="module")
def tiny():
    """(model, variables with a random head so that logits depend on the backbone, batch)."""
    model = TINY(num_classes=CLASSES)
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
    variables = model.init(jax.random.key(0), x[:1])
    kernel = variables["params"]["head"]["kernel"]
    variables["params"]["head"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(2), kernel.shape)
    return model, {**variables, "batch_stats": {}}, {"image": x, "label": jnp.arange(8) % CLASSES}


def _plan(variables, name, **knobs):
    c = tlx_config.base()
    tlx_config.set_strategy(c, name, knobs)
    c.optim.schedule, c.optim.lr, c.optim.head_lr = "constant", 1e-2, 1e-2
    return strategies.plan(c, jax.eval_shape(lambda: variables))


def _train(plan, model, variables, batch, steps=2):
    start = plan.init_state(variables)
    step, state = jax.jit(plan.train_step(model)), start
    for _ in range(steps):
        state, _ = step(state, batch)
    return start, state


def _trainable(plan, state) -> int:
    return freeze.count(state["params"], plan.phases[0].mask)[0]


def _changed(before, after) -> set:
    return {
        p
        for p, a, b in zip(
            freeze.leaf_paths(after), jax.tree.leaves(before), jax.tree.leaves(after), strict=True
        )
        if not np.array_equal(a, b)
    }


def _assert_frozen_identical(plan, before, after):
    for p, a, b, frozen in zip(
        freeze.leaf_paths(after["params"]),
        jax.tree.leaves(before["params"]),
        jax.tree.leaves(after["params"]),
        jax.tree.leaves(plan.phases[0].mask),
        strict=True,
    ):
        if frozen:
            assert np.array_equal(a, b), p


def _logits(plan, model, params, x):
    return plan.model(model).apply({"params": params, "batch_stats": {}}, x)


# -- LoRA ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mlp", [False, True])
def test_lora_trains_rank_times_fan_in_plus_fan_out_per_targeted_kernel(tiny, mlp):
    model, variables, _ = tiny
    r = 3
    plan = _plan(variables, "lora", rank=r, mlp=mlp)
    state = plan.init_state(variables)
    attention = DEPTH * 4 * r * (WIDTH + WIDTH)  # query, key, value, out: D -> D each
    mlp_blocks = DEPTH * r * ((WIDTH + MLP) + (MLP + WIDTH)) if mlp else 0
    assert _trainable(plan, state) == attention + mlp_blocks + HEAD
    assert lora.trainable_count(variables["params"], plan.ctx.knobs) == attention + mlp_blocks


def test_lora_starts_as_the_base_model_and_its_merged_export_gives_the_trained_logits(tiny):
    model, variables, batch = tiny
    plan = _plan(variables, "lora", rank=2)
    start, state = _train(plan, model, variables, batch)
    for p in freeze.leaf_paths(start["params"]):
        if p.endswith("lora_b"):  # B = 0: the same function as the base model, bit for bit
            assert not np.any(_leaf(start["params"], p))
    x = batch["image"]
    np.testing.assert_array_equal(
        _logits(plan, model, start["params"], x), model.apply(variables, x)
    )
    _assert_frozen_identical(plan, start, state)
    assert _changed(start["params"], state["params"]) == {
        p for p in freeze.leaf_paths(state["params"]) if "lora_" in p or p.startswith("head/")
    }
    merged = lora.merge(state["params"], plan.ctx.knobs.alpha)
    assert jax.tree.structure(merged) == jax.tree.structure(variables["params"])
    np.testing.assert_allclose(
        model.apply({"params": merged}, x), _logits(plan, model, state["params"], x), atol=1e-5
    )


def _leaf(params, path):
    for k in path.split("/"):
        params = params[k]
    return np.asarray(params)


# -- BitFit --------------------------------------------------------------------------------------
def test_bitfit_trains_only_biases_norm_affines_and_the_head(tiny):
    model, variables, batch = tiny
    plan = _plan(variables, "bitfit")
    start, state = _train(plan, model, variables, batch)
    paths = freeze.leaf_paths(variables["params"])
    expected = {
        p for p in paths if p.startswith("head/") or p.rsplit("/", 1)[1] in ("bias", "scale")
    }
    assert {
        p for p, f in zip(paths, jax.tree.leaves(plan.phases[0].mask), strict=True) if not f
    } == expected
    assert _trainable(plan, state) == sum(_leaf(variables["params"], p).size for p in expected)
    assert _changed(start["params"], state["params"]) <= expected
    _assert_frozen_identical(plan, start, state)


# -- adapters ------------------------------------------------------------------------------------
def test_adapters_start_as_the_base_model_and_train_only_themselves(tiny):
    model, variables, batch = tiny
    dim = 4
    plan = _plan(variables, "adapter", dim=dim)
    start, state = _train(plan, model, variables, batch)
    # The strategy's tree is the hooked ViT's, and without the hook the plain one.
    hooked = jax.eval_shape(
        lambda: model.clone(adapter_dim=dim).init(jax.random.key(0), batch["image"][:1])
    )
    assert jax.tree.map(jnp.shape, hooked["params"]) == jax.tree.map(jnp.shape, start["params"])
    per_block = 2 * (2 * WIDTH * dim + dim + WIDTH)
    assert _trainable(plan, state) == DEPTH * per_block + HEAD
    x = batch["image"]
    np.testing.assert_array_equal(
        _logits(plan, model, start["params"], x), model.apply(variables, x)
    )
    _assert_frozen_identical(plan, start, state)
    assert _changed(start["params"], state["params"]) == {
        p for p in freeze.leaf_paths(state["params"]) if "/adapter_" in p or p.startswith("head/")
    }


# -- VPT -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("deep", [False, True])
def test_vpt_trains_only_the_prompts_and_the_head(tiny, deep):
    model, variables, batch = tiny
    n = 3
    plan = _plan(variables, "vpt", prompts=n, deep=deep)
    start, state = _train(plan, model, variables, batch)
    assert _trainable(plan, state) == n * WIDTH * (DEPTH if deep else 1) + HEAD
    prompts = {p for p in freeze.leaf_paths(state["params"]) if p.endswith("/prompts")}
    assert prompts == (
        {f"stage{i + 1}/encoderblock_{i}/prompts" for i in range(DEPTH)}
        if deep
        else {"stage1/encoderblock_0/prompts"}
    )
    heads = {"head/kernel", "head/bias"}
    assert _changed(start["params"], state["params"]) == prompts | heads
    _assert_frozen_identical(plan, start, state)
    assert vpt.trainable_count(variables["params"], plan.ctx.knobs) + HEAD == _trainable(
        plan, state
    )


def test_adapter_and_vpt_need_a_vit():
    resnet = models.build("resnet_tiny", CLASSES)
    variables = jax.eval_shape(lambda: resnet.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    for name in ("adapter", "vpt"):
        with pytest.raises(ValueError, match=f"strategy '{name}' needs a ViT"):
            _plan(variables, name)
    assert adapter.NAMES == ("adapter_attn", "adapter_mlp")


# -- a LoRA run through train.run: summary, resume, export ------------------------------------
def test_a_lora_run_resumes_and_exports_plain_weights_init_from_and_the_converter_read(
    tmp_path, monkeypatch
):
    monkeypatch.setitem(models.MODELS, "vit_peft_test", TINY)
    quiet = {"progress": False, "tensorboard": False, "eval_train": False}
    spec = "configs/finetune.py:backbone=vit_peft_test,image_size=16,batch_size=16,steps={}"

    def cfg(steps, extra="", **overrides):
        return tlx_config.load(os.path.join(ROOT, spec.format(steps) + extra), **quiet, **overrides)

    # The pre-trained source: a plain checkpoint (as `lora.export` writes one) of a random ViT.
    pre, ft = str(tmp_path / "pre" / "state"), str(tmp_path / "ft")
    model = TINY(num_classes=CLASSES)
    x = jax.random.normal(jax.random.key(3), (4, 16, 16, 3))
    plain_source = jax.device_get(model.init(jax.random.key(4), x[:1]))
    ocp.PyTreeCheckpointer().save(pre, {**plain_source, "batch_stats": {}})
    lora_args = f",target=digits,strategy=lora,rank=2,init_from={pre}"
    train.run(cfg(2, lora_args), ft)
    summary = train.run(cfg(4, lora_args), ft, resume="force")  # from step 2
    assert summary["resumed_from"] == 2
    digits_classes = 10
    trainable = DEPTH * 4 * 2 * 2 * WIDTH + WIDTH * digits_classes + digits_classes
    assert summary["params_trainable"] == trainable
    # Adam's two moments of the trained leaves (and step counts): none for the frozen ones.
    assert 0 <= summary["opt_state_bytes"] - 2 * 4 * trainable < 64
    source, tuned = checkpoint.read_variables(pre), checkpoint.read_variables(ft)
    for p, a in zip(
        freeze.leaf_paths(source["params"]), jax.tree.leaves(source["params"]), strict=True
    ):
        if not p.startswith("head/"):  # the frozen backbone, bit for bit
            np.testing.assert_array_equal(_leaf(tuned["params"], p), a, err_msg=p)

    merged = lora.merge(tuned["params"], 8.0)
    lora.export(ft, str(tmp_path / "plain"))
    plain = checkpoint.read_variables(str(tmp_path / "plain"))  # what init_from reads
    jax.tree.map(np.testing.assert_array_equal, plain["params"], jax.tree.map(np.asarray, merged))
    lora.export(ft, str(tmp_path / "plain.npz"))
    model = TINY(num_classes=digits_classes)
    converted, _ = convert_vit.load(str(tmp_path / "plain.npz"), model, image_size=16)
    jax.tree.map(np.testing.assert_array_equal, converted["params"], plain["params"])
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1]))
    plan = strategies.plan(cfg(4, lora_args), {**abstract, "batch_stats": {}})
    np.testing.assert_allclose(
        model.apply({"params": plain["params"]}, x),
        _logits(plan, model, tuned["params"], x),
        atol=1e-5,
    )
