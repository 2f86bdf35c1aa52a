"""What a sweep says: per-cell statistics over seeds, paired differences between strategies, the
winner of each condition, and the plots, from DIR/results.csv (written by `tlx.sweep`).

  python -m tlx.report DIR        # DIR/summary.csv, paired.csv, winners.csv, report.md, plots/

results.csv lists each cell's axes first (up to the column `test_accuracy`), then its figures.
Intervals are two-sided 95% t-intervals over seeds: mean +- t(0.975, n-1) * std / sqrt(n), std
with n-1 degrees of freedom. Two strategies are compared on the seeds both have (paired), and
called "not different" when the interval of the mean difference contains zero.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from tlx.strategies import presets

FIRST_FIGURE = "test_accuracy"
SEED = "seed"
# Strategies whose frozen part is a fixed number of stages (the x axis of the frozen-stage plot).
FREEZE_PRESETS = ("none", "freeze_early", "freeze_most", "linear_probe", "freeze_stages")
BASELINES = ("scratch",)  # reported, but not candidates for a condition's winner
# Parameter-efficient strategies (a study may name variants such as vpt_deep): a study with one
# of them also gets test accuracy against the trained share of the parameters.
PEFT = ("lora", "bitfit", "adapter", "vpt")
TEXT = ("run", "cell")  # never numbers: a run hash such as '1234e5678901' would parse as inf
# The seed's rule (DESIGN.md), defined once in tlx.strategies.presets: the strategy it
# prescribes for each (size, similarity) quadrant.
SEED_TABLE = presets.SEED_TABLE
MEANS_OF = (
    "train_accuracy",
    "val_accuracy",
    "frozen_stages",
    "train_examples",
    "num_classes",
    "wall_s",  # seconds of the chosen run (compile + train + eval), not of its LR grid
)


# -- reading ---------------------------------------------------------------------------------------
def read_results(path: str) -> tuple[list[dict], list[str]]:
    """(rows, axes) of a results.csv (or a sweep DIR): numbers parsed, axes in column order."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = [{k: v if k in TEXT else _parse(v) for k, v in r.items()} for r in reader]
    axes = columns[: columns.index(FIRST_FIGURE)] if FIRST_FIGURE in columns else columns
    return rows, axes


def _parse(value: str):
    if value is None or value == "":
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


# -- statistics ------------------------------------------------------------------------------------
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
    rows: list[dict], axes: Sequence[str], between: str, metric: str = FIRST_FIGURE
) -> list[dict]:
    """Per condition: the value of `between` with the best mean (baselines such as scratch not
    competing), the runner-up, the margin between their means and its paired interval."""
    keys = [k for k in axes if k not in (between, SEED)]
    summary = summarize(rows, axes, metric)
    out = []
    for key, group in group_by(summary, keys).items():
        baseline = {r[between]: r["mean"] for r in group if r[between] in BASELINES}
        ranked = sorted((r for r in group if r[between] not in BASELINES), key=lambda r: -r["mean"])
        if not ranked:
            continue
        row = dict(zip(keys, key, strict=True))
        best = ranked[0]
        row.update({"winner": best[between], "winner_mean": best["mean"]})
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


def against_seed_table(
    rows: list[dict], axes: Sequence[str], win: list[dict] | None = None, metric=FIRST_FIGURE
) -> list[dict]:
    """Per (size, similarity) quadrant: the seed's prescribed strategy beside the measured winner,
    and the paired interval of winner - prescribed over seeds. Verdict: 'agrees' (the prescribed
    strategy won), 'ties' (it lost, but the interval contains zero) or 'disagrees'. Empty unless
    the study has the quadrant axes and the prescribed strategies."""
    if not {"size", "similarity", "strategy"} <= set(axes):
        return []
    out = []
    for w in win if win is not None else winners(rows, axes, "strategy", metric):
        seed_pick = SEED_TABLE.get((w["size"], w["similarity"]))
        cond = [r for r in rows if all(r[k] == w[k] for k in w if k in axes)]
        if seed_pick is None or not any(r["strategy"] == seed_pick for r in cond):
            continue
        keys = [k for k in axes if k not in ("strategy", SEED)]
        row = {k: w[k] for k in keys}
        pick_mean = summarize([r for r in cond if r["strategy"] == seed_pick], axes, metric)[0]
        row.update(
            {
                "seed_table": seed_pick,
                "seed_table_mean": pick_mean["mean"],
                "winner": w["winner"],
                "winner_mean": w["winner_mean"],
            }
        )
        if w["winner"] == seed_pick:
            row.update({"gap": 0.0, "gap_ci_low": 0.0, "gap_ci_high": 0.0, "verdict": "agrees"})
        else:
            ci = oriented_difference(cond, axes, "strategy", w["winner"], seed_pick, metric)
            said = verdict(ci, w["winner"], seed_pick)
            row.update(
                {
                    "gap": ci["mean"],
                    "gap_ci_low": ci["ci_low"],
                    "gap_ci_high": ci["ci_high"],
                    "verdict": {"not different": "ties", "too few seeds": said}.get(
                        said, "disagrees"
                    ),
                }
            )
        out.append(row)
    return out


