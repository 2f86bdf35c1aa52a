"""tlx.advise scored on the freeze-depth benchmark (configs/depth.py), cells it never saw: the
rule was committed (7571a31) before the benchmark's runs.

  .venv/bin/python experiments/bench_advise_depth.py --depth_workdir=runs/depth \\
      [--workdir=runs/bench_advise_depth]

Per cell (target, size, seed) of the benchmark: the advisor runs on that cell's own training
subset (the cell's fine-tuning config: same examples, same preprocessing) and recommends a depth;
the oracle depth is the one with the best validation accuracy among the depths the benchmark
trained; regret = test accuracy of the oracle minus that of the advised depth (pp). Scored beside
it: `probe_depth` and `logme_depth` (fixed in the same commit), the seed's table as the advisor
reads it (similarity measured), each constant depth, the best constant in hindsight, the
size-only rule and the seed's table with the similarity fixed (`tlx.report.depth.simple_rules`).
Intervals: percentile bootstrap over cells (scipy.stats.bootstrap); the advisor minus the best
constant is bootstrapped on the paired per-cell differences. Kendall tau (scipy.stats.kendalltau)
between the advisor's depth ranking (`advice['curve']`) and the cell's test accuracies, mean over
cells. advise_cost: the advisor's wall seconds over the seconds of every training run of the
cell's depths (seed 0's learning-rate grid included), mean over cells.
"""

import argparse
import ast
import inspect
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scipy import stats as sps  # noqa: E402

from tlx import advise  # noqa: E402
from tlx import config as tlx_config  # noqa: E402
from tlx.report import depth, tables  # noqa: E402
from tlx.study import load_module  # noqa: E402

RULE_COMMIT = "7571a31"
RULE_FUNCTIONS = ("recommend", "similarity", "depth_curve", "probe_depth", "logme_depth")
PRESET_DEPTH = {"none": lambda s: 0, "freeze_early": lambda s: 1}
PRESET_DEPTH.update({"freeze_most": lambda s: s - 1, "linear_probe": lambda s: s})


def rule_unchanged() -> bool:
    """The advisor's functions today are those of the pre-registration commit, source for source."""
    old = subprocess.run(
        ["git", "-C", ROOT, "show", f"{RULE_COMMIT}:tlx/advise.py"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    tree = ast.parse(old)
    lines = old.splitlines()
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for name in RULE_FUNCTIONS:
        n = defs[name]
        then = "\n".join(lines[n.lineno - 1 : n.end_lineno])
        if inspect.getsource(getattr(advise, name)).rstrip() != then.rstrip():
            return False
    return True


def cell_advice(study, target, size, seed, workdir) -> dict:
    """The advice on one benchmark cell's training subset, cached as JSON under `workdir`."""
    path = os.path.join(workdir, f"{target}_{size}_{seed}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    spec = study._spec(study.ARGS, target, size, "freeze_stages,stages=0", seed)
    config = tlx_config.load(spec)
    adv = advise.advise(config, folds=3, seed=seed)
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(adv, f, indent=1, default=float)
    return adv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth_workdir", default="runs/depth")
    ap.add_argument("--workdir", default="runs/bench_advise_depth")
    a = ap.parse_args(argv)
    study, _ = load_module(os.path.join(ROOT, "configs", "depth.py"))
    rows, _ = tables.read_results(a.depth_workdir)
    cells = depth.cells(rows)
    if not cells:
        print(f"{a.depth_workdir}/results.csv has no complete cell", file=sys.stderr)
        return 1
    s = int(rows[0]["max_depth"])
    advice, costs, taus = {}, [], []
    for (target, size, seed), cell in cells.items():
        adv = cell_advice(study, target, size, seed, a.workdir)
        advice[(target, size, seed)] = adv
        trained = sum(float(r["cell_wall_s"]) for r in cell.values())
        costs.append(adv["wall_s"]["total"] / trained)
        rank = {c["depth"]: c["rank"] for c in adv["curve"]}
        d = sorted(cell)
        tau = sps.kendalltau([-rank[k] for k in d], [cell[k]["test_accuracy"] for k in d])
        taus.append(float(tau.statistic) if np.isfinite(tau.statistic) else 0.0)

    def by_cell(f):
        return lambda c: f(advice[(c["target"], c["size"], c["seed"])])

    rules = {
        "advisor": by_cell(lambda v: v["recommendation"]["frozen_stages"]),
        "probe_depth": by_cell(advise.probe_depth),
        "logme_depth": by_cell(advise.logme_depth),
        "seed_table_measured": by_cell(lambda v: PRESET_DEPTH[v["rule_of_thumb"]["strategy"]](s)),
        **depth.simple_rules(s, sorted(next(iter(cells.values())))),
    }
    table = depth.regret_table(rows, rules)
    by = {r["rule"]: r for r in table}
    best = min(
        (r for r in table if r["rule"].startswith("constant_")), key=lambda r: r["regret_pp"]
    )
    per = {name: depth.cell_regrets(cells, rules[name]) for name in ("advisor", best["rule"])}
    per = {name: [per[name][k][0] for k in cells] for name in per}
    diff = np.array(per["advisor"]) - np.array(per[best["rule"]])
    lo, hi = depth.bootstrap_mean(diff)
    os.makedirs(a.workdir, exist_ok=True)
    tables.write_csv(os.path.join(a.workdir, "regret.csv"), table)
    print(f"rule_commit={RULE_COMMIT} rule_unchanged={rule_unchanged()}")
    print(f"cells={len(cells)} depths=0..{s}")
    print(tables.markdown(table, ["rule", "regret_pp", "ci_low", "ci_high", "hits", "cells"]))
    print(f"best constant in hindsight: {best['rule']}")
    print(
        f"advice_regret={by['advisor']['regret_pp']:.2f} "
        f"best_constant_regret={best['regret_pp']:.2f} "
        f"advice_minus_best_constant={diff.mean():.2f} [{lo:.2f}, {hi:.2f}]"
    )
    print(f"advice_tau={np.mean(taus):.2f}")
    print(f"advise_cost={np.mean(costs):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
