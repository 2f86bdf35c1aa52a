"""The freeze advisor: its probe equals scikit-learn's ridge, its LogME the evidence maximised
directly, it reads the training split only, and it refuses too few examples for its folds."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
import scipy.stats
from sklearn.linear_model import Ridge

from tlx import advise, checkpoint, fewshot, models, probe
from tlx import config as tlx_config
from tlx import data as tlx_data
from tlx.features import backbone_features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FRACTALS = {
    "data.fractals.num_classes": 6,
    "data.fractals.train_per_class": 20,
    "data.fractals.test_per_class": 10,
    "data.fractals.resolution": 16,
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """resnet_tiny trained for a few Adam steps on 6 fractal classes at 16x16, saved as a tlx
    run's checkpoint (a loop of its own: this file tests the advisor, not the train loop)."""
    workdir = str(tmp_path_factory.mktemp("advise_pretrain"))
    c = tlx_config.load(os.path.join(ROOT, "configs/pretrain.py:image_size=16"), **TINY_FRACTALS)
    ds = tlx_data.load(c.data)
    model = models.build("resnet_tiny", ds.num_classes, stem="cifar")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(2e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, stats, opt, x, y):
        def loss_fn(p):
            logits, new = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

        (_, new), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), new["batch_stats"], opt

    it = ds.train_iter(32, seed=0)
    for _ in range(6):
        b = next(it)
        params, stats, opt = step(params, stats, opt, b["image"], b["label"])
    ckpt = checkpoint.Checkpointer(workdir)
    state = {"params": params, "batch_stats": stats, "opt_state": opt, "step": jnp.asarray(6)}
    ckpt.save(6, jax.device_get(state), {})
    ckpt.wait()
    ckpt.close()
    return workdir


def cli(pretrained, tmp_path, *extra):
    return [
        f"--init_from={pretrained}",
        "--backbone=resnet_tiny",
        "--target=digits",
        "--args=image_size=16",
        f"--cache_dir={tmp_path / 'cache'}",
        *extra,
    ]


# -- the probe and the score, against references --------------------------------------------------
def test_ridge_probe_accuracy_equals_sklearn_closed_form_ridge():
    rng = np.random.default_rng(0)
    for n, d in ((60, 8), (20, 40)):  # N >= D (primal) and D > N (dual)
        y = rng.integers(0, 4, n)
        x = rng.normal(size=(n, d)) + 0.7 * y[:, None]
        xt, yt = rng.normal(size=(30, d)) + 0.7 * (np.arange(30) % 4)[:, None], np.arange(30) % 4
        # big_vision's design, built here: train statistics, a bias column of 100, {-1, 1}
        mean, std = x.mean(0), x.std(0) + 1e-5

        def design(z, mean=mean, std=std):
            return np.hstack([(z - mean) / std, np.full((len(z), 1), 100.0)])

        targets = 2.0 * np.eye(4)[y] - 1.0
        l2s = (0.01, 1.0, 64.0)
        ours = probe.ridge_accuracy(x, y, xt, yt, 4, l2s)
        for l2, acc in zip(l2s, ours, strict=True):
            ref = Ridge(alpha=l2, fit_intercept=False, solver="cholesky").fit(design(x), targets)
            assert acc == np.mean(np.argmax(ref.predict(design(xt)), 1) == yt)
        w, _ = probe.ridge_weights(x, y, 4, l2s)
        ref = Ridge(alpha=64.0, fit_intercept=False, solver="cholesky").fit(design(x), targets)
        np.testing.assert_allclose(w[2], ref.coef_.T, rtol=1e-8, atol=1e-10)


def _reference_log_evidence(f, y):
    """max over (alpha, beta) of log N(y; 0, F F^T / alpha + I / beta): the marginal likelihood
    of Bayesian linear regression, maximised by Nelder-Mead from the best point of a grid."""

    def neg(p):
        cov = f @ f.T / np.exp(p[0]) + np.eye(len(y)) / np.exp(p[1])
        return -scipy.stats.multivariate_normal.logpdf(y, np.zeros(len(y)), cov)

    grid = [(a, b) for a in np.linspace(-6, 6, 13) for b in np.linspace(-4, 6, 11)]
    start = min(grid, key=neg)
    res = scipy.optimize.minimize(
        neg, start, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 4000}
    )
    return -res.fun