def is_peft(strategy) -> bool:
    """'lora', 'vpt_deep', ...: a parameter-efficient strategy or a variant of one."""
    return str(strategy).split("_")[0] in PEFT


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


def fraction_table(fractions: list[dict], between: str) -> list[dict]:
    """One row per value of `between` (a strategy): its trained parameters and their share (%),
    then 'mean ± half-width' of test accuracy (%) per condition (the other axes, joined by '/')."""
    out: dict = {}
    for r in fractions:
        row = out.setdefault(r[between], {between: r[between], "counts": [], "shares": []})
        row["counts"].append(round(r["params_trainable"]))
        row["shares"].append(100 * r["trained_fraction"])
        condition = "/".join(str(v) for k, v in r.items() if k not in (between, *_FRACTION_FIELDS))
        half = (r["ci_high"] - r["ci_low"]) / 2
        spread = "" if math.isnan(half) else f" ± {100 * half:.1f}"
        row[condition] = f"{100 * r['mean']:.1f}{spread}"
    table = []
    for row in out.values():
        counts, shares = row.pop("counts"), row.pop("shares")
        table.append(
            {
                between: row.pop(between),
                "params_trainable": _span(counts, str),
                "trained_%": _span(shares, lambda x: f"{x:.3g}"),
                **row,
            }
        )
    return table


def _span(values: list, fmt) -> str:
    """'5' or '5-7': the range of values that may differ between conditions (e.g. head sizes)."""
    lo, hi = min(values), max(values)
    return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"


# Fields of a trained_fractions row that are not the cell's axes.
_FRACTION_FIELDS = (
    "params_trainable",
    "params_frozen",
    "trained_fraction",
    "n",
    "mean",
    "std",
    "ci_low",
    "ci_high",
)


# -- tables ----------------------------------------------------------------------------------------
def write_csv(path: str, rows: list[dict]) -> str:
    columns = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows({k: _fmt(v) for k, v in r.items()} for r in rows)
    return path


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def markdown(rows: list[dict], columns: Sequence[str] | None = None, percent=()) -> str:
    """A markdown table; columns in `percent` are printed as percentages with one decimal."""
    columns = list(columns or (rows[0] if rows else []))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            if c in percent and isinstance(v, int | float):
                cells.append("" if math.isnan(v) else f"{100 * v:.1f}")
            elif isinstance(v, float):
                cells.append(f"{v:.3g}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pivot(
    summary: list[dict], axes: Sequence[str], between: str, field: str = "mean"
) -> list[dict]:
    """One row per condition, one column per value of `between`: 'mean +- half-width' of the 95%
    interval in percent (field='mean'), or the value of another summary field (e.g. wall_s_mean)."""
    keys = [a for a in axes if a not in (between, SEED)]
    out = []
    for key, group in group_by(summary, keys).items():
        row = dict(zip(keys, key, strict=True))
        for r in group:
            if field == "mean":
                half = (r["ci_high"] - r["ci_low"]) / 2
                spread = "" if math.isnan(half) else f" ± {100 * half:.1f}"
                row[r[between]] = f"{100 * r['mean']:.1f}{spread}"
            elif field in r:
                row[r[between]] = f"{r[field]:.3g}"
        out.append(row)
    return out


def between_axis(axes: Sequence[str]) -> str | None:
    """What a study compares: its 'strategy' axis, else its 'treatment' axis."""
    return next((a for a in ("strategy", "treatment") if a in axes), None)


# -- plots -----------------------------------------------------------------------------------------
def _figure(ncols: int = 1, nrows: int = 1, size=(4.2, 3.2)):
    # The object API with the Agg canvas: no pyplot state, works in any backend or thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axs = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axs.ravel()


