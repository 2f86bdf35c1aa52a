"""A study's report as its file declares it (`tlx.study`: REPORT's compare, rule_of_thumb and
plots): the tables, then each declared plot in order, then report.md, into the sweep directory.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from tlx import study as tlx_study
from tlx.report import plots, stats, tables

# The report of a study that declares none (a notebook's cells, say): summaries, the strategies
# compared where the cells have that axis, and the learning curves.
DEFAULT_PLOTS = [{"plot": "learning_curves"}]


@dataclasses.dataclass
class Context:
    """What every plot of one report sees; `fractions` is set by the trained-fraction plot (its
    table goes into report.md too)."""

    workdir: str
    rows: list[dict]
    axes: list[str]
    compare: str | None
    summary: list[dict]
    win: list[dict]
    fractions: list[dict] = dataclasses.field(default_factory=list)
    spec: str | None = None  # the study file's spec, when the report was given one

    @property
    def conditions(self) -> list[str]:
        return [a for a in self.axes if a not in (self.compare, stats.SEED)]

    def plot_path(self, name: str) -> str:
        return os.path.join(self.workdir, "plots", name + ".png")


def write_study_report(workdir: str, study: str | dict | None = None) -> list[str]:
    """The tables and the plots of the study whose sweep directory is `workdir`, from its
    results.csv (and dependencies.csv, and runs/ for the learning curves); returns the paths
    written. `study`: its study file spec ('configs/quadrants.py'), whose REPORT says what to
    draw, or a REPORT dict itself; None: the default report (summaries, learning curves)."""
    rows, axes = tables.read_results(workdir)
    declared = _declaration(study, axes)
    compare = declared["compare"]
    missing = {compare, "size", "similarity"} if declared["rule_of_thumb"] else {compare}
    missing = sorted(a for a in missing - set(axes) if a)
    if missing:
        raise ValueError(
            f"{workdir}/results.csv has no axis {missing}, which the study's REPORT uses"
        )
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    summary = stats.summarize(rows, axes)
    written = [tables.write_csv(os.path.join(workdir, "summary.csv"), summary)]
    paired = stats.paired_differences(rows, axes, compare) if compare else []
    win = stats.winners(rows, axes, compare) if compare else []
    if compare:
        written.append(tables.write_csv(os.path.join(workdir, "paired.csv"), paired))
        written.append(tables.write_csv(os.path.join(workdir, "winners.csv"), win))
    rule_rows = stats.against_rule_of_thumb(rows, axes, win) if declared["rule_of_thumb"] else []
    if rule_rows:  # the file name the committed reports have
        written.append(tables.write_csv(os.path.join(workdir, "seed_table.csv"), rule_rows))
    ctx = Context(workdir, rows, axes, compare, summary, win)
    ctx.spec = study if isinstance(study, str) else None
    for options in declared["plots"]:
        options = dict(options)
        written += PLOTS[options.pop("plot")](ctx, **options)
    written.append(
        tables.write_markdown(
            workdir, summary, paired, win, axes, compare, rule_rows, ctx.fractions
        )
    )
    return written


def _declaration(study, axes: list[str]) -> dict:
    """The checked REPORT of `study` (a spec or a dict), or the default one."""
    if isinstance(study, str):
        study = tlx_study.load_report(study)  # None when the file declares no REPORT
    if study is None:
        compare = "strategy" if "strategy" in axes else None
        return {"compare": compare, "rule_of_thumb": False, "plots": DEFAULT_PLOTS}
    return tlx_study.check_report(study)


# -- the plots a REPORT may declare (tlx.study.PLOT_OPTIONS), each returning the paths written ----
def winner_heatmap(ctx: Context, rows: str, cols: str) -> list[str]:
    if not ctx.win:
        return []
    return [plots.plot_heatmap(ctx.win, ctx.plot_path("winner_heatmap"), rows, cols)]


def accuracy_vs_axis(ctx: Context, x, facet=(), hue=None, xlabel="", references=()) -> list[str]:
    """Test accuracy against the axis `x` (e.g. the cut layer of Yosinski et al. 2014), with the
    test accuracy of the dependency cells named in `references` as dashed lines."""
    refs = {k: v for k, v in tables.dependency_references(ctx.workdir).items() if k in references}
    path = ctx.plot_path(f"accuracy_vs_{x}")
    hue = hue or ctx.compare
    return [plots.plot_lines(ctx.summary, x, hue, list(facet), path, xlabel, references=refs)]


def accuracy_vs_frozen_stages(ctx: Context, facet=(), hue=None) -> list[str]:
    """The strategies tagged 'preset' (a fixed number of frozen stages) against that number. Adds
    the column frozen_stages (the mean over seeds) to their summary rows: later plots' CSVs
    show it."""
    presets = [r for r in ctx.summary if "preset" in stats.tags_of(r[ctx.compare])]
    if not presets or "frozen_stages_mean" not in presets[0]:
        return []
    for r in presets:
        r["frozen_stages"] = r["frozen_stages_mean"]
    path = ctx.plot_path("accuracy_vs_frozen_stages")
    label = "frozen stages (stem + stage1..n)"
    return [
        plots.plot_lines(presets, "frozen_stages", hue or ctx.compare, list(facet), path, label)
    ]


def accuracy_vs_examples_per_class(ctx: Context, facet=()) -> list[str]:
    """Drawn when the cells' training sets differ in size; adds the column per_class (the mean
    training examples over the mean number of classes) to the summary rows."""
    summary = ctx.summary
    if (
        "train_examples_mean" not in summary[0]
        or len({r.get("train_examples") for r in ctx.rows}) < 2
    ):
        return []
    for r in summary:
        r["per_class"] = r["train_examples_mean"] / r["num_classes_mean"]
    path = ctx.plot_path("accuracy_vs_examples_per_class")
    label = "training examples per class"
    return [
        plots.plot_lines(summary, "per_class", ctx.compare, list(facet), path, label, logx=True)
    ]


def accuracy_vs_trained_fraction(ctx: Context, facet=()) -> list[str]:
    """Drawn (with trained_fraction.csv and its table in report.md) when a compared value is a
    strategy tagged 'peft' and the rows have parameter counts."""
    if not any(stats.is_peft(r[ctx.compare]) for r in ctx.rows):
        return []
    ctx.fractions = stats.trained_fractions(ctx.rows, ctx.axes)
    if not ctx.fractions:
        return []
    path = ctx.plot_path("accuracy_vs_trained_fraction")
    return [
        tables.write_csv(os.path.join(ctx.workdir, "trained_fraction.csv"), ctx.fractions),
        plots.plot_against_fraction(ctx.fractions, ctx.compare, list(facet), path),
    ]


def learning_curves(ctx: Context, facet=None, hue=None) -> list[str]:
    """Training loss against step, from DIR/runs/ (a directory with results.csv alone, such as
    the committed experiments/results/*, has none: said, and skipped)."""
    if not os.path.isdir(os.path.join(ctx.workdir, "runs")):
        print(f"[report] {ctx.workdir}/runs/ not here: no learning curves", file=sys.stderr)
        return []
    curves = tables.learning_curves(ctx.workdir, ctx.rows, ctx.axes)
    if not curves:
        return []
    facet = ctx.conditions if facet is None else list(facet)
    hue = hue or ctx.compare or ctx.conditions[0]
    return [plots.plot_learning_curves(curves, hue, facet, ctx.plot_path("learning_curves"))]


def depth_benchmark(ctx: Context) -> list[str]:
    """The freeze-depth benchmark's tables, plots and depth_report.md (`tlx.report.depth`); the
    study file's cells, when known, give the share of learning-rate choices on a grid edge."""
    from tlx.report import depth

    cells = tlx_study.load_study(ctx.spec) if ctx.spec else []
    return depth.write_depth_report(ctx.workdir, cells)


PLOTS = {
    "winner_heatmap": winner_heatmap,
    "accuracy_vs_axis": accuracy_vs_axis,
    "accuracy_vs_frozen_stages": accuracy_vs_frozen_stages,
    "accuracy_vs_examples_per_class": accuracy_vs_examples_per_class,
    "accuracy_vs_trained_fraction": accuracy_vs_trained_fraction,
    "learning_curves": learning_curves,
    "depth_benchmark": depth_benchmark,
}
