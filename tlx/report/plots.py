"""A study's plots, each a PNG with the CSV of what it shows beside it: the winner of each
condition on a grid, test accuracy (95% interval) against an axis, against the trained share of
the parameters, and training loss against step. matplotlib's object API with the Agg canvas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tlx.report.stats import group_by, is_peft
from tlx.report.tables import write_csv


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
        _label(ax, key, xlabel or x, "test accuracy (%)")
    return _save(fig, axs, path, used, hue)


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
        _label(ax, key, "trained parameters (% of the model's)", "test accuracy (%)")
    return _save(fig, axs, path, fractions, between, fontsize=6)


def plot_learning_curves(curves: list[dict], hue: str, facet: Sequence[str], path: str) -> str:
    panels = group_by(curves, facet) if facet else {(): curves}
    fig, axs = _figure(ncols=len(panels))
    for ax, (key, group) in zip(axs, panels.items(), strict=True):
        for value, line in group_by(group, [hue]).items():
            ax.plot([r["step"] for r in line], [r["loss"] for r in line], label=str(value[0]))
        ax.set_yscale("log")
        _label(ax, key, "step", "training loss (mean over seeds)")
    return _save(fig, axs, path, curves, hue)


def _label(ax, key: tuple, xlabel: str, ylabel: str) -> None:
    """A panel's title (its facet values), axis labels and grid."""
    ax.set_title(" ".join(str(k) for k in key), fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _save(fig, axs, path: str, rows: list[dict], legend: str, fontsize: int = 7) -> str:
    """The legend on the last panel, then the PNG at `path` and the CSV of `rows` beside it."""
    axs[-1].legend(fontsize=fontsize, title=legend)
    fig.savefig(path, dpi=120)
    write_csv(path[:-4] + ".csv", rows)
    return path


def _ordered(values) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out
