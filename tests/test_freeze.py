"""Freezing: frozen leaves stay bit-identical, hold no optimizer state, keep BN statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlx import config as tlx_config
from tlx import freeze, models, strategies, train


def run_config(strategy, *, weight_decay=0.1, stages=0, patterns=(), new=("^head/",), name="adamw"):
    c = tlx_config.base()
    tlx_config.set_strategy(c, strategy, {"stages": stages} if strategy == "freeze_stages" else {})
    c.freeze.patterns, c.init_reinit, c.total_steps = list(patterns), list(new), 10
    c.optim.name, c.optim.lr, c.optim.head_lr = name, 1e-2, 5e-2
    c.optim.weight_decay, c.optim.clip_norm = weight_decay, 1.0
    return c


def setup(strategy, **kw):
    """A resnet_tiny run's state, jitted step and batch, built as `train.run` builds them."""
    model = models.build("resnet_tiny", 5)
    x = jax.random.normal(jax.random.key(1), (16, 16, 16, 3))
    variables = model.init(jax.random.key(0), x[:1], train=False)
    plan = strategies.plan(run_config(strategy, **kw), variables)
    state = plan.init_state(variables)
    step = jax.jit(plan.train_step(model))
    batch = {"image": x, "label": jnp.arange(16) % 5}
    return state, step, batch, plan.phases[0].mask, plan.phases[0].labels


def flat(tree):
    return {freeze.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("strategy", ["linear_probe", "freeze_most", "freeze_early"])
def test_frozen_leaves_bit_identical_after_adamw_with_weight_decay(strategy):
    state, step, batch, mask, _ = setup(strategy)
    before = flat(state["params"])
    for _ in range(4):
        state, _ = step(state, batch)
    after, frozen = flat(state["params"]), flat(mask)
    assert any(frozen.values()) and not all(frozen.values())
    for path, is_frozen in frozen.items():
        if is_frozen:
            assert np.array_equal(before[path], after[path]), path  # bit for bit
        else:
            assert not np.array_equal(before[path], after[path]), path


def test_optimizer_state_holds_moments_only_for_trainable_leaves():
    state, _, _, mask, _ = setup("linear_probe")
    trainable_bytes = sum(
        p.nbytes
        for p, m in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(mask), strict=True)
        if not m
    )
    opt_bytes = train.tree_bytes(state["opt_state"])
    # Adam: mu and nu for each trainable leaf, plus one int32 count per group
    assert trainable_bytes == 64 * 5 * 4 + 5 * 4
    assert 2 * trainable_bytes <= opt_bytes <= 2 * trainable_bytes + 64


def test_batchnorm_statistics_of_frozen_stages_unchanged():
    state, step, batch, _, _ = setup("freeze_early")
    before = flat(state["batch_stats"])
    for _ in range(2):
        state, _ = step(state, batch)
    after = flat(state["batch_stats"])
    for path in before:
        if path.startswith(("stem/", "stage1/")):
            assert np.array_equal(before[path], after[path]), path
        else:
            assert not np.array_equal(before[path], after[path]), path


def test_bn_statistics_train_when_the_bn_mode_trains_them():
    params = models.build("resnet_tiny", 3).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))[
        "params"
    ]
    patterns = freeze.stage_patterns(["stem", "stage1", "stage2", "stage3"])  # linear_probe's
    assert freeze.frozen_stages(params, patterns, "train_stats") == ()
    assert freeze.frozen_stages(params, patterns, "frozen") == (
        "stem",
        "stage1",
        "stage2",
        "stage3",
    )


def test_presets_on_stage_names():
    variables = jax.eval_shape(
        lambda: models.build("resnet18", 3).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    )

    def patterns(strategy, **kw):
        return list(strategies.plan(run_config(strategy, **kw), variables).phases[0].phase.patterns)

    expect = {
        "none": [],
        "linear_probe": ["stem", "stage1", "stage2", "stage3", "stage4"],
        "freeze_most": ["stem", "stage1", "stage2", "stage3"],
        "freeze_early": ["stem", "stage1"],
    }
    for strategy, stages in expect.items():
        assert patterns(strategy) == [f"^{s}/" for s in stages]
    assert patterns("freeze_stages", stages=2) == ["^stem/", "^stage1/", "^stage2/"]


def test_explicit_pattern_freezes_exactly_what_it_matches():
    state, step, batch, mask, _ = setup("none", patterns=[r"stage2/block1/conv\d/kernel"])
    frozen = [p for p, m in flat(mask).items() if m]
    assert frozen == ["stage2/block1/conv1/kernel", "stage2/block1/conv2/kernel"]
    before = flat(state["params"])
    state, _ = step(state, batch)
    after = flat(state["params"])
    assert all(np.array_equal(before[p], after[p]) for p in frozen)


def test_pattern_that_matches_nothing_is_an_error_listing_paths():
    with pytest.raises(ValueError, match=r"match no parameter(.|\n)*stage1/block0/conv1/kernel"):
        setup("none", patterns=["^stage9/"])


def test_unknown_preset_is_an_error():
    with pytest.raises(ValueError, match="unknown freeze strategy 'freeze_lots'.*linear_probe"):
        setup("freeze_lots")


def test_freeze_stages_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="out of range"):
        setup("freeze_stages", stages=4)


def test_linear_probe_step_does_no_backbone_backward_work():
    """XLA prunes frozen backward work only if nothing uses the whole gradient tree."""

    def flops(strategy):
        state, step, batch, *_ = setup(strategy)
        cost = step.lower(state, batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return cost["flops"]

    model = models.build("resnet_tiny", 5)
    x = jnp.zeros((16, 16, 16, 3))
    variables = model.init(jax.random.key(0), x[:1])
    forward = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).compile()
    fwd = forward.cost_analysis()
    fwd = (fwd[0] if isinstance(fwd, list) else fwd)["flops"]
    full, probe = flops("none"), flops("linear_probe")
    assert full > 2.5 * fwd
    assert probe < 1.2 * fwd


def test_head_gets_its_own_learning_rate_group():
    _, _, _, _, labels = setup("freeze_early")
    groups = {p: g for p, g in flat(labels).items()}
    assert groups["head/kernel"] == "head"
    assert groups["stage2/block0/conv1/kernel"] == "backbone"
    assert groups["stem/conv1/kernel"] == freeze.FROZEN


def test_parse_arg_types_and_unknown_keys():
    out = tlx_config.parse_arg("a=3,b=x,c=0.5,d=true", {"a": 1, "b": "", "c": 0.1, "d": False})
    assert out == {"a": 3, "b": "x", "c": 0.5, "d": True}
    with pytest.raises(ValueError, match="unknown config arg 'z'"):
        tlx_config.parse_arg("z=1", {"a": 1})
