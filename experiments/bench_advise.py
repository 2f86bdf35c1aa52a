"""Score the freeze advisor on the measured studies: is its recommendation the winner of each
cell, or not different from it (the paired interval of experiments/results/STUDY/paired.csv)?

  .venv/bin/python experiments/bench_advise.py [--workdir=runs/bench_advise]

For each study, the pre-trained backbone is re-created by the study's own config (its `source`
cell, trained here once, or read when a finished run is in WORKDIR), the advisor runs on every
condition (target x size) with that backbone, and its strategy is scored against the committed
results, beside the seed's table (seed_table.csv) and "always fine-tune everything" (none).
The cost is the advisor's wall time (cold feature cache) over the wall time of fine-tuning the
four presets once on the same target (the study's cell at its default rates), both measured here.

Ends with `advice_hits=A/N seed_table_hits=B/N full_ft_hits=C/N` and `advise_cost=X`.
"""

import argparse
import csv
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tlx import advise, study, sweep  # noqa: E402
from tlx import config as tlx_config  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
STUDIES = {  # committed results -> the study spec that produced them (README, Makefile)
    "quadrants": "configs/quadrants.py",
    "quadrants_small3": "configs/quadrants.py:small=3,sizes=small,batch_size=30",
}
PRESETS = ("none", "freeze_early", "freeze_most", "linear_probe")
AXES = ("target", "similarity", "size", "examples_per_class")


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def is_hit(strategy: str, condition: dict, paired: list[dict]) -> bool:
    """The strategy is the cell's winner, or the paired interval of (winner - it) holds 0."""
    winner = condition["winner"]
    if strategy == winner:
        return True
    for row in paired:
        if all(row[k] == condition[k] for k in AXES) and {row["a"], row["b"]} == {winner, strategy}:
            return row["verdict"] == "not different"
    return False  # not a strategy of the study (e.g. freeze_stages=K): nothing says it ties


def cell_of(cells: list[dict], condition: dict, strategy: str) -> dict:
    for c in cells:
        ax = c.get("axes", {})
        if ax.get("strategy") == strategy and ax.get("seed") == 0:
            if all(str(ax[k]) == condition[k] for k in AXES):
                return c
    raise KeyError(f"no {strategy} cell for {condition}")


def run_cell(workdir: str, cell: dict, init_from: str = "") -> tuple[dict, float, bool]:
    """Train (or read) a study cell's run at its config's default rates: (summary, s, trained)."""
    overrides = {**cell.get("overrides", {}), "progress": False, "tensorboard": False}
    if init_from:
        overrides["init_from"] = init_from
    _, digest = sweep.resolve(cell, {}, None)
    t = time.time()
    summary, trained = sweep.execute(
        os.path.join(workdir, "runs", digest), cell["config"], overrides
    )
    return summary, time.time() - t, trained


def same_source(run_dir: str, cell: dict) -> list[str]:
    """The fields where a finished run's config.json differs from the study's source config,
    over the keys both have (the config layout moves; what the run computes must not)."""
    with open(os.path.join(run_dir, "config.json")) as f:
        ran = json.load(f)
    want = json.loads(study.cell_config(cell).to_json_best_effort())
    diffs = []
    for key in ("seed", "total_steps", "batch_size", "model", "data", "optim"):
        x, y = ran.get(key), want.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            for k in set(x) & set(y):
                # data_dir is where, not what; another dataset's block (data.fractaldb when
                # data.name is 'fractals') is not read
                other = key == "data" and isinstance(x[k], dict) and k != x.get("name")
                if x[k] != y[k] and k != "data_dir" and not other:
                    diffs.append(f"{key}.{k}")
        elif x != y:
            diffs.append(key)
    return diffs


def source_run(workdir: str, cell: dict, given: str) -> tuple[str, dict, float, bool]:
    """(run dir, summary, seconds, trained here) of the study's pre-trained backbone: the
    finished run `given` when its config matches the study's, else the study's own cell."""
    if given:
        diffs = same_source(given, cell)
        if diffs:
            raise SystemExit(f"--source={given} differs from the study's source in {diffs}")
        return given, sweep.read_summary(given), 0.0, False
    summary, secs, trained = run_cell(workdir, cell)
    return os.path.join(workdir, "runs", sweep.resolve(cell, {}, None)[1]), summary, secs, trained


