"""A study file's vocabulary: its cells and its report, the helpers study configs build them
with, and the checks a study passes before any training (`tlx.sweep` runs it).

A study file declares `get_sweep(arg) -> list[cell]` beside `get_config`, and its report as
`REPORT` (below). A cell is a dict:

  name       unique; other cells refer to it (needed when one does)
  config     a config spec, 'configs/finetune.py:target=digits,...' (see `tlx.config.load`)
  overrides  dotted config keys -> values, applied after the spec ({'data.image_size': 16})
  init_from  the name of another cell: this cell starts from that cell's chosen run
  grid       candidate overrides [{'optim.lr': 1e-3}, ...]; each is one run, and the run with the
             best validation accuracy (the first of equals) is the cell's result. Default [{}].
  grid_from  the name of another cell whose chosen grid point this cell uses (e.g. the same
             cell at the first seed), instead of a grid of its own
  axes       the cell's coordinates ({'strategy': ..., 'seed': ...}); cells with axes are the
             rows of results.csv, cells without (pre-training runs) go to dependencies.csv

A report (`tlx.report.write_study_report`) is a dict:

  compare        the axis whose values are compared within each condition (paired differences,
                 winners): 'strategy', 'treatment', ...; the conditions are the other axes but
                 the seed. None: summaries only.
  rule_of_thumb  True: each (size, similarity) condition's winner against the strategy the rule
                 of thumb prescribes (`tlx.strategies.rule_of_thumb`); needs those axes
  plots          [{'plot': KIND, OPTION: VALUE, ...}, ...], drawn in this order; the kinds and
                 their options are PLOT_OPTIONS' (what each draws: `tlx.report.plots`). Options:
                 rows, cols (axes of the heatmap's grid), x (an axis), facet (axes: a panel per
                 value), hue (an axis: a line per value; default `compare`), xlabel, references
                 (dependency cells whose test accuracy is drawn as a dashed line)
"""

from __future__ import annotations

CELL_KEYS = ("name", "config", "overrides", "init_from", "grid", "grid_from", "axes")
REPORT_KEYS = ("compare", "rule_of_thumb", "plots")
PLOT_OPTIONS = {
    "winner_heatmap": ("rows", "cols"),  # the winner of each condition on a rows x cols grid
    "accuracy_vs_axis": ("x", "facet", "hue", "xlabel", "references"),
    "accuracy_vs_frozen_stages": ("facet", "hue"),  # strategies tagged 'preset' only
    "accuracy_vs_examples_per_class": ("facet",),  # drawn when the training sets' sizes differ
    "accuracy_vs_trained_fraction": ("facet",),  # with its table, when a 'peft' strategy ran
    "learning_curves": ("facet", "hue"),  # needs DIR/runs/ (each chosen run's metrics.jsonl)
    "depth_benchmark": (),  # tlx.report.depth: needs axes target, size, depth, max_depth, seed
}
REQUIRED = {"winner_heatmap": ("rows", "cols"), "accuracy_vs_axis": ("x",)}


# -- what study files build cells with -------------------------------------------------------------
def parse_study_arg(arg: str | None, defaults: dict, presets: dict[str, dict]) -> dict:
    """'tiny,seeds=2' -> defaults updated by the preset 'tiny', then by seeds=2 (typed as the
    defaults, see `tlx.config.parse_arg`). Bare words name presets; KEY=VALUE sets one arg."""
    from tlx import config as tlx_config

    out = dict(defaults)
    rest = []
    for item in (arg or "").split(","):
        if not item:
            continue
        if "=" in item:
            rest.append(item)
        elif item in presets:
            out.update(presets[item])
        else:
            raise ValueError(f"unknown study preset {item!r}; presets: {sorted(presets)}")
    return tlx_config.parse_arg(",".join(rest), out)


def choose_rates(cell: dict, seed: int, select: str, first_seed_cell: str, grid: list[dict]):
    """The learning-rate choice of a study cell: its own `grid`, or (select='first_seed', seed > 0)
    the point chosen by `first_seed_cell`, the same condition's seed-0 cell."""
    if seed > 0 and select == "first_seed":
        cell["grid_from"] = first_seed_cell
    else:
        cell["grid"] = grid
    return cell


def cell_config(cell: dict):
    """A study cell's config alone (without init_from), unlocked: what a study file's
    `get_config` returns, so `python -m tlx.main --config=configs/STUDY.py` trains it."""
    from tlx import config as tlx_config

    c = tlx_config.load(cell["config"], **cell["overrides"])
    c.unlock()
    return c


