"""The statistics of a study's results.csv rows: t-intervals over seeds, paired differences
between the values of the compared axis, each condition's winner, the rule of thumb against the
measurement, and the trained share of the parameters. Pure functions of rows (dicts).

Intervals are two-sided 95% t-intervals over seeds: mean +- t(0.975, n-1) * std / sqrt(n), std
with n-1 degrees of freedom. Two values are compared on the seeds both have (paired), and called
"not different" when the interval of the mean difference contains zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tlx import strategies

FIRST_FIGURE = "test_accuracy"
SEED = "seed"
MEANS_OF = (
    "train_accuracy",
    "val_accuracy",
    "frozen_stages",
    "train_examples",
    "num_classes",
    "wall_s",  # seconds of the chosen run (compile + train + eval), not of its LR grid
)


def tags_of(value) -> tuple[str, ...]:
    """The tags (`tlx.strategies.Strategy.tags`) of a compared value: those of the strategy it
    names, or of the strategy whose variant it is ('vpt_deep': vpt's); () for anything else."""
    name = str(value)
    if name not in strategies.REGISTRY:
        name = name.split("_")[0]
    return strategies.REGISTRY[name].tags if name in strategies.REGISTRY else ()


def is_peft(strategy) -> bool:
    """'lora', 'vpt_deep', ...: a parameter-efficient strategy (tagged 'peft') or a variant."""
    return "peft" in tags_of(strategy)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """n, mean, std (ddof=1), and the t-interval of the mean; the spread is nan below n=2."""
    from scipy import stats

    x = np.asarray(values, np.float64)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def group_by(rows: list[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    """Rows by their values of `keys`, in first-seen order."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def summarize(rows: list[dict], axes: Sequence[str], metric: str = FIRST_FIGURE) -> list[dict]:
    """One row per cell of the axes but the seed: the t-interval of `metric` over seeds, and the
    mean of the other figures (training accuracy beside test accuracy)."""
    keys = [a for a in axes if a != SEED]
    out = []
    for key, group in group_by(rows, keys).items():
        row = dict(zip(keys, key, strict=True))
        row.update(t_interval([r[metric] for r in group]))
        for m in MEANS_OF:
            values = [r[m] for r in group if isinstance(r.get(m), int | float)]
            if values:
                row[f"{m}_mean"] = float(np.mean(values))
        out.append(row)
    return out


def paired_differences(
    rows: list[dict], axes: Sequence[str], between: str, metric: str = FIRST_FIGURE
) -> list[dict]:
    """For each condition (the axes but `between` and the seed) and each pair (a, b) of values of
    `between` in first-seen order: the t-interval of metric(a) - metric(b) over the seeds both
    have, and a verdict: 'a better', 'b better' or 'not different' (interval contains zero)."""
    keys = [k for k in axes if k not in (between, SEED)]
    out = []
    for key, group in group_by(rows, keys).items():
        by_value: dict = {}
        for r in group:
            by_value.setdefault(r[between], {})[r.get(SEED, 0)] = r[metric]
        values = list(by_value)
        for i, a in enumerate(values):
            for b in values[i + 1 :]:
                seeds = [s for s in by_value[a] if s in by_value[b]]
                diffs = [by_value[a][s] - by_value[b][s] for s in seeds]
                ci = t_interval(diffs)
                row = dict(zip(keys, key, strict=True))
                row.update({"a": a, "b": b, **_renamed(ci), "verdict": verdict(ci, a, b)})
                out.append(row)
    return out


def _renamed(ci: dict) -> dict:
    return {
        "n": ci["n"],
        "mean_diff": ci["mean"],
        "std_diff": ci["std"],
        "ci_low": ci["ci_low"],
        "ci_high": ci["ci_high"],
    }


def verdict(ci: dict, a, b) -> str:
    if not ci["n"] or math.isnan(ci["ci_low"]):
        return "too few seeds"
    if ci["ci_low"] > 0:
        return f"{a} better"
    if ci["ci_high"] < 0:
        return f"{b} better"
    return "not different"


def oriented_difference(
    cond: list[dict], axes: Sequence[str], between: str, a, b, metric: str = FIRST_FIGURE
) -> dict:
    """The paired t-interval of metric(a) - metric(b) over the seeds of one condition's rows
    (whichever order `paired_differences` meets a and b in)."""
    pair = paired_differences([r for r in cond if r[between] in (a, b)], axes, between, metric)[0]
    ci = {k: pair[k] for k in ("n", "ci_low", "ci_high")} | {"mean": pair["mean_diff"]}
    if pair["a"] != a:
        ci.update(mean=-ci["mean"], ci_low=-ci["ci_high"], ci_high=-ci["ci_low"])
    return ci


def winners(
    rows: list[dict],
    axes: Sequence[str],
    between: str,
    metric: str = FIRST_FIGURE,
    select: str = "val_accuracy",
) -> list[dict]:
    """Per condition: the value of `between` with the best mean `select` (validation accuracy:
    chosen on what a user could choose on, never on test), reported by its mean `metric` (test
    accuracy); the runner-up on `select` too, and the paired `metric` interval of winner minus
    runner-up. Baselines such as scratch (tagged 'baseline') do not compete. Rows without
    `select` (older results) are ranked on `metric`, and the row says so in `chosen_on`."""
    keys = [k for k in axes if k not in (between, SEED)]
    summary = summarize(rows, axes, metric)
    on = select if rows and all(isinstance(r.get(select), int | float) for r in rows) else metric
    chosen = {tuple(r[k] for k in (*keys, between)): r["mean"] for r in summarize(rows, axes, on)}
    out = []
    for key, group in group_by(summary, keys).items():
        baseline = {r[between]: r["mean"] for r in group if _is_baseline(r[between])}
        ranked = sorted(
            (r for r in group if not _is_baseline(r[between])),
            key=lambda r: -chosen[(*key, r[between])],
        )
        if not ranked:
            continue
        row = dict(zip(keys, key, strict=True))
        best = ranked[0]
        row.update({"winner": best[between], "winner_mean": best["mean"], "chosen_on": on})
        if len(ranked) > 1:
            second = ranked[1]
            cond = [r for r in rows if all(r[k] == v for k, v in zip(keys, key, strict=True))]
            ci = oriented_difference(cond, axes, between, best[between], second[between], metric)
            row.update(
                {
                    "runner_up": second[between],
                    "margin": best["mean"] - second["mean"],
                    "margin_ci_low": ci["ci_low"],
                    "margin_ci_high": ci["ci_high"],
                    "verdict": verdict(ci, best[between], second[between]),
                }
            )
        for name, mean in baseline.items():
            row[f"{name}_mean"] = mean
        out.append(row)
    return out


def against_rule_of_thumb(
    rows: list[dict], axes: Sequence[str], win: list[dict] | None = None, metric=FIRST_FIGURE
) -> list[dict]:
    """Per (size, similarity) quadrant: the strategy the rule of thumb prescribes
    (`tlx.strategies.rule_of_thumb`) beside the measured winner, and the paired interval of
    winner - prescribed over seeds. Verdict: 'agrees' (the prescribed strategy won on
    validation), 'not different' (it lost, but the test interval contains zero: not shown to
    differ, which is not shown to be the same) or 'disagrees'. Empty unless the study has the
    quadrant axes and the prescribed strategies."""
    if not {"size", "similarity", "strategy"} <= set(axes):
        return []
    out = []
    for w in win if win is not None else winners(rows, axes, "strategy", metric):
        prescribed = strategies.RULE_OF_THUMB.get((w["size"], w["similarity"]))
        cond = [r for r in rows if all(r[k] == w[k] for k in w if k in axes)]
        if prescribed is None or not any(r["strategy"] == prescribed for r in cond):
            continue
        keys = [k for k in axes if k not in ("strategy", SEED)]
        row = {k: w[k] for k in keys}
        pick_mean = summarize([r for r in cond if r["strategy"] == prescribed], axes, metric)[0]
        # The columns keep the names the committed tables (experiments/results) have.
        row.update(
            {
                "seed_table": prescribed,
                "seed_table_mean": pick_mean["mean"],
                "winner": w["winner"],
                "winner_mean": w["winner_mean"],
            }
        )
        if w["winner"] == prescribed:
            row.update({"gap": 0.0, "gap_ci_low": 0.0, "gap_ci_high": 0.0, "verdict": "agrees"})
        else:
            ci = oriented_difference(cond, axes, "strategy", w["winner"], prescribed, metric)
            said = verdict(ci, w["winner"], prescribed)
            row.update(
                {
                    "gap": ci["mean"],
                    "gap_ci_low": ci["ci_low"],
                    "gap_ci_high": ci["ci_high"],
                    "verdict": {"not different": "not different", "too few seeds": said}.get(
                        said, "disagrees"
                    ),
                }
            )
        out.append(row)
    return out


def _is_baseline(value) -> bool:
    return "baseline" in tags_of(value)


def trained_fractions(rows: list[dict], axes: Sequence[str]) -> list[dict]:
    """Per cell (the axes but the seed): the mean trained and frozen parameter counts over seeds,
    the trained share trained / (trained + frozen) (the head counts as trained: VPT's "tuned /
    total"), and the t-interval of test accuracy. Rows without the parameter counts (runs from
    before tlx recorded them) are left out; empty when no row has them."""
    rows = [r for r in rows if {"params_trainable", "params_frozen"} <= set(r)]
    if not rows:
        return []
    keys = [a for a in axes if a != SEED]
    out = []
    for key, group in group_by(rows, keys).items():
        trained = float(np.mean([r["params_trainable"] for r in group]))
        frozen = float(np.mean([r["params_frozen"] for r in group]))
        row = dict(zip(keys, key, strict=True))
        row.update(params_trainable=trained, params_frozen=frozen)
        row["trained_fraction"] = trained / (trained + frozen)
        row.update(t_interval([r[FIRST_FIGURE] for r in group]))
        out.append(row)
    return out


# -- multiplicity, equivalence, regret -------------------------------------------------------------
def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979, "A simple sequentially rejective multiple
    test procedure"), in the given order: the i-th smallest p times (m - i + 1), made monotone
    and capped at 1. Rejecting where adjusted p < alpha controls the family-wise error rate at
    alpha. By hand: statsmodels (multipletests(method='holm')) is not a tlx dependency, and
    scipy has only the false discovery rate procedures."""
    p = np.asarray(p_values, np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = stepped
    return [float(v) for v in out]


def tost(diffs: Sequence[float], margin: float = 0.01) -> dict:
    """Paired two one-sided t-tests of equivalence (Schuirmann 1987) of differences a - b over
    seeds: H0 mean <= -margin and H0 mean >= margin, each a one-sided t-test with n-1 degrees of
    freedom; p = the larger p. Equivalent at level alpha iff p < alpha, i.e. the (1 - 2 alpha)
    t-interval lies inside (-margin, margin). margin in accuracy units (0.01: 1 pp). nan below
    two seeds or with no spread."""
    from scipy import stats

    x = np.asarray(diffs, np.float64)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    se = float(x.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    if not se > 0:
        return {"n": n, "mean": mean, "margin": margin, "p": math.nan}
    p_low = float(stats.t.sf((mean + margin) / se, n - 1))  # against mean <= -margin
    p_high = float(stats.t.cdf((mean - margin) / se, n - 1))  # against mean >= margin
    return {"n": n, "mean": mean, "margin": margin, "p": max(p_low, p_high)}


def regret(
    rows: list[dict],
    axes: Sequence[str],
    between: str,
    pick,
    metric: str = FIRST_FIGURE,
    select: str = "val_accuracy",
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """How much test accuracy a rule loses against the oracle, per condition (the axes but
    `between` and the seed): the oracle is the value of `between` with the best mean `select`
    (validation accuracy: what a user could choose on), the rule's is `pick(condition)` (a dict
    of the condition's axes -> a value of `between`). Regret = mean metric(oracle) - mean
    metric(rule). Returns the per-condition rows and the mean regret with a percentile bootstrap
    interval over conditions (scipy.stats.bootstrap; nan with fewer than two conditions)."""
    from scipy import stats

    keys = [k for k in axes if k not in (between, SEED)]
    per = []
    for key, group in group_by(rows, keys).items():
        condition = dict(zip(keys, key, strict=True))
        by_value = group_by(group, [between])
        mean = {v[0]: float(np.mean([r[metric] for r in g])) for v, g in by_value.items()}
        chosen = {v[0]: float(np.mean([r[select] for r in g])) for v, g in by_value.items()}
        oracle = max(chosen, key=chosen.get)  # the first of equals
        rule = pick(condition)
        if rule not in mean:
            raise ValueError(f"regret: the rule picks {rule!r} at {condition}, which did not run")
        per.append(
            {**condition, "oracle": oracle, "rule": rule, "regret": mean[oracle] - mean[rule]}
        )
    values = np.array([r["regret"] for r in per])
    low = high = math.nan
    if len(values) > 1 and np.ptp(values) > 0:
        ci = stats.bootstrap(
            (values,), np.mean, confidence_level=confidence, method="percentile",
            random_state=np.random.default_rng(seed),
        ).confidence_interval  # fmt: skip
        low, high = float(ci.low), float(ci.high)
    elif len(values) > 1:
        low = high = float(values[0])
    mean_regret = float(values.mean()) if len(values) else math.nan
    return {"conditions": per, "mean": mean_regret, "ci_low": low, "ci_high": high}