def test_logme_equals_direct_evidence_maximisation():
    rng = np.random.default_rng(1)
    n, d, c = 40, 5, 3
    labels = np.arange(n) % c
    f = rng.normal(size=(n, d)) + np.eye(c, d)[labels] * 1.5
    ref = np.mean([_reference_log_evidence(f, (labels == k).astype(float)) for k in range(c)]) / n
    assert probe.logme(f, labels, c) == pytest.approx(ref, abs=1e-7)
    assert probe.logme(f, labels, c) == pytest.approx(-0.648523, abs=1e-6)  # this example's value


def test_stratified_folds_are_balanced_and_deterministic():
    labels = np.repeat(np.arange(3), [5, 7, 9])
    fold = probe.stratified_folds(labels, 3, seed=0)
    np.testing.assert_array_equal(fold, probe.stratified_folds(labels, 3, seed=0))
    for c, n in enumerate((5, 7, 9)):
        counts = np.bincount(fold[labels == c], minlength=3)
        assert counts.max() - counts.min() <= 1 and counts.sum() == n


def test_too_few_examples_per_class_for_the_folds_is_a_clear_error():
    labels = np.repeat(np.arange(4), 2)
    with pytest.raises(probe.TooFewExamplesError, match="fewer than folds=3"):
        probe.cross_validate_ridge(np.ones((8, 2)), labels, 4, folds=3)


def test_the_cli_refuses_too_few_examples_in_one_line(pretrained, tmp_path, capsys):
    assert advise.main(cli(pretrained, tmp_path, "--examples_per_class=2", "--folds=3")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "fewer than folds=3" in err and "--folds=2" in err


# -- the rule -------------------------------------------------------------------------------------
def rows(accs, se=0.01):
    names = ["stem"] + [f"stage{i}" for i in range(1, len(accs))]
    return [
        {"stage": s, "probe": {"accuracy": a, "se": se}} for s, a in zip(names, accs, strict=True)
    ]


def test_rule_keeps_the_last_stage_trainable_on_a_similar_target():
    sim = advise.similarity(rows([0.5, 0.7, 0.8, 0.9]), 10)
    assert sim["label"] == "similar" and sim["retained"] == 1.0
    assert advise.recommend(sim, 10, 3)["strategy"] == "freeze_most"
    assert advise.recommend(sim, 300, 3)["strategy"] == "freeze_early"  # large: one fewer


def test_rule_freezes_through_the_deepest_general_stage_on_a_different_target():
    sim = advise.similarity(rows([0.5, 0.8, 0.795, 0.6]), 10)  # stage2 within one SE of stage1
    assert sim["label"] == "different" and sim["deepest_general_stage"] == "stage2"
    assert advise.recommend(sim, 10, 3)["strategy"] == "freeze_most"
    sim = advise.similarity(rows([0.5, 0.8, 0.7, 0.6]), 10)
    assert advise.recommend(sim, 10, 3)["strategy"] == "freeze_early"
    assert advise.recommend(sim, 300, 3)["strategy"] == "none"
    assert advise.recommend(sim, 10, 4)["strategy"] == "freeze_early"
    sim = advise.similarity(rows([0.5, 0.6, 0.8, 0.7, 0.6]), 10)
    assert advise.recommend(sim, 10, 4)["strategy"] == "freeze_stages=2"


def test_rule_tolerates_one_example_where_the_best_probe_is_perfect_on_every_fold():
    perfect = rows([0.9, 1.0, 0.99, 0.99], se=0.0)
    assert advise.similarity(perfect, 2)["deepest_general_stage"] == "stage1"
    for r in perfect:
        r["probe"]["resolution"] = 1 / 48  # one example of a 48-example fold
    sim = advise.similarity(perfect, 2)
    assert sim["deepest_general_stage"] == "stage3" and sim["label"] == "similar"


# -- the advisor end to end -----------------------------------------------------------------------
class Spy(dict):
    """A split dict that records which splits are read."""

    def __init__(self, d, seen):
        super().__init__(d)
        self.seen = seen

    def __getitem__(self, k):
        self.seen.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.seen.add(k)
        return super().get(k, default)

    def values(self):
        self.seen.update(self)
        return super().values()

    def items(self):
        self.seen.update(self)
        return super().items()


def test_advisor_reads_the_training_split_only(pretrained, tmp_path, monkeypatch):
    seen = set()
    real_load = tlx_data.load

    def spied_load(cfg):
        ds = real_load(cfg)
        ds.images, ds.labels = Spy(ds.images, seen), Spy(ds.labels, seen)
        return ds

    monkeypatch.setattr(advise.tlx_data, "load", spied_load)
    config = advise.build_config(pretrained, "resnet_tiny", "digits", 10, "image_size=16")
    advice = advise.advise(config, folds=3, cache_dir=str(tmp_path / "cache"))
    assert seen == {"train"} and advice["train_examples"] == 100


def test_cli_end_to_end_on_a_fractal_pretrained_resnet_tiny(pretrained, tmp_path, capsys):
    args = cli(pretrained, tmp_path, "--examples_per_class=10", f"--out={tmp_path / 'out'}")
    assert advise.main(args) == 0
    first = json.loads((tmp_path / "out" / "advice.json").read_text())
    table = capsys.readouterr().out
    assert "tlx recommends:" in table and "seed's table" in table
    assert [r["stage"] for r in first["stages"]] == ["stem", "stage1", "stage2", "stage3"]
    assert first["recommendation"]["strategy"] in ("none", "freeze_early", "freeze_most")
    assert first["examples_per_class"] == {"mean": 10.0, "min": 10}
    assert not first["cache"]["hit"]
    assert advise.main(args) == 0  # the features come from the cache, the advice is the same
    again = json.loads((tmp_path / "out" / "advice.json").read_text())
    assert again["cache"]["hit"] and again["stages"] == first["stages"]


def test_cli_on_mobilenet_v2_from_imagenet(tmp_path, capsys):
    from tlx.convert import pretrained as pt

    try:
        pt.load_pretrained("mobilenet_v2")
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"no ImageNet mobilenet_v2 here ({e}); see README: pretrained weights")
    args = [
        "--init_from=imagenet",
        "--backbone=mobilenet_v2",
        "--target=digits",
        "--examples_per_class=5",
        "--args=image_size=32",
        f"--cache_dir={tmp_path / 'cache'}",
        f"--out={tmp_path}",
    ]
    assert advise.main(args) == 0
    advice = json.loads((tmp_path / "advice.json").read_text())
    assert [r["stage"] for r in advice["stages"]] == ["stem"] + [f"stage{i}" for i in (1, 2, 3, 4)]
    assert advice["stages"][-1]["dim"] == 1280