def plot_heatmap(win: list[dict], path: str, rows_axis="size", cols_axis="similarity") -> str:
    """The size x similarity grid: each square names the winning strategy, its mean accuracy and
    its margin over the runner-up (n.s.: the paired interval contains zero). PNG + CSV."""
    row_values = _ordered(v[rows_axis] for v in win)
    col_values = _ordered(v[cols_axis] for v in win)
    margin = np.full((len(row_values), len(col_values)), np.nan)
    fig, (ax,) = _figure(size=(5.0, 3.8))
    for w in win:
        i, j = row_values.index(w[rows_axis]), col_values.index(w[cols_axis])
        margin[i, j] = 100 * w.get("margin", np.nan)
    image = ax.imshow(margin, cmap="viridis", vmin=0)
    fig.colorbar(image, ax=ax, label="margin over runner-up (pp)")
    for w in win:
        i, j = row_values.index(w[rows_axis]), col_values.index(w[cols_axis])
        note = "" if w.get("verdict") != "not different" else " (n.s.)"
        text = f"{w['winner']}\n{100 * w['winner_mean']:.1f}%\n+{100 * w.get('margin', 0):.1f}pp"
        ax.text(j, i, text + note, ha="center", va="center", color="w", fontsize=8,
                bbox={"facecolor": "black", "alpha": 0.35, "linewidth": 0})  # fmt: skip
    ax.set_xticks(range(len(col_values)), col_values)
    ax.set_yticks(range(len(row_values)), row_values)
    ax.set_xlabel(cols_axis)
    ax.set_ylabel(f"target {rows_axis}")
    ax.set_title("winning strategy (test accuracy)")
    fig.savefig(path, dpi=120)
    write_csv(path[:-4] + ".csv", win)
    return path


def plot_lines(
    summary: list[dict],
    x: str,
    hue: str,
    facet: Sequence[str],
    path: str,
    xlabel: str = "",
    references: dict | None = None,
    logx: bool = False,
) -> str:
    """Mean test accuracy with its 95% interval against `x`, a line per `hue` value, a panel per
    `facet` value; `references` ({label: accuracy}) are drawn as dashed lines. PNG + CSV."""
    panels = group_by(summary, facet)
    fig, axs = _figure(ncols=len(panels))
    used = []
    for ax, (key, group) in zip(axs, panels.items(), strict=True):
        for value, line in group_by(group, [hue]).items():
            line = sorted(line, key=lambda r: r[x])
            xs = [r[x] for r in line]
            mean = np.array([100 * r["mean"] for r in line])
            # accuracy lives in [0, 100]; an interval over 2 seeds can reach far outside it
            low = np.clip([100 * r["ci_low"] for r in line], 0, 100)
            high = np.clip([100 * r["ci_high"] for r in line], 0, 100)
            ax.plot(xs, mean, "o-", label=str(value[0]))
            ax.fill_between(xs, low, high, alpha=0.2)
            used += [{**dict(zip(facet, key, strict=True)), **r} for r in line]
        for label, value in (references or {}).items():
            ax.axhline(100 * value, ls="--", color="gray", lw=1)
            ax.annotate(label, (0.02, 100 * value), xycoords=("axes fraction", "data"), fontsize=7)
        if logx:
            ax.set_xscale("log")
        elif all(float(r[x]).is_integer() for r in group):  # e.g. frozen stages (a mean)
            ax.set_xticks(sorted({r[x] for r in group}))
        ax.set_title(" ".join(str(k) for k in key), fontsize=9)
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axs[-1].legend(fontsize=7, title=hue)
    fig.savefig(path, dpi=120)
    write_csv(path[:-4] + ".csv", used)
    return path