def check_yosinski(a, cache: str) -> dict:
    """What the yosinski study measures that the advisor estimates: how deep base A's frozen
    blocks serve target B as well as B's own (AnB not different from BnB, paired, per cut).
    The advisor, from baseA on B's training split, says general = stem..its deepest stage
    within one SE of the best probe; the study says general = the deepest cut n with AnB ~ BnB."""
    spec = "configs/yosinski.py"
    cells = study.load_study(spec)
    base = next(c for c in cells if c["name"] == "baseA")
    summary, secs, trained = run_cell(a.workdir, base)
    src_dir = os.path.join(a.workdir, "runs", sweep.resolve(base, {}, None)[1])
    print(
        f"yosinski: baseA {'trained' if trained else 'read'} in {secs:.0f} s, test accuracy "
        f"{summary['test_accuracy']:.3f}",
        flush=True,
    )
    target = next(c for c in cells if c.get("axes", {}).get("treatment") == "AnB")
    config = tlx_config.load(
        target["config"],
        **{k: v for k, v in target["overrides"].items() if k.startswith("data.")},
        init_from=src_dir,
    )
    adv = advise.advise(config, folds=a.folds, cache_dir=cache)
    advisor_blocks = adv["similarity"]["deepest_general_index"] + 1
    paired = read_csv(os.path.join(RESULTS, "yosinski", "paired.csv"))
    same = {
        int(r["cut"]): r["verdict"] == "not different"
        for r in paired
        if {r["a"], r["b"]} == {"AnB", "BnB"}
    }
    measured_blocks = max(
        (n for n in sorted(same) if all(same[m] for m in same if m <= n)), default=0
    )
    print(
        "  probe on B from baseA: "
        + " ".join(
            f"{r['stage']} {100 * r['probe']['accuracy']:.1f}±{100 * r['probe']['se']:.1f}"
            for r in adv["stages"]
        )
        + f" -> general blocks: advisor {advisor_blocks}, study (AnB ~ BnB) {measured_blocks}; "
        f"advisor recommends {adv['recommendation']['strategy']}",
        flush=True,
    )
    return {
        "advisor_general_blocks": advisor_blocks,
        "study_general_blocks": measured_blocks,
        "anb_vs_bnb_not_different": same,
        "advice": adv["recommendation"],
        "stages": adv["stages"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench_advise"))
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--cost", default="large", help="size whose four presets are timed, per target")
    ap.add_argument("--source", default="", help="a finished run of the studies' source config")
    ap.add_argument(
        "--yosinski",
        type=int,
        default=1,
        help="1: check the similarity estimate against the yosinski study (pre-trains its baseA)",
    )
    a = ap.parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    cache = os.path.join(a.workdir, "advise_cache")
    shutil.rmtree(cache, ignore_errors=True)  # cold: the advisor's time includes its features
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (2 cores, shared)", flush=True)

    scored, advisor_s, sources, yosinski = [], {}, {}, None
    for name, spec in STUDIES.items():
        cells = study.load_study(spec)
        source = next(c for c in cells if "axes" not in c)
        src_dir, summary, secs, trained = source_run(a.workdir, source, a.source)
        digest = os.path.basename(src_dir)
        sources[digest] = {"test_accuracy": summary["test_accuracy"], "s": secs, "trained": trained}
        print(
            f"{name}: source {digest} {'trained' if trained else 'read'} in {secs:.0f} s, "
            f"test accuracy {summary['test_accuracy']:.3f}",
            flush=True,
        )
        paired = read_csv(os.path.join(RESULTS, name, "paired.csv"))
        seed_table = read_csv(os.path.join(RESULTS, name, "seed_table.csv"))
        for cond in read_csv(os.path.join(RESULTS, name, "winners.csv")):
            cell = cell_of(cells, cond, "none")
            config = tlx_config.load(cell["config"], **cell.get("overrides", {}), init_from=src_dir)
            t = time.time()
            adv = advise.advise(config, folds=a.folds, cache_dir=cache)
            secs = time.time() - t
            advisor_s[(name, cond["target"], cond["size"])] = secs
            seed = next(r for r in seed_table if all(r[k] == cond[k] for k in AXES))
            rec = adv["recommendation"]["strategy"]
            row = {
                "study": name,
                **{k: cond[k] for k in AXES},
                "winner": cond["winner"],
                "advice": rec,
                "advice_hit": is_hit(rec, cond, paired),
                "seed_table": seed["seed_table"],
                "seed_table_hit": is_hit(seed["seed_table"], cond, paired),
                "seed_table_verdict": seed["verdict"],
                "seed_rule_measured": adv["rule_of_thumb"]["strategy"],
                "seed_rule_measured_hit": is_hit(adv["rule_of_thumb"]["strategy"], cond, paired),
                "full_ft_hit": is_hit("none", cond, paired),
                **{f"always_{p}_hit": is_hit(p, cond, paired) for p in PRESETS},
                "measured_similarity": adv["similarity"]["label"],
                "retained": adv["similarity"]["retained"],
                "deepest_general_stage": adv["similarity"]["deepest_general_stage"],
                "probe": [round(r["probe"]["accuracy"], 4) for r in adv["stages"]],
                "probe_se": [round(r["probe"]["se"], 4) for r in adv["stages"]],
                "logme": [r["logme"]["value"] for r in adv["stages"]],
                "advisor_s": secs,
            }
            # the seed_table verdict of the reports and this scoring must agree
            assert row["seed_table_hit"] == (seed["verdict"] in ("agrees", "ties")), row
            scored.append(row)
            print(
                f"  {cond['target']:<9} {cond['size']:<6} {cond['examples_per_class']:>3}/class "
                f"winner={cond['winner']:<13} advice={rec:<13} hit={int(row['advice_hit'])} "
                f"seed={seed['seed_table']:<13} hit={int(row['seed_table_hit'])} "
                f"none hit={int(row['full_ft_hit'])} | probe "
                + " ".join(f"{100 * p:.1f}" for p in row["probe"])
                + f" sim={row['measured_similarity']} ({secs:.1f} s)",
                flush=True,
            )

    print(
        "yosinski: not scored as cells. Its cells are (treatment, cut): n blocks copied from base "
        "A or B, frozen or fine-tuned, the rest re-initialised; none is a tlx preset on one "
        "pre-trained backbone, and its paired intervals compare treatments within a cut."
    )
    if a.yosinski:
        yosinski = check_yosinski(a, cache)

    # -- cost: the advisor against fine-tuning the four presets once on the same target --------
    cells = study.load_study(STUDIES["quadrants"])
    source = next(c for c in cells if "axes" not in c)
    src_dir = source_run(a.workdir, source, a.source)[0]
    costs = {}
    for cond in read_csv(os.path.join(RESULTS, "quadrants", "winners.csv")):
        if cond["size"] != a.cost:
            continue
        total = 0.0
        for strategy in PRESETS:
            summary, _, _ = run_cell(a.workdir, cell_of(cells, cond, strategy), src_dir)
            wall = summary["wall_s"]  # train.run's own: data, compile, steps, evaluation
            total += wall
            print(
                f"  fine-tune {cond['target']} {cond['size']} {strategy}: {wall:.1f} s", flush=True
            )
        adv_s = advisor_s[("quadrants", cond["target"], cond["size"])]
        costs[cond["target"]] = adv_s / total
        print(
            f"cost {cond['target']} {cond['size']}: advisor {adv_s:.1f} s / four presets "
            f"{total:.1f} s = {adv_s / total:.3f}",
            flush=True,
        )

    n = len(scored)
    hits = {k: sum(r[k] for r in scored) for k in ("advice_hit", "seed_table_hit", "full_ft_hit")}
    measured = sum(r["seed_rule_measured_hit"] for r in scored)
    with open(os.path.join(a.workdir, "bench_advise.json"), "w") as f:
        json.dump(
            {"cells": scored, "costs": costs, "sources": sources, "yosinski": yosinski},
            f,
            indent=1,
            default=str,
        )
    print(f"seed's table from the advisor's measured similarity: {measured}/{n} hits")
    print(
        "one preset everywhere: "
        + " ".join(f"{p}={sum(r[f'always_{p}_hit'] for r in scored)}/{n}" for p in PRESETS)
    )
    agree = sum(r["measured_similarity"] == r["similarity"] for r in scored)
    print(f"measured similarity = the study's label: {agree}/{n}")
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    print(
        f"advice_hits={hits['advice_hit']}/{n} seed_table_hits={hits['seed_table_hit']}/{n} "
        f"full_ft_hits={hits['full_ft_hit']}/{n}"
    )
    print(f"advise_cost={max(costs.values()):.3f}" if costs else "advise_cost=n/a")
    return 0


if __name__ == "__main__":
    sys.exit(main())
