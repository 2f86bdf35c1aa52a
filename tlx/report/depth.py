"""The freeze-depth benchmark's statistics (configs/depth.py): accuracy against freeze depth per
(target, size), the depth chosen on validation, what every simple rule loses against it, the
cost of each depth, and how often a learning-rate choice sat on the edge of its grid.

Rows are results.csv's: one per (target, size, depth, seed) at the rates chosen on validation,
with `depth` an int 0..S or 'scratch' and `max_depth` S. Every seed draws its own training subset
(and validation split), shared by all depths of that seed, so differences between depths are
paired on seeds.

- **Oracle** of a cell (target, size, seed): the depth with the best validation accuracy (ties:
  the deeper, i.e. the cheaper); its test accuracy is the reference. A condition's winner is the
  depth with the best mean validation accuracy over seeds, reported with its test accuracy.
- **Regret** of a rule: test accuracy of the cell's oracle minus that of the rule's depth (pp),
  averaged over cells, with a percentile bootstrap interval over cells (Efron & Tibshirani 1993;
  scipy.stats.bootstrap).
- **Each depth against the condition's winner**: paired t-interval over seeds, p-values
  Holm-adjusted within the study, and two one-sided tests of equivalence at `margin` (1 pp),
  reported apart: "not different" (the interval holds 0) is not "equivalent" (inside +-margin).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np

from tlx.report import stats, tables

CELL = ("target", "size", "seed")
CONDITION = ("target", "size")
LARGE_PER_CLASS = 100  # the size step of the seed's table and of the size-only rule


def _depths(rows: list[dict]) -> list[int]:
    return sorted({int(r["depth"]) for r in rows if r["depth"] != "scratch"})


def _key(row: dict, keys: Sequence[str]) -> tuple:
    return tuple(row[k] for k in keys)


def cells(rows: list[dict]) -> dict[tuple, dict[int, dict]]:
    """{(target, size, seed): {depth: row}} over the cells where every depth ran (scratch apart);
    a cell that misses a depth is left out (the study was cut short there)."""
    depths = _depths(rows)
    out: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        if r["depth"] != "scratch":
            out.setdefault(_key(r, CELL), {})[int(r["depth"])] = r
    return {k: v for k, v in out.items() if sorted(v) == depths}


def oracle_depth(cell: dict[int, dict], metric: str = "val_accuracy") -> int:
    """The depth with the best `metric`; ties go to the deeper (cheaper) depth."""
    return max(cell, key=lambda d: (cell[d][metric], d))


def oracle_table(rows: list[dict]) -> list[dict]:
    """Per cell: its oracle depth on validation, and its test accuracy; the depth that would
    have won on test, for contrast (what ranking on test reports)."""
    out = []
    for key, cell in cells(rows).items():
        d = oracle_depth(cell)
        out.append(
            {
                **dict(zip(CELL, key, strict=True)),
                "oracle_depth": d,
                "oracle_test": cell[d]["test_accuracy"],
                "test_best_depth": oracle_depth(cell, "test_accuracy"),
            }
        )
    return out


def seed_table_depth(size: int, max_depth: int, similar: bool) -> int:
    """The seed's 2x2 table as a depth: similar & small -> S (linear probe), similar & large ->
    S-1 (freeze most), different & small -> 1 (freeze some), different & large -> 0."""
    large = size == 0 or size >= LARGE_PER_CLASS
    if similar:
        return max_depth - 1 if large else max_depth
    return 0 if large else 1


def simple_rules(max_depth: int, depths: Sequence[int]) -> dict[str, Callable[[dict], int]]:
    """The rules that need no measurement of the target: each constant depth, the seed's table
    read with the target called similar and called different, and a size-only rule (small ->
    S-1, large -> 1; fixed before the benchmark's results were read). Each maps a cell's axes
    (target, size, seed) to a depth."""

    def size_only(c):
        large = c["size"] == 0 or c["size"] >= LARGE_PER_CLASS
        return 1 if large else max_depth - 1

    rules = {f"constant_{d}": (lambda c, d=d: d) for d in depths}
    rules["seed_table_similar"] = lambda c: seed_table_depth(c["size"], max_depth, True)
    rules["seed_table_different"] = lambda c: seed_table_depth(c["size"], max_depth, False)
    rules["size_only"] = size_only
    return rules


def bootstrap_mean(values: Sequence[float], confidence=0.95, seed=0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (scipy.stats.bootstrap); a constant sample's
    interval is that constant, fewer than two values give nan."""
    from scipy import stats as sps

    x = np.asarray(values, np.float64)
    if len(x) < 2:
        return math.nan, math.nan
    if np.ptp(x) == 0:
        return float(x[0]), float(x[0])
    ci = sps.bootstrap(
        (x,), np.mean, confidence_level=confidence, method="percentile",
        random_state=np.random.default_rng(seed),
    ).confidence_interval  # fmt: skip
    return float(ci.low), float(ci.high)


def cell_regrets(table: dict[tuple, dict[int, dict]], rule: Callable[[dict], int]) -> dict:
    """{cell: (regret in pp, hit)} of `rule` over `cells`' table; a cell where the rule picks a
    depth the study did not run (a subset of depths) is left out."""
    out = {}
    for key, cell in table.items():
        o, d = oracle_depth(cell), rule(dict(zip(CELL, key, strict=True)))
        if d in cell:
            out[key] = (100 * (cell[o]["test_accuracy"] - cell[d]["test_accuracy"]), d == o)
    return out


def regret_table(rows: list[dict], rules: dict[str, Callable[[dict], int]] | None = None):
    """Per rule: mean regret (pp) over cells with its bootstrap interval, hits (regret 0 because
    the rule picked the oracle), and the cells scored. Default rules: `simple_rules`."""
    table = cells(rows)
    if not table:
        return []
    s = int(next(iter(next(iter(table.values())).values()))["max_depth"])
    rules = rules if rules is not None else simple_rules(s, _depths(rows))
    out = []
    for name, rule in rules.items():
        per = cell_regrets(table, rule)
        if not per:
            continue
        regrets = [r for r, _ in per.values()]
        low, high = bootstrap_mean(regrets)
        out.append(
            {
                "rule": name,
                "regret_pp": float(np.mean(regrets)),
                "ci_low": low,
                "ci_high": high,
                "hits": sum(hit for _, hit in per.values()),
                "cells": len(regrets),
            }
        )
    return out


def by_depth(rows: list[dict]) -> list[dict]:
    """Per (target, size, depth incl. scratch): test accuracy over seeds with its t-interval,
    validation accuracy, and the seconds of a run (`cost_s`, see `run_seconds`)."""
    out = []
    for key, group in stats.group_by(rows, [*CONDITION, "depth"]).items():
        ci = stats.t_interval([r["test_accuracy"] for r in group])
        out.append(
            {
                **dict(zip((*CONDITION, "depth"), key, strict=True)),
                "test_mean": ci["mean"],
                "test_ci_low": ci["ci_low"],
                "test_ci_high": ci["ci_high"],
                "val_mean": float(np.mean([r["val_accuracy"] for r in group])),
                "seeds": ci["n"],
                "cost_s": run_seconds(group),
            }
        )
    return out


def run_seconds(group: Sequence[dict]) -> float:
    """Seconds of one training run at this depth, compile, evaluation and the prefix cache's
    build included: the mean wall_s of the seeds that trained one run at the chosen rates (seeds
    after the first, select=first_seed: each draws its own subset, so each builds its own cache);
    else seed 0's grid, cell_wall_s / grid_size (its build amortised over the grid's runs)."""
    single = [float(r["wall_s"]) for r in group if int(r.get("grid_size", 1) or 1) == 1]
    if single:
        return float(np.mean(single))
    return float(np.mean([float(r["cell_wall_s"]) / int(r["grid_size"]) for r in group]))


def against_winner(rows: list[dict], margin: float = 0.01) -> list[dict]:
    """Per (target, size): each depth (and scratch) against the condition's winner (best mean
    validation accuracy over the depths): the paired test-accuracy difference over seeds with its
    t-interval, p (paired t-test), p Holm-adjusted over every comparison of the study, the TOST
    p at `margin`, and a verdict: 'worse', 'better', 'equivalent' (TOST p < 0.05), or 'not
    different' (neither)."""
    from scipy import stats as sps

    out = []
    for key, group in stats.group_by(rows, list(CONDITION)).items():
        per = stats.group_by(group, ["depth"])
        means = {
            v[0]: float(np.mean([r["val_accuracy"] for r in g]))
            for v, g in per.items()
            if v[0] != "scratch"
        }
        if not means:
            continue
        win = max(means, key=lambda d: (means[d], d))
        ref = {r["seed"]: r["test_accuracy"] for r in per[(win,)]}
        for (d,), g in per.items():
            if d == win:
                continue
            diffs = [r["test_accuracy"] - ref[r["seed"]] for r in g if r["seed"] in ref]
            ci = stats.t_interval(diffs)
            p = math.nan
            if len(diffs) > 1 and np.std(diffs) > 0:
                p = float(sps.ttest_1samp(diffs, 0.0).pvalue)
            out.append(
                {
                    **dict(zip(CONDITION, key, strict=True)),
                    "depth": d,
                    "winner": win,
                    "diff": ci["mean"],
                    "ci_low": ci["ci_low"],
                    "ci_high": ci["ci_high"],
                    "p": p,
                    "tost_p": stats.tost(diffs, margin)["p"],
                    "seeds": ci["n"],
                }
            )
    finite = [i for i, r in enumerate(out) if not math.isnan(r["p"])]
    adjusted = stats.holm([out[i]["p"] for i in finite])
    for r in out:
        r["p_holm"] = math.nan
    for i, p in zip(finite, adjusted, strict=True):
        out[i]["p_holm"] = p
    for r in out:
        if r["p_holm"] < 0.05:
            r["verdict"] = "worse" if r["diff"] < 0 else "better"
        elif r["tost_p"] < 0.05:
            r["verdict"] = "equivalent"
        else:
            r["verdict"] = "not different"
    return out


def grid_edges(choices: Sequence[dict]) -> dict:
    """The share of learning-rate choices on an edge of their grid. `choices`: per choice, the
    grid (a list of {key: value} points) and the chosen point; a choice is on the edge when some
    key that varies in its grid sits at that key's smallest or largest value."""
    edge = 0
    for c in choices:
        for k in {k for p in c["grid"] for k in p}:
            values = sorted({p[k] for p in c["grid"] if k in p})
            if len(values) > 1 and c["chosen"].get(k) in (values[0], values[-1]):
                edge += 1
                break
    n = len(choices)
    return {"choices": n, "on_edge": edge, "share": edge / n if n else math.nan}


def grid_choices(rows: list[dict], study_cells: Sequence[dict]) -> list[dict]:
    """The learning-rate choices of a study (the cells that ran a grid of two or more points),
    each with its grid (from the study file's cells) and the point chosen (results.csv's optim.*
    columns of the row whose axes are the cell's). Any study whose cells declare `axes` works."""

    def key(axes: dict) -> tuple:
        return tuple(sorted((k, str(v)) for k, v in axes.items()))

    by_axes = {key(c["axes"]): c for c in study_cells if c.get("axes") is not None}
    names = sorted({k for c in study_cells for k in c.get("axes") or {}})
    out = []
    for r in rows:
        c = by_axes.get(key({k: r.get(k) for k in names}))
        if c is None or len(c.get("grid") or ()) < 2:
            continue
        out.append({"grid": c["grid"], "chosen": {k: r.get(k) for p in c["grid"] for k in p}})
    return out


def _panels(summary: list[dict], path: str, xlabel: str, draw) -> str:
    """A panel per target, `draw(ax, rows, color, label)` once per size in it, saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(r["target"] for r in summary))
    fig, axs = plt.subplots(1, len(targets), figsize=(3.4 * len(targets), 3.0), squeeze=False)
    for ax, t in zip(axs[0], targets, strict=True):
        for i, size in enumerate(dict.fromkeys(r["size"] for r in summary if r["target"] == t)):
            rows = [r for r in summary if r["target"] == t and r["size"] == size]
            draw(ax, rows, f"C{i}", f"{size}/class" if size else "all")
        ax.set_title(t, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_depth(summary: list[dict], path: str) -> str:
    """Test accuracy against freeze depth, a panel per target, a line per size, scratch as a
    dashed line per size; 95% t-intervals over seeds."""

    def draw(ax, rows, color, label):
        pts = sorted((r for r in rows if r["depth"] != "scratch"), key=lambda r: r["depth"])
        xs = [r["depth"] for r in pts]
        ax.plot(xs, [100 * r["test_mean"] for r in pts], "o-", color=color, label=label)
        low = np.clip([100 * r["test_ci_low"] for r in pts], 0, 100)
        high = np.clip([100 * r["test_ci_high"] for r in pts], 0, 100)
        ax.fill_between(xs, low, high, color=color, alpha=0.2)
        for r in rows:
            if r["depth"] == "scratch":
                ax.axhline(100 * r["test_mean"], ls="--", color=color, lw=1)

    return _panels(summary, path, "freeze depth (0: train all)", draw)


def plot_frontier(summary: list[dict], path: str) -> str:
    """Test accuracy against the seconds of a run (`run_seconds`), a point per depth labelled
    with it, a panel per target, a colour per size: the cost-accuracy frontier."""

    def draw(ax, rows, color, label):
        xs, ys = [r["cost_s"] for r in rows], [100 * r["test_mean"] for r in rows]
        ax.plot(xs, ys, "o", color=color, label=label)
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate("s" if r["depth"] == "scratch" else str(r["depth"]), (x, y), fontsize=7)

    return _panels(summary, path, "seconds per run (cache build included)", draw)


def write_depth_report(workdir: str, study_cells: Sequence[dict] = ()) -> list[str]:
    """The depth benchmark's tables (depth_summary, oracle, regret, against_winner CSVs), its two
    plots and depth_report.md, from workdir/results.csv; `study_cells` (the study file's cells)
    for the share of learning-rate choices on a grid edge. Returns the paths written."""
    rows, _ = tables.read_results(workdir)
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    summary = by_depth(rows)
    oracle, regret = oracle_table(rows), regret_table(rows)
    paired = against_winner(rows)
    edges = grid_edges(grid_choices(rows, study_cells))
    written = [
        tables.write_csv(os.path.join(workdir, f"{name}.csv"), table)
        for name, table in (
            ("depth_summary", summary),
            ("oracle", oracle),
            ("regret", regret),
            ("against_winner", paired),
        )
    ]
    written.append(plot_depth(summary, os.path.join(workdir, "plots", "accuracy_vs_depth.png")))
    written.append(plot_frontier(summary, os.path.join(workdir, "plots", "frontier.png")))
    path = os.path.join(workdir, "depth_report.md")
    with open(path, "w") as f:
        f.write(_markdown(rows, summary, paired, regret, oracle, edges))
    written.append(path)
    return written


def _markdown(rows, summary, paired, regret, oracle, edges) -> str:
    """depth_report.md: the tables of `write_depth_report`, each under its heading."""
    lines = [
        "# Freeze-depth benchmark",
        "",
        f"{len(rows)} runs at the chosen rates; {len(cells(rows))} complete cells "
        "(target, size, seed). Percent; intervals 95%.",
        "",
        "## Test accuracy by depth (t-interval over seeds; cost: seconds of one run)",
        "",
        tables.markdown(
            summary,
            [
                *CONDITION,
                "depth",
                "test_mean",
                "test_ci_low",
                "test_ci_high",
                "val_mean",
                "seeds",
                "cost_s",
            ],
            percent=("test_mean", "test_ci_low", "test_ci_high", "val_mean"),
        ),  # fmt: skip
        "",
        "## Each depth against the condition's winner (chosen on validation)",
        "",
        "diff: test accuracy minus the winner's, paired on seeds; p_holm: Holm-adjusted over "
        "the study; tost_p: equivalence within 1 pp.",
        "",
        tables.markdown(
            paired,
            [
                *CONDITION,
                "depth",
                "winner",
                "diff",
                "ci_low",
                "ci_high",
                "p_holm",
                "tost_p",
                "verdict",
            ],
            percent=("diff", "ci_low", "ci_high"),
        ),  # fmt: skip
        "",
        "## Regret of each simple rule (pp; percentile bootstrap over cells)",
        "",
        tables.markdown(regret, ["rule", "regret_pp", "ci_low", "ci_high", "hits", "cells"]),
        "",
        "## Oracle depth per cell (chosen on validation; test_best_depth: chosen on test)",
        "",
        tables.markdown(
            oracle,
            [*CELL, "oracle_depth", "oracle_test", "test_best_depth"],
            percent=("oracle_test",),
        ),  # fmt: skip
        "",
        f"Learning-rate choices on a grid edge: {edges['on_edge']} of {edges['choices']}"
        + (f" ({100 * edges['share']:.0f}%)." if edges["choices"] else "."),
        "",
    ]
    return "\n".join(lines)