# -- the few-shot evaluator -----------------------------------------------------------------------
def test_fewshot_evaluator_gives_the_ridge_probe_accuracy_on_val(pretrained):
    c = tlx_config.load(os.path.join(ROOT, "configs/pretrain.py:image_size=16"), **TINY_FRACTALS)
    c.unlock()
    c.fewshot = fewshot.default_config()
    c.fewshot.targets, c.fewshot.shots = ["digits"], [1, 3]
    model, variables = advise.load_backbone(
        advise.build_config(pretrained, "resnet_tiny", "digits", 0, "image_size=16")
    )
    evaluate = fewshot.make_fewshot_evaluator(c, model)
    out = evaluate(4, variables["params"], variables["batch_stats"])
    assert set(out) == {"digits_1shot", "digits_3shot", "seconds"}
    # the same number by hand: 3 shots from the train split, the probe scored on val
    ds = tlx_data.load(fewshot.target_data_config(c, "digits"))
    index = fewshot.kshot_indices(ds.labels["train"], 3, 0)
    shots = dataclasses.replace(
        ds, images={"val": ds.images["train"][index]}, labels={"val": ds.labels["train"][index]}
    )

    def feats(d):
        batch = next(d.eval_batches("val", d.num_examples["val"] if d is ds else len(index)))
        return np.asarray(backbone_features(model, variables, batch["image"]))

    x, y = feats(shots), ds.labels["train"][index]
    l2 = probe.cross_validate_ridge(x, y, 10, folds=3).l2
    acc = probe.ridge_accuracy(x, y, feats(ds), ds.labels["val"], 10, (l2,))[0]
    assert out["digits_3shot"] == pytest.approx(acc, abs=1.5 / len(ds.labels["val"]))
