"""Run a study: its cells, each with learning rates chosen on the validation split, into
DIR/results.csv, then the report (tables and plots) of `tlx.report`.

  python -m tlx.sweep --config=configs/quadrants.py[:ARGS] --workdir=DIR [--parallel=N]
      [--launcher=ray --ray_address=HEAD:6379 --ray_gpus_per_run=1]

A study file (`tlx.study`: its cells, their schema and checks) declares `get_sweep(arg)` and
its `REPORT` beside `get_config`.

Every run lives in DIR/runs/HASH, HASH being that of its resolved config (with `init_from` named
by the hash of the run it starts from, so the hash doesn't depend on where DIR is). A run with a
summary.json is finished and is read, not trained, unless its data changed since (`stale`): then
it is trained again and the old run kept in HASH/stale/; an interrupted one resumes from its
checkpoint (`tlx.train.run` does that); runs of different configs never share a directory.
Cells run in dependency order, one at a time in this process, N at a time in worker processes, or
as tasks on a Ray cluster (`tlx.launchers`). Several sweeps on one directory (a SLURM job array,
say: each task runs the same command) share its runs through the per-run lock: each run is
trained once.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time

from tlx import launchers, rundir, user_modules
from tlx.study import check_cells, check_configs, load_study

# Per-cell columns of results.csv after the axes (then the chosen grid values, then timing).
FIGURES = (
    "test_accuracy",
    "val_accuracy",
    "train_accuracy",
    "test_loss",
    "params_trainable",
    "params_frozen",
    "frozen_stages",
    "train_examples",
    "num_classes",
    "steps",
)
TIMING = ("wall_s", "cell_wall_s")  # differ between identical sweeps; the rest must not
ALWAYS_SHOWN = ("optim.lr", "optim.head_lr")  # in results.csv whether a grid varies them or not


# -- runs ------------------------------------------------------------------------------------------
def resolve(cell: dict, point: dict, init_run: str | None):
    """The config of `cell` at grid `point`, starting from run `init_run` (a hash): (config,
    hash). The hash sees `init_from` as 'sweep:HASH'; the config holds no path yet."""
    from tlx import config as tlx_config

    overrides = {**cell.get("overrides", {}), **point, "progress": False, "tensorboard": False}
    if init_run:
        overrides["init_from"] = f"sweep:{init_run}"
    config = tlx_config.load(cell["config"], **overrides)
    return config, config_hash(config)


def config_hash(config) -> str:
    """The hash of a resolved config (a ConfigDict, or a dict such as a run's config.json), over
    its JSON form (tuples as lists), without the keys that don't change what a run computes
    (`rundir.comparable`: rundir.IGNORE, and fields added since runs existed, at their default)."""
    tree = config if isinstance(config, dict) else json.loads(config.to_json_best_effort())
    tree = rundir.comparable(tree)  # a JSON round trip of its own
    text = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def migrate_runs(runs_dir: str, log=print) -> dict[str, str]:
    """Run directories written under an older config layout (`tlx.config.migrate`), renamed to the
    hash their config has today, so the sweep reads them instead of training them again:
    {old hash: new hash}. Parents (runs that others start from) go first, since a child's hash
    names its parent's. The old config.json is kept as config.v1.json."""
    from tlx import config as tlx_config

    configs = {}
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        c = _read_json(os.path.join(runs_dir, name, "config.json"))
        if c is not None and c.get("config_version", 1) < tlx_config.CONFIG_VERSION:
            configs[name] = c
    renamed: dict[str, str] = {}

    def visit(name: str) -> str:
        if name in renamed:
            return renamed[name]
        tree = tlx_config.migrate(configs[name])
        parent = os.path.basename(str(tree.get("init_from", "")).rstrip("/"))
        hashed = dict(tree)
        if parent in configs or parent in renamed:
            new_parent = visit(parent)
            hashed["init_from"] = f"sweep:{new_parent}"
            tree["init_from"] = os.path.join(runs_dir, new_parent)
        new = config_hash(hashed)
        src, dst = os.path.join(runs_dir, name), os.path.join(runs_dir, new)
        renamed[name] = new
        if new != name:
            if os.path.exists(dst):
                log(f"[sweep] {name}: migrates to {new}, which exists already; left as it is")
                return new
            os.rename(src, dst)  # first: a kill after it leaves a v1 config that migrates again
        os.replace(os.path.join(dst, "config.json"), os.path.join(dst, "config.v1.json"))
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(tree, f, indent=1)
        return new

    for name in list(configs):
        visit(name)
    if renamed:
        log(f"[sweep] migrated {len(renamed)} run(s) written with config v1 to today's hashes")
    return renamed


def read_summary(run_dir: str) -> dict | None:
    """The summary of a finished run, else None (a summary cut short by a kill is unfinished)."""
    return _read_json(os.path.join(run_dir, "summary.json"))


def read_diverged(run_dir: str) -> dict | None:
    """A run that stopped on a non-finite loss or parameter (train.FAILED says 'diverged'), as a
    summary: {'diverged': True, 'error', 'val_accuracy': None, 'test_accuracy': None, ...}; else
    None. It is finished too: trained again, it would diverge again."""
    failed = _read_json(os.path.join(run_dir, "failed.json"))
    if not isinstance(failed, dict) or failed.get("status") != "diverged":
        return None
    return {
        "diverged": True,
        "error": failed.get("error", ""),
        "val_accuracy": None,
        "test_accuracy": None,
        "wall_s": 0.0,
    }


def is_diverged(summary: dict) -> bool:
    return bool(summary.get("diverged"))


def execute(run_dir: str, spec: str, overrides: dict) -> tuple[dict, bool]:
    """Train the run (or resume it, or read it when finished or diverged): (summary, trained
    here). A diverged run is a summary with diverged=True (`read_diverged`), not an error. A
    finished run whose data changed since (`stale`) is trained again, its old files moved to
    RUN/stale/ (`set_aside`), and the summary says why under 'sweep_note'.

    The run's lock (`tlx.rundir.lock`, the one train.run takes) keeps two runners (say, one
    restarted while an orphan still works) from training one run at once: the second waits.
    """
    from tlx import config as tlx_config
    from tlx import train

    with rundir.lock(run_dir, wait=True):
        config = tlx_config.load(spec, **overrides)
        summary = read_summary(run_dir) or read_diverged(run_dir)
        note = ""
        if summary is not None:
            why, note = stale(run_dir, summary, config, overrides.get("init_from", ""))
            if why is None:
                return ({**summary, "sweep_note": note} if note else summary), False
            note = f"trained again: {why}; the old run is in {set_aside(run_dir, why)}"
        init_from = overrides.get("init_from", "")
        record = {"config": spec, "overrides": overrides}
        if init_from and os.path.exists(os.path.join(init_from, "summary.json")):
            record["init_summary"] = _digest(os.path.join(init_from, "summary.json"))
        with open(os.path.join(run_dir, "sweep_run.json"), "w") as f:
            json.dump(record, f, indent=1, default=str)
        try:
            summary = train.run(config, run_dir)
        except train.NonFiniteError:
            summary = read_diverged(run_dir)
        return ({**summary, "sweep_note": note} if note else summary), True


def stale(run_dir: str, summary: dict, config, init_from: str = "") -> tuple[str | None, str]:
    """(why the finished run in `run_dir` must be trained again, or None; a note when it could
    not be checked). It must when its dataset as built changed since it ran (the fingerprint in
    its summary.json against today's, `tlx.data.fingerprint`: computed once per dataset and
    process, from the builder's metadata and a sample of records), or when the run it started
    from (`init_from`) was trained again since (sweep_run.json records that run's summary)."""
    from tlx import data

    note = ""
    recorded = (summary.get("dataset") or {}).get("fingerprint")
    name = config.data.name
    if recorded:
        try:
            current = data.fingerprint(config.data)
        except data.DatasetNotPreparedError:
            current, note = None, f"dataset {name} not checked: it is not prepared here"
        if current is not None and current != recorded:
            return (
                f"its dataset {name} changed (fingerprint {recorded} in summary.json, "
                f"{current} as built now)"
            ), note
    elif not is_diverged(summary):
        note = "dataset not checked: its summary.json predates dataset fingerprints"
    parent = os.path.join(init_from, "summary.json") if init_from else ""
    seen = (_read_json(os.path.join(run_dir, "sweep_run.json")) or {}).get("init_summary")
    if seen and os.path.exists(parent) and _digest(parent) != seen:
        return f"the run it starts from, {os.path.basename(init_from)}, was trained again", note
    return None, note


def set_aside(run_dir: str, why: str) -> str:
    """Moves a finished run's files (all but its lock) into RUN/stale/DIGEST/ (the digest of its
    summary.json or failed.json) with why.txt, so the directory starts over; returns that path,
    relative to the sweep's directory. The checkpoints go first and the summary last: a kill in
    between leaves a run that is still finished (and stale), never an unfinished old one that a
    resume would complete; the next set-aside moves the rest into the same place."""
    marker = next(
        p for p in (os.path.join(run_dir, n) for n in ("summary.json", "failed.json"))
        if os.path.exists(p)
    )  # fmt: skip
    dest = os.path.join(run_dir, "stale", _digest(marker))
    os.makedirs(dest, exist_ok=True)
    names = sorted(set(os.listdir(run_dir)) - {".lock", "stale"})
    last = ("summary.json", "failed.json")
    for name in sorted(names, key=lambda n: (n in last, n != "checkpoints", n)):
        os.replace(os.path.join(run_dir, name), os.path.join(dest, name))
    with open(os.path.join(dest, "why.txt"), "w") as f:
        f.write(why + "\n")
    return os.path.relpath(dest, os.path.dirname(os.path.dirname(run_dir)))


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def enable_compilation_cache() -> str:
    """Keep compiled steps on disk ($TLX_JAX_CACHE, else ~/.cache/tlx/jax): runs that differ only
    in seed (or a resumed run) then skip XLA compilation, which dominates short runs here
    (a tiny fine-tuning run: 55 s compiling, 8 s with the cache, on 2 busy cores)."""
    import jax

    path = os.environ.get("TLX_JAX_CACHE") or os.path.expanduser("~/.cache/tlx/jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _prepare_process(imports: tuple[str, ...] = ()):
    from absl import logging

    user_modules.import_all(imports)  # the sweep's --import: the user's strategies, by name
    enable_compilation_cache()
    # orbax logs every save at INFO, and warns of a metadata file on each init_from read
    logging.set_verbosity(logging.ERROR)


# -- the sweep -------------------------------------------------------------------------------------
def run_sweep(
    spec, workdir: str, parallel: int = 1, log=print, launcher: str = "local", **ray_options
) -> list[dict]:
    """Run (or finish) the study `spec` in `workdir`; returns the rows of results.csv. `spec`: a
    study file spec ('configs/quadrants.py:tiny') or a list of cells (e.g. from a notebook)."""
    cells = load_study(spec) if isinstance(spec, str) else check_cells(spec)
    spec = spec if isinstance(spec, str) else f"{len(cells)} cells"
    workdir = os.path.abspath(workdir)
    runs_dir = os.path.join(workdir, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    with open(os.path.join(workdir, ".migrate.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several sweeps on one directory: one migrates
        migrate_runs(runs_dir, log)
    check_configs(cells)
    position = {c["name"]: i for i, c in enumerate(cells) if "name" in c}
    trials: dict[int, list[tuple[dict, str]]] = {}  # cell -> [(grid point, run hash)]
    chosen: dict[int, dict] = {}  # cell -> {'run', 'point', 'summary', 'trials'}
    futures: dict[str, cf.Future] = {}  # run hash -> future of execute()
    about: dict[str, str] = {}  # run hash -> what it is, for the log
    reported: set[str] = set()
    counts = {"trained": 0, "read": 0, "again": 0}
    started = time.time()

    def chosen_of(cell, ref):
        return chosen.get(position[cell[ref]]) if cell.get(ref) else {}

    def expand(executor) -> None:
        """Submit the runs of every cell whose dependencies have chosen runs."""
        for i, c in enumerate(cells):
            init, grid_src = chosen_of(c, "init_from"), chosen_of(c, "grid_from")
            if i in trials or init is None or grid_src is None:
                continue
            init_run = init.get("run")
            grid = [grid_src["point"]] if grid_src else list(c.get("grid") or [{}])
            trials[i] = []
            for point in grid:
                _, h = resolve(c, point, init_run)
                trials[i].append((point, h))
                if h in futures:  # the same run in two cells is trained once
                    continue
                overrides = {**c.get("overrides", {}), **point, "progress": False}
                overrides["tensorboard"] = False
                if init_run:
                    overrides["init_from"] = os.path.join(runs_dir, init_run)
                about[h] = _describe(c, point)
                futures[h] = executor.submit(
                    execute, os.path.join(runs_dir, h), c["config"], overrides
                )
                log_finished()

    def log_finished() -> None:
        for h, f in futures.items():
            if h not in reported and f.done():
                reported.add(h)
                summary, trained = f.result()  # raises the run's error, if any
                counts["trained" if trained else "read"] += 1
                note = summary.get("sweep_note", "")
                counts["again"] += note.startswith("trained again")
                figures = (
                    f"DIVERGED ({summary['error']})"
                    if is_diverged(summary)
                    else f"val {summary['val_accuracy']:.3f} test {summary['test_accuracy']:.3f}"
                )
                how = "trained" if trained else "finished before, read"
                if note.startswith("trained again"):
                    how, note = note, ""
                log(
                    f"[sweep] {time.time() - started:6.0f} s  {h} {how}: "
                    f"{figures} ({summary['wall_s']:.0f} s)  {about[h]}"
                    + (f"  ({note})" if note else "")
                )

    def collect() -> None:
        """Log finished runs; choose for every cell whose runs are all finished."""
        log_finished()
        for i, ts in trials.items():
            if i in chosen or not all(futures[h].done() for _, h in ts):
                continue
            summaries = [futures[h].result()[0] for _, h in ts]
            # Best validation accuracy; among equals the first grid point; diverged runs last.
            best = max(range(len(ts)), key=lambda k, s=summaries: _score(s[k], k))
            chosen[i] = {
                "run": ts[best][1],
                "point": ts[best][0],
                "summary": summaries[best],
                "trials": summaries,
            }

    prepare = functools.partial(_prepare_process, user_modules.imported())
    executor = launchers.make(launcher, parallel, prepare, **ray_options)
    where = f"ray {ray_options.get('address') or '(local)'}" if launcher == "ray" else parallel
    log(f"[sweep] {spec}: {len(cells)} cells -> {workdir} (parallel={where})")
    try:
        while True:
            before = (len(trials), len(chosen))
            expand(executor)
            collect()
            if len(chosen) == len(cells):
                break
            waiting = [f for f in futures.values() if not f.done()]
            if waiting:
                cf.wait(waiting, return_when=cf.FIRST_COMPLETED)
            elif (len(trials), len(chosen)) == before:
                stuck = [c.get("name") for i, c in enumerate(cells) if i not in trials]
                raise RuntimeError(f"cells wait on each other: {stuck}")
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown()

    rows, deps = [], []
    for i, c in enumerate(cells):
        (rows if c.get("axes") else deps).append(_row(c, chosen[i], cells, runs_dir))
    write_csv(os.path.join(workdir, "results.csv"), rows)
    write_csv(os.path.join(workdir, "dependencies.csv"), deps)
    log(
        f"[sweep] done: {len(rows)} cells (+{len(deps)} dependencies), {len(futures)} runs "
        f"({counts['trained']} trained, {counts['read']} read"
        + (f"; {counts['again']} trained again: their data changed" if counts["again"] else "")
        + f") in {time.time() - started:.0f} s "
        f"-> {workdir}/results.csv"
    )
    return rows


def _score(summary: dict, k: int) -> tuple:
    """The order in which a cell chooses among its grid points (the largest wins)."""
    val = summary.get("val_accuracy")
    ok = not is_diverged(summary) and val is not None and math.isfinite(val)
    return (ok, val if ok else 0.0, -k)


def _describe(cell: dict, point: dict) -> str:
    what = cell.get("axes") or {"cell": cell.get("name")}
    text = " ".join(f"{k}={v}" for k, v in what.items())
    if point:
        text += " | " + " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items())
    return text


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _lookup(tree: dict, dotted: str, default):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def _row(cell: dict, chosen: dict, cells: list[dict], runs_dir: str) -> dict:
    s = chosen["summary"]
    dataset = s.get("dataset", {})
    row = dict(cell.get("axes") or {"cell": cell.get("name")})
    row.update(
        test_accuracy=s.get("test_accuracy"),
        val_accuracy=s.get("val_accuracy"),
        train_accuracy=s.get("train_accuracy"),
        test_loss=s.get("test_loss"),
        params_trainable=s.get("params_trainable"),
        params_frozen=s.get("params_frozen"),
        frozen_stages=sum(bool(re.fullmatch(r"stage\d+", n)) for n in s.get("frozen_stages", [])),
        train_examples=dataset.get("num_examples", {}).get("train"),
        num_classes=dataset.get("num_classes"),
        steps=s.get("steps"),
    )
    # The learning rates the chosen run trained with, and every other key a grid varies: read
    # from its config.json (what the run used, grid point or not), else from the grid point.
    keys = list(ALWAYS_SHOWN)
    for c in cells:
        for point in c.get("grid") or []:
            keys += [k for k in point if k not in keys]
    config = _read_json(os.path.join(runs_dir, chosen["run"], "config.json")) or {}
    for k in keys:
        row[k] = _lookup(config, k, chosen["point"].get(k, ""))
    row["grid_size"] = len(chosen["trials"])
    diverged = sum(is_diverged(t) for t in chosen["trials"])
    if diverged:  # a column only in sweeps where some run diverged
        row["diverged_runs"] = diverged
    row["run"] = chosen["run"]
    row["wall_s"] = round(s.get("wall_s", 0.0), 1)
    row["cell_wall_s"] = round(sum(t.get("wall_s", 0.0) for t in chosen["trials"]), 1)
    return row


def write_csv(path: str, rows: list[dict]) -> None:
    """Rows (dicts) as CSV with the union of their keys as columns, in first-seen order;
    written to a temporary file of its own and renamed, so a kill never leaves half a table and
    two sweeps finishing together (a job array) each write a whole one."""
    columns = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".results.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(rows)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m tlx.sweep",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the docstring's own lines
    )
    ap.add_argument("--config", required=True, help="configs/STUDY.py[:ARGS]")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--parallel", type=int, default=1, help="runs at once, in worker processes")
    ap.add_argument("--no_report", action="store_true", help="results.csv only, no tables/plots")
    ap.add_argument("--launcher", default="local", choices=launchers.LAUNCHERS)
    ap.add_argument("--ray_address", default="", help="a Ray cluster ('' starts a local one)")
    ap.add_argument("--ray_cpus_per_run", type=float, default=1.0)
    ap.add_argument("--ray_gpus_per_run", type=float, default=0.0)
    ap.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module of yours to import first, here and in every worker (repeatable or a,b)",
    )
    args = ap.parse_args(argv)
    ray_options = {}
    if args.launcher == "ray":
        ray_options = dict(
            address=args.ray_address, cpus=args.ray_cpus_per_run, gpus=args.ray_gpus_per_run
        )
    try:
        user_modules.import_all(user_modules.parse(args.imports))
        rows = run_sweep(
            args.config, args.workdir, args.parallel, launcher=args.launcher, **ray_options
        )
    except (ValueError, KeyError, FileNotFoundError) as e:  # the user's: one line, exit 1
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"tlx.sweep: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    if not args.no_report and rows:
        from tlx import report

        for path in report.write_study_report(args.workdir, study=args.config):
            print(f"[sweep] wrote {path}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