def plot_against_fraction(
    fractions: list[dict], between: str, facet: Sequence[str], path: str
) -> str:
    """Mean test accuracy (95% interval as error bars) against the trained share of the
    parameters (log scale), a point per `between` value, a panel per `facet` value. PNG + CSV."""
    panels = group_by(fractions, facet) if facet else {(): fractions}
    fig, axs = _figure(ncols=len(panels))
    for ax, (key, group) in zip(axs, panels.items(), strict=True):
        for r in group:
            x, y = 100 * r["trained_fraction"], 100 * r["mean"]
            half = 0.0 if math.isnan(r["ci_high"]) else 100 * (r["ci_high"] - r["ci_low"]) / 2
            marker = "o" if is_peft(r[between]) else "s"
            ax.errorbar([x], [y], yerr=[half], fmt=marker, capsize=2, label=str(r[between]))
            ax.annotate(str(r[between]), (x, y), xytext=(3, 3), textcoords="offset points",
                        fontsize=6)  # fmt: skip
        ax.set_xscale("log")
        ax.set_title(" ".join(str(k) for k in key), fontsize=9)
        ax.set_xlabel("trained parameters (% of the model's)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axs[-1].legend(fontsize=6, title=between)
    fig.savefig(path, dpi=120)
    write_csv(path[:-4] + ".csv", fractions)
    return path


def learning_curves(workdir: str, rows: list[dict], axes: Sequence[str]) -> list[dict]:
    """Training loss and accuracy against step of each cell's chosen run, averaged over seeds:
    one row per (condition, step). A step logged twice (a resumed run) counts once, the last."""
    keys = [a for a in axes if a != SEED]
    out = []
    for key, group in group_by(rows, keys).items():
        by_step: dict[int, list[dict]] = {}
        for r in group:
            records = {}
            path = os.path.join(workdir, "runs", str(r["run"]), "metrics.jsonl")
            with open(path) as f:
                for number, line in enumerate(f, 1):
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a kill: skipped, and said so
                        print(f"[report] {path}:{number}: not JSON, skipped", file=sys.stderr)
                        continue
                    if "split" not in rec and "loss" in rec:
                        records[rec["step"]] = rec
            for step, rec in records.items():
                by_step.setdefault(step, []).append(rec)
        for step in sorted(by_step):
            recs = by_step[step]
            out.append(
                {
                    **dict(zip(keys, key, strict=True)),
                    "step": step,
                    "seeds": len(recs),
                    "loss": float(np.mean([r["loss"] for r in recs])),
                    "train_batch_accuracy": float(np.mean([r["accuracy"] for r in recs])),
                }
            )
    return out


def plot_learning_curves(curves: list[dict], hue: str, facet: Sequence[str], path: str) -> str:
    panels = group_by(curves, facet) if facet else {(): curves}
    fig, axs = _figure(ncols=len(panels))
    for ax, (key, group) in zip(axs, panels.items(), strict=True):
        for value, line in group_by(group, [hue]).items():
            ax.plot([r["step"] for r in line], [r["loss"] for r in line], label=str(value[0]))
        ax.set_yscale("log")
        ax.set_title(" ".join(str(k) for k in key), fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over seeds)")
        ax.grid(alpha=0.3)
    axs[-1].legend(fontsize=7, title=hue)
    fig.savefig(path, dpi=120)
    write_csv(path[:-4] + ".csv", curves)
    return path


def _ordered(values) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


# -- the report ------------------------------------------------------------------------------------
def write_report(workdir: str) -> list[str]:
    """Tables and the plots the study's axes allow, into `workdir`; returns the paths written."""
    rows, axes = read_results(workdir)
    between = between_axis(axes)
    plots = os.path.join(workdir, "plots")
    os.makedirs(plots, exist_ok=True)
    summary = summarize(rows, axes)
    written = [write_csv(os.path.join(workdir, "summary.csv"), summary)]
    paired = paired_differences(rows, axes, between) if between else []
    win = winners(rows, axes, between) if between else []
    if between:
        written.append(write_csv(os.path.join(workdir, "paired.csv"), paired))
        written.append(write_csv(os.path.join(workdir, "winners.csv"), win))
    seed_rows = against_seed_table(rows, axes, win) if between == "strategy" else []
    if seed_rows:
        written.append(write_csv(os.path.join(workdir, "seed_table.csv"), seed_rows))
    conditions = [a for a in axes if a not in (between, SEED)]

    if {"similarity", "size"} <= set(axes) and win:
        written.append(plot_heatmap(win, os.path.join(plots, "winner_heatmap.png")))
    if "cut" in axes and between:  # transfer by cut layer (Yosinski et al. 2014)
        facet = [a for a in conditions if a != "cut"]
        written.append(
            plot_lines(
                summary,
                "cut",
                between,
                facet,
                os.path.join(plots, "accuracy_vs_cut.png"),
                "stages copied from the base net (n)",
                # the base net trained on the target half (Yosinski's baseB)
                references={
                    k: v for k, v in _dependency_references(workdir).items() if k == "baseB"
                },
            )
        )
    elif between == "strategy":
        presets = [r for r in summary if r["strategy"] in FREEZE_PRESETS]
        if presets and "frozen_stages_mean" in presets[0]:
            for r in presets:
                r["frozen_stages"] = r["frozen_stages_mean"]
            facet = [a for a in ("target", "similarity") if a in conditions]
            hue = next((a for a in ("size", "examples_per_class") if a in conditions), between)
            written.append(
                plot_lines(
                    presets,
                    "frozen_stages",
                    hue,
                    facet,
                    os.path.join(plots, "accuracy_vs_frozen_stages.png"),
                    "frozen stages (stem + stage1..n)",
                )
            )
        if "train_examples_mean" in summary[0] and len({r.get("train_examples") for r in rows}) > 1:
            for r in summary:
                r["per_class"] = r["train_examples_mean"] / r["num_classes_mean"]
            facet = [a for a in ("target", "similarity") if a in conditions]
            written.append(
                plot_lines(
                    summary,
                    "per_class",
                    "strategy",
                    facet,
                    os.path.join(plots, "accuracy_vs_examples_per_class.png"),
                    "training examples per class",
                    logx=True,
                )
            )
    fractions = []
    if between == "strategy" and any(is_peft(r["strategy"]) for r in rows):
        fractions = trained_fractions(rows, axes)
    if fractions:
        written.append(write_csv(os.path.join(workdir, "trained_fraction.csv"), fractions))
        written.append(
            plot_against_fraction(
                fractions,
                between,
                [a for a in ("similarity", "size") if a in conditions] or conditions,
                os.path.join(plots, "accuracy_vs_trained_fraction.png"),
            )
        )
    curves = learning_curves(workdir, rows, axes)
    if curves:
        facet = [a for a in conditions if a not in ("examples_per_class", "similarity")]
        written.append(
            plot_learning_curves(
                curves, between or conditions[0], facet, os.path.join(plots, "learning_curves.png")
            )
        )
    written.append(
        _write_markdown(workdir, summary, paired, win, axes, between, seed_rows, fractions)
    )
    return written


def _dependency_references(workdir: str) -> dict:
    """Test accuracy of the study's dependency runs (base nets) by cell name."""
    path = os.path.join(workdir, "dependencies.csv")
    if not os.path.exists(path):
        return {}
    deps, _ = read_results(path)
    return {d["cell"]: d["test_accuracy"] for d in deps if d.get("cell")}


def _write_markdown(workdir, summary, paired, win, axes, between, seed_rows=(), fractions=()):
    keys = [a for a in axes if a != SEED]
    parts = [
        "## Test accuracy (%): mean, std and 95% t-interval over seeds",
        markdown(
            summary,
            [*keys, "n", "mean", "std", "ci_low", "ci_high", "train_accuracy_mean"],
            percent=("mean", "std", "ci_low", "ci_high", "train_accuracy_mean"),
        ),
    ]
    if between:
        parts += [
            f"## Test accuracy (%) by {between}: mean ± half-width of the 95% interval",
            markdown(pivot(summary, axes, between)),
        ]
        if "wall_s_mean" in summary[0]:
            parts += [
                f"## Seconds per run by {between} (mean of the chosen runs; 2-core CPU here)",
                markdown(pivot(summary, axes, between, "wall_s_mean")),
            ]
    if fractions:
        parts += [
            f"## Test accuracy (%) against the trained share of the parameters, by {between} "
            "(trained = everything that trains, head included; share = trained / all)",
            markdown(fraction_table(fractions, between)),
        ]
    if win:
        cols = [c for c in win[0] if c not in ("winner_mean",)]
        parts += [
            "## Winner per condition (margin over the runner-up, paired over seeds)",
            markdown(
                win,
                cols,
                percent=("margin", "margin_ci_low", "margin_ci_high", "scratch_mean"),
            ),
        ]
    if seed_rows:
        parts += [
            "## The seed's table against the measurement (gap = winner - prescribed, paired, pp)",
            markdown(
                seed_rows,
                list(seed_rows[0]),
                percent=("seed_table_mean", "winner_mean", "gap", "gap_ci_low", "gap_ci_high"),
            ),
        ]
    if paired:
        cols = [c for c in paired[0] if c != "std_diff"]
        parts += [
            f"## Paired differences between {between} values (a - b, pp)",
            markdown(paired, cols, percent=("mean_diff", "ci_low", "ci_high")),
        ]
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n\n".join(parts) + "\n")
    return path


if __name__ == "__main__":
    for p in write_report(sys.argv[1] if len(sys.argv) > 1 else "."):
        print(p)
