"""The fine-tuning toolbox, each strategy against its formula: LR multipliers, Auto-RGN,
BatchNorm modes, gradual unfreezing, LP-FT, L2-SP, surgical tuning, the scratch baseline."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tlx import checkpoint, freeze, models, optim, strategies, train, transforms
from tlx import config as tlx_config
from tlx import step as step_lib
from tlx.strategies import auto_rgn, l2_sp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = (
    "none linear_probe freeze_most freeze_early gradual_unfreeze layer_decay lp_ft l2_sp "
    "surgical auto_rgn scratch"
).split()


def cfg(spec, **overrides):
    base = {"progress": False, "tensorboard": False, "eval_train": False}
    return tlx_config.load(os.path.join(ROOT, spec), **base, **overrides)


def flat(tree):
    return {freeze.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def tiny(config, steps_per_epoch=10):
    """A resnet_tiny (16x16) state, plan and batch built as `train.run` builds them."""
    model = models.build("resnet_tiny", 5)
    x = jax.random.normal(jax.random.key(1), (16, 16, 16, 3))
    variables = model.init(jax.random.key(0), x[:1], train=False)
    plan = strategies.plan(config, variables, steps_per_epoch, from_checkpoint=True)
    state = plan.init_state(variables)
    return model, plan, state, {"image": x, "label": jnp.arange(16) % 5}


def jit_step(model, plan, k=0):
    return jax.jit(plan.train_step(model, k))


def ft(strategy, **overrides):
    return cfg(f"configs/finetune.py:strategy={strategy},steps=8", **overrides)


# -- every strategy, its knobs ---------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_is_selectable_from_the_finetune_config(strategy):
    c = ft(strategy)
    assert c.strategy.name == strategy
    _, plan, _, _ = tiny(c)
    assert plan.phases and plan.name == strategy


@pytest.mark.parametrize(
    "arg, message",
    [
        ("bn=keras", "freeze.bn='keras'"),
        ("strategy=lp_ft,lp_fraction=1.5", "lp_fraction=1.5"),
        ("strategy=layer_decay,decay=0.0", "decay=0.0"),
        ("strategy=l2_sp,form=prox", "form='prox'"),
        ("strategy=l2_sp,alpha=-1.0", "alpha=-1.0"),
        ("strategy=surgical,stage=stage9", "stage='stage9'.*stage3"),
        ("strategy=auto_rgn,batches=0", "batches=0"),
        ("strategy=gradual_unfreeze,every_epochs=0.0", "every_epochs"),
        ("strategy=freeze_lots", "unknown freeze strategy 'freeze_lots'"),
    ],
)
def test_a_wrong_knob_value_is_a_clear_error(arg, message):
    with pytest.raises(ValueError, match=message):
        tiny(cfg(f"configs/finetune.py:{arg}"))


# -- LR multipliers ----------------------------------------------------------------------------
def test_layer_decay_multiplier_is_decay_to_the_depth_below_the_top_stage():
    _, plan, _, _ = tiny(ft("layer_decay", **{"strategy.layer_decay.decay": 0.3}))
    depth = {"stem": 3, "stage1": 2, "stage2": 1, "stage3": 0, "head": 0}
    for path, m in flat(plan.lr_mult).items():
        assert m == 0.3 ** depth[path.split("/")[0]], path


def test_regex_multipliers_first_match_wins_and_multiply_layer_decay():
    c = ft("layer_decay", **{"optim.lr_mults": [(r"conv1/kernel$", 0.1), ("^stage", 3.0)]})
    c.unlock()
    c.strategy.layer_decay.decay = 0.5
    _, plan, _, _ = tiny(c)
    m = flat(plan.lr_mult)
    assert m["stem/conv1/kernel"] == 0.5**3 * 0.1
    assert m["stage1/block0/conv1/kernel"] == 0.5**2 * 0.1
    assert m["stage1/block0/conv2/kernel"] == 0.5**2 * 3.0
    assert m["stem/bn1/scale"] == 0.5**3
    assert m["head/kernel"] == 1.0
    c.optim.lr_mults = [("^stage9/", 2.0)]
    with pytest.raises(ValueError, match="matches no parameter"):
        tiny(c)


def test_lr_multiplier_trains_bit_identically_to_a_group_at_the_multiplied_lr():
    """LR multiplier m on a leaf == that leaf in its own group at peak LR m * lr."""
    over = {"optim.schedule": "constant", "optim.weight_decay": 0.1, "optim.warmup_steps": 0}
    c = ft("layer_decay", **over)
    c.unlock()
    c.strategy.layer_decay.decay = 0.5  # powers of two: m * (lr * d) == (m * lr) * d exactly
    model, plan, state, batch = tiny(c)
    step = jit_step(model, plan)
    ref_labels = jax.tree_util.tree_map_with_path(
        lambda p, lbl: lbl if lbl == "head" else f"backbone:{freeze.path_str(p).split('/')[0]}",
        plan.phases[0].labels,
    )
    m = {"stem": 0.125, "stage1": 0.25, "stage2": 0.5, "stage3": 1.0}
    schedules = {f"backbone:{s}": optax.constant_schedule(c.optim.lr * v) for s, v in m.items()}
    schedules["head"] = optax.constant_schedule(c.optim.head_lr)
    ref_tx = optim.build(c.optim, ref_labels, schedules)
    ref_state = {**state, "opt_state": ref_tx.init(state["params"])}
    ref_step = jax.jit(step_lib.make_train_step(model, ref_tx, ref_labels))
    for _ in range(3):
        state, _ = step(state, batch)
        ref_state, _ = ref_step(ref_state, batch)
    a, b = flat(state["params"]), flat(ref_state["params"])
    for path in a:
        assert np.array_equal(a[path], b[path]), path


def test_auto_rgn_multipliers_equal_the_formula_on_a_hand_made_tree():
    f = np.float32
    params = {
        "a": f([3.0, 4.0]),  # ||w|| = 5, ||g|| = 10: RGN 2 (the max)
        "b": f([0.0, 2.0]),  # ||w|| = 2, ||g|| = 1: RGN 0.5
        "c": f([8.0]),  # ||w|| = 8, ||g|| = 1: RGN 0.125
        "zero": f([0.0, 0.0]),  # ||w|| = 0: no RGN, multiplier 1
        "head": f([1.0]),  # not eligible (a new leaf): multiplier 1
    }
    grads = {"a": f([6, 8]), "b": f([0, 1]), "c": f([1]), "zero": f([5, 5]), "head": f([100])}
    eligible = {"a": True, "b": True, "c": True, "zero": True, "head": False}
    out = jax.device_get(auto_rgn.multipliers(grads, params, eligible))
    assert out == {"a": 1.0, "b": 0.25, "c": 0.0625, "zero": 1.0, "head": 1.0}


# -- BatchNorm policy ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, stats, affine",
    [
        ("frozen", False, False),
        ("train_affine", False, True),
        ("train_stats", True, False),
        ("train", True, True),
    ],
)
def test_batchnorm_mode_changes_exactly_its_statistics_and_affine(mode, stats, affine):
    model, plan, state, batch = tiny(ft("freeze_early", **{"freeze.bn": mode}))
    assert plan.bn_mode == mode
    step = jit_step(model, plan)
    p0, s0 = flat(state["params"]), flat(state["batch_stats"])
    for _ in range(2):
        state, _ = step(state, batch)
    p1, s1 = flat(state["params"]), flat(state["batch_stats"])
    for path in p0:
        frozen_part = path.startswith(("stem/", "stage1/"))
        is_bn = "bn" in path.split("/")[-2]
        changed = not np.array_equal(p0[path], p1[path])
        expect = (affine if is_bn else False) if frozen_part else True
        assert changed == expect, path
    for path in s0:
        changed = not np.array_equal(s0[path], s1[path])
        assert changed == (stats or not path.startswith(("stem/", "stage1/"))), path


# -- gradual unfreezing, LP-FT ---------------------------------------------------------------------
def test_gradual_unfreeze_phases_go_top_down_every_k_steps():
    c = ft("gradual_unfreeze", **{"strategy.gradual_unfreeze.every_steps": 3})
    _, plan, _, _ = tiny(c)
    got = [(s.phase.start, s.phase.end, s.frozen_bn) for s in plan.phases]
    assert got == [
        (0, 3, ("stem", "stage1", "stage2", "stage3")),
        (3, 6, ("stem", "stage1", "stage2")),
        (6, 8, ("stem", "stage1")),
    ]
    labels = flat(plan.phases[2].labels)
    assert labels["head/kernel"] == "head"
    assert labels["stage3/block0/conv1/kernel"] == "backbone:p1"
    assert labels["stage2/block0/conv1/kernel"] == "backbone:p2"
    assert labels["stage1/block0/conv1/kernel"] == freeze.FROZEN


def test_newly_unfrozen_leaves_start_with_zero_optimizer_state():
    c = ft("gradual_unfreeze", **{"strategy.gradual_unfreeze.every_steps": 2})
    model, plan, state, batch = tiny(c)
    step = jit_step(model, plan)
    for _ in range(2):
        state, _ = step(state, batch)
    old = state["opt_state"]
    new = optim.carry_state(plan.phases[1].tx.init(state["params"]), old)
    jax.tree.map(np.testing.assert_array_equal, new.inner_states["head"], old.inner_states["head"])
    fresh = jax.tree.leaves(new.inner_states["backbone:p1"])
    assert fresh and all(not np.any(x) for x in fresh)  # moments and count all zero
    assert int(old.inner_states["head"].inner_state[0].count) == 2  # adam count, head branch


def test_lp_ft_probes_then_finetunes_everything_with_a_fresh_optimizer_at_lr():
    _, plan, _, _ = tiny(ft("lp_ft", **{"strategy.lp_ft.lp_fraction": 0.25}))
    lp, ft_ = plan.phases
    assert (lp.phase.start, lp.phase.end, ft_.phase.start, ft_.phase.end) == (0, 2, 2, 8)
    assert set(jax.tree.leaves(lp.labels)) == {"head", freeze.FROZEN}
    assert set(jax.tree.leaves(ft_.labels)) == {"backbone"} and ft_.phase.fresh
    assert float(ft_.global_lr["backbone"](2)) == 0.0  # its warmup restarts at the phase
    assert ft_.frozen_bn == ()


# -- L2-SP -----------------------------------------------------------------------------------------
def test_l2_sp_penalty_is_its_formula_on_a_hand_made_tree():
    params = {"w": jnp.array([1.0, 2.0]), "new": jnp.array([3.0]), "f": jnp.array([9.0])}
    ref = {"w": jnp.array([0.0, 4.0]), "new": jnp.array([0.0]), "f": jnp.array([0.0])}
    labels = {"w": "backbone", "new": "head", "f": freeze.FROZEN}
    got = l2_sp.penalty(params, ref, labels, alpha=2.0, beta=4.0)
    assert float(got) == 2.0 / 2 * (1 + 4) + 4.0 / 2 * 9  # the frozen leaf is not penalised


def test_l2_sp_loss_form_adds_the_gradient_of_its_penalty_before_the_optimizer():
    """The loss form's transforms add exactly d/dw of `l2_sp.penalty` to the gradient."""
    c = ft("l2_sp", **{"strategy.l2_sp.alpha": 0.5, "strategy.l2_sp.beta": 0.25})
    c.unlock()
    c.optim.name, c.optim.momentum, c.optim.schedule = "sgd", 0.0, "constant"
    c.optim.warmup_steps = 0
    model, plan, state, batch = tiny(c)
    labels, params = plan.phases[0].labels, state["params"]
    w0 = jax.tree.map(np.array, params)
    moved = jax.tree.map(lambda w: w + 0.01, params)  # away from w0, so the term is not zero
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = plan.phases[0].tx.update(grads, plan.phases[0].tx.init(params), moved)
    term = jax.grad(lambda p: l2_sp.penalty(p, w0, labels, 0.5, 0.25))(moved)
    lrs = {"head": -c.optim.head_lr, "backbone": -c.optim.lr}
    label_of = dict(zip(freeze.leaf_paths(labels), jax.tree.leaves(labels), strict=True))
    assert set(label_of.values()) == {"backbone", "head"}
    for path, u in flat(updates).items():
        lbl = label_of[path]
        expect = lrs[lbl] * (1.0 + flat(term)[path])  # SGD: -lr * (g + d penalty / dw)
        np.testing.assert_allclose(u, expect, rtol=1e-5, err_msg=path)


