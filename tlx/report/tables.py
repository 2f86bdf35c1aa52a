"""A study's tables: results.csv read back, tables written as CSV and markdown (report.md), and
the learning curves read from each chosen run's metrics.jsonl.

results.csv lists each cell's axes first (up to the column `test_accuracy`), then its figures.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from tlx.report.stats import FIRST_FIGURE, SEED, group_by

TEXT = ("run", "cell")  # never numbers: a run hash such as '1234e5678901' would parse as inf


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


def dependency_references(workdir: str) -> dict:
    """Test accuracy of the study's dependency runs (base nets) by cell name."""
    path = os.path.join(workdir, "dependencies.csv")
    if not os.path.exists(path):
        return {}
    deps, _ = read_results(path)
    return {d["cell"]: d["test_accuracy"] for d in deps if d.get("cell")}


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
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
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


def write_markdown(workdir, summary, paired, win, axes, between, rule_rows=(), fractions=()):
    """DIR/report.md: the summary, the pivots by `between`, the trained share, the winners, the
    rule of thumb against the measurement and the paired differences, each where it exists."""
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
    if rule_rows:  # the heading the committed reports have
        parts += [
            "## The seed's table against the measurement (gap = winner - prescribed, paired, pp)",
            markdown(
                rule_rows,
                list(rule_rows[0]),
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