def run_overrides(cell: dict, point: dict, init_from: str = "") -> dict:
    """The overrides one run of `cell` trains with: the cell's, then the grid `point`, then
    `init_from` (a path, or 'sweep:HASH' where the hash stands for the path); no progress bar
    and no TensorBoard files (a sweep's runs log to metrics.jsonl)."""
    overrides = {**cell.get("overrides", {}), **point, "progress": False, "tensorboard": False}
    if init_from:
        overrides["init_from"] = init_from
    return overrides


# -- loading and checking a study ------------------------------------------------------------------
def load_module(spec: str):
    """(module, arg) of a study spec 'configs/quadrants.py:tiny'; a syntax error in the file is
    one ValueError naming file:line."""
    from tlx import config as tlx_config

    path, _, arg = spec.partition(":")
    try:
        return tlx_config.load_module(path, "study"), arg or None
    except SyntaxError as e:
        raise ValueError(
            f"{e.filename or path}:{e.lineno}: syntax error in the study file: {e.msg}"
        ) from None


def load_study(spec: str) -> list[dict]:
    """The cells of `spec` ('configs/quadrants.py:tiny'), checked."""
    module, arg = load_module(spec)
    if not hasattr(module, "get_sweep"):
        path = spec.partition(":")[0]
        raise ValueError(f"{path} declares no get_sweep(arg): it is a run config, not a study")
    return check_cells(module.get_sweep(arg), spec)


def load_report(spec: str) -> dict | None:
    """The report the study file `spec` declares (its `REPORT`), checked; None if it has none."""
    module, _ = load_module(spec)
    report = getattr(module, "REPORT", None)
    return None if report is None else check_report(report, spec.partition(":")[0])


def check_cells(cells, spec: str = "the study") -> list[dict]:
    """Cells (dicts, see the module docstring) checked: unique names, known keys, references."""
    cells = [dict(c) for c in cells]
    names = [c["name"] for c in cells if "name" in c]
    if len(names) != len(set(names)):
        raise ValueError(f"cell names repeat in {spec}: {sorted(names)}")
    known = set(names)
    for c in cells:
        unknown = set(c) - set(CELL_KEYS)
        if unknown:
            raise ValueError(f"cell {c.get('name', c.get('axes'))} has unknown keys {unknown}")
        for ref in ("init_from", "grid_from"):
            if c.get(ref) and c[ref] not in known:
                raise ValueError(f"cell {c.get('name')}: {ref}={c[ref]!r} names no cell")
    return cells


def check_configs(cells: list[dict]) -> None:
    """Resolve every cell at every grid point before any training (`tlx.config.load` validates
    each config): a bad value, an unknown strategy or key fails now, naming the cell."""
    from tlx import config as tlx_config

    for c in cells:
        for point in c.get("grid") or [{}]:
            try:
                init_from = "sweep:" + "0" * 12 if c.get("init_from") else ""
                tlx_config.load(c["config"], **run_overrides(c, point, init_from))
            except (ValueError, KeyError, FileNotFoundError) as e:
                msg = e.args[0] if isinstance(e, KeyError) and e.args else e
                raise ValueError(f"cell {c.get('name', c.get('axes'))}: {msg}") from None


def check_report(report: dict, where: str = "the study") -> dict:
    """A report declaration (see the module docstring) checked: known keys, plots of known kinds
    with known options. Returns it with its defaults filled in."""
    unknown = set(report) - set(REPORT_KEYS)
    if unknown:
        raise ValueError(f"{where}: REPORT has unknown keys {sorted(unknown)}; use {REPORT_KEYS}")
    out = {"compare": None, "rule_of_thumb": False, "plots": [], **report}
    for p in out["plots"]:
        kind = p.get("plot")
        if kind not in PLOT_OPTIONS:
            raise ValueError(
                f"{where}: REPORT plot {kind!r} is unknown; plots: {sorted(PLOT_OPTIONS)}"
            )
        extra = set(p) - {"plot", *PLOT_OPTIONS[kind]}
        missing = set(REQUIRED.get(kind, ())) - set(p)
        if extra or missing:
            raise ValueError(
                f"{where}: REPORT plot {kind!r}: "
                + (f"no option(s) {sorted(extra)}; " if extra else "")
                + (f"give {sorted(missing)}; " if missing else "")
                + f"its options: {list(PLOT_OPTIONS[kind])}"
            )
    if out["rule_of_thumb"] and out["compare"] != "strategy":
        raise ValueError(
            f"{where}: REPORT rule_of_thumb compares strategies: set compare='strategy'"
        )
    return out