def test_auto_rgn_writes_its_multipliers_into_the_optimizer_state():
    c = ft("auto_rgn", **{"strategy.auto_rgn.batches": 1})
    model, plan, state, batch = tiny(c)
    before = transforms.get_multipliers(state["opt_state"])
    assert before and all(float(m) == 1.0 for t in before for m in jax.tree.leaves(t))
    mult = jax.tree.map(lambda p: np.float32(0.5), state["params"])
    after = transforms.get_multipliers(transforms.set_multipliers(state["opt_state"], mult))
    assert len(after) == len(before)
    assert all(float(m) == 0.5 for t in after for m in jax.tree.leaves(t))


def test_l2_sp_with_huge_alpha_keeps_transferred_weights_within_1e_6_of_w0():
    c = ft("l2_sp", **{"strategy.l2_sp.alpha": 1e12, "strategy.l2_sp.form": "proximal"})
    model, plan, state, batch = tiny(c)
    step = jit_step(model, plan)
    w0 = flat(state["params"])
    for _ in range(4):
        state, _ = step(state, batch)
    w = flat(state["params"])
    for path in w0:
        if path.startswith("head/"):
            assert not np.array_equal(w[path], w0[path])
        else:
            np.testing.assert_allclose(w[path], w0[path], rtol=0, atol=1e-6, err_msg=path)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    c = cfg(
        "configs/pretrain.py:steps=4,batch_size=16,image_size=16",
        **{
            "data.fractals.num_classes": 4,
            "data.fractals.train_per_class": 20,
            "data.fractals.test_per_class": 5,
        },
    )
    train.run(c, workdir)
    return workdir


def finetune(pretrained, workdir, strategy, steps=4, **overrides):
    spec = (
        f"configs/finetune.py:target=digits,image_size=16,batch_size=16,steps={steps},"
        f"strategy={strategy},init_from={pretrained}"
    )
    return train.run(cfg(spec, **overrides), str(workdir))


def test_l2_sp_with_zero_alpha_and_beta_is_plain_finetuning_bit_for_bit(pretrained, tmp_path):
    finetune(pretrained, tmp_path / "none", "none", **{"optim.weight_decay": 0.0})
    zero = {"strategy.l2_sp.alpha": 0.0, "strategy.l2_sp.beta": 0.0}
    finetune(pretrained, tmp_path / "l2sp", "l2_sp", **zero)
    a = checkpoint.read_variables(str(tmp_path / "none"))
    b = checkpoint.read_variables(str(tmp_path / "l2sp"))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_gradual_unfreeze_keeps_each_stage_bit_identical_until_its_step(
    pretrained, tmp_path, monkeypatch
):
    traces = []
    make = step_lib.make_train_step

    def counting(*args, **kwargs):
        fn = make(*args, **kwargs)

        def step(state, batch):
            traces.append(1)  # runs once per trace, i.e. per compilation
            return fn(state, batch)

        return step

    monkeypatch.setattr(step_lib, "make_train_step", counting)
    over = {"strategy.gradual_unfreeze.every_steps": 1, "checkpoint_every": 1, "max_to_keep": 10}
    # a random head and no warmup: the backbone gets a gradient from the first update on
    over |= {"init_reinit_init": "init", "optim.warmup_steps": 0}
    summary = finetune(pretrained, tmp_path, "gradual_unfreeze", steps=6, **over)
    assert [p["start"] for p in summary["phases"]] == [0, 1, 2, 3, 4]
    assert len(traces) == 5  # one compilation per phase
    w0 = flat(checkpoint.read_variables(pretrained))
    unfreeze = {"stage3": 1, "stage2": 2, "stage1": 3, "stem": 4}  # updates done before it
    for done in range(1, 7):
        w = flat(checkpoint.read_variables(str(tmp_path / "checkpoints" / str(done))))
        for path, x in w.items():
            stage = path.split("/")[1]
            if stage in unfreeze:
                assert np.array_equal(x, w0[path]) == (done <= unfreeze[stage]), (done, path)


def test_scratch_ignores_init_from(pretrained, tmp_path):
    summary = finetune(pretrained, tmp_path, "scratch", steps=2)
    assert summary["init_from"] == "" and not os.path.exists(tmp_path / "load_report.json")
    c = cfg(f"configs/finetune.py:strategy=scratch,init_from={pretrained}")
    assert c.optim.lr == c.optim.head_lr == 1e-3


def test_surgical_tunes_one_stage_and_the_new_head():
    _, plan, _, _ = tiny(ft("surgical", **{"strategy.surgical.stage": "stage2"}))
    trainable = {p.split("/")[0] for p, m in flat(plan.phases[0].mask).items() if not m}
    assert trainable == {"stage2", "head"}
    _, plan, _, _ = tiny(ft("surgical", **{"strategy.surgical.stage": "head"}))
    assert {p.split("/")[0] for p, m in flat(plan.phases[0].mask).items() if not m} == {"head"}
