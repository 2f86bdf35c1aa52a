"""The main job: pre-train resnet_tiny on fractals, then fine-tune it on a similar and a
different target, each small and large, under the four freeze presets of the seed's table.

  python experiments/demo.py --workdir=runs/demo

Every run is an ordinary tlx run directory under WORKDIR (re-running resumes and skips finished
runs). Prints the test accuracy of each quadrant x strategy with the winner of each quadrant and
writes WORKDIR/results.json and WORKDIR/results.csv.
"""

import argparse
import csv
import json
import os
import time

from absl import logging

from tlx import config as tlx_config
from tlx import train
from tlx.strategies import presets

STRATEGIES = ("none", "freeze_early", "freeze_most", "linear_probe")
# (quadrant name, target arg, similarity, size, examples_per_class)
QUADRANTS = (
    ("similar/small", "fractals", "similar", "small", 10),
    ("similar/large", "fractals", "similar", "large", 0),
    ("different/small", "mnist5k", "different", "small", 10),
    ("different/large", "mnist5k", "different", "large", 0),
)
# What the rule of thumb prescribes per quadrant (defined once, in tlx.strategies.presets).
RULE_OF_THUMB = {q: presets.rule_of_thumb(size, sim) for q, _, sim, size, _ in QUADRANTS}


def run_once(spec: str, workdir: str, **overrides) -> dict:
    """A finished run with the same config is read back, not trained again."""
    config = tlx_config.load(spec, progress=False, **overrides)
    summary_path = os.path.join(workdir, "summary.json")
    config_path = os.path.join(workdir, "config.json")
    if os.path.exists(summary_path) and os.path.exists(config_path):
        with open(config_path) as f:
            same = json.load(f) == json.loads(config.to_json_best_effort())
        if same:
            with open(summary_path) as f:
                return json.load(f)
    return train.run(config, workdir)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--pretrain_steps", type=int, default=250)
    # Fixed steps per quadrant, the same for every strategy in it (sized for 2 CPU cores).
    ap.add_argument("--small_steps", type=int, default=60)
    ap.add_argument("--large_steps", type=int, default=120)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    t0 = time.time()
    os.makedirs(args.workdir, exist_ok=True)

    pre_dir = os.path.join(args.workdir, "pretrain")
    print(f"[demo] pre-training resnet_tiny on fractals ({args.pretrain_steps} steps) -> {pre_dir}")
    pre = run_once(
        f"configs/pretrain.py:backbone=resnet_tiny,source=fractals,"
        f"steps={args.pretrain_steps},seed={args.seed}",
        pre_dir,
    )
    print(f"[demo] source test accuracy {pre['test_accuracy']:.3f} ({pre['wall_s']:.0f} s)")

    rows = []
    for quadrant, target, similarity, size, k in QUADRANTS:
        for strategy in STRATEGIES:
            name = f"{target}_{size}_{strategy}"
            t = time.time()
            s = run_once(
                f"configs/finetune.py:backbone=resnet_tiny,target={target},strategy={strategy},"
                f"examples_per_class={k},seed={args.seed},batch_size={args.batch_size},"
                f"steps={args.small_steps if size == 'small' else args.large_steps},"
                f"init_from={pre_dir}",
                os.path.join(args.workdir, "finetune", name),
            )
            rows.append(
                {
                    "quadrant": quadrant,
                    "target": target,
                    "similarity": similarity,
                    "size": size,
                    "examples_per_class": k,
                    "strategy": strategy,
                    "test_accuracy": s["test_accuracy"],
                    "val_accuracy": s["val_accuracy"],
                    "train_accuracy": s.get("train_accuracy"),
                    "params_trainable": s["params_trainable"],
                    "wall_s": s["wall_s"],
                }
            )
            print(
                f"[demo] {quadrant:<16} {strategy:<13} test {s['test_accuracy']:.3f} "
                f"({time.time() - t:.0f} s)"
            )

    table = {}
    for r in rows:
        table.setdefault(r["quadrant"], {})[r["strategy"]] = r["test_accuracy"]
    winners = {q: max(accs, key=accs.get) for q, accs in table.items()}
    header = f"{'quadrant':<17}" + "".join(f"{s:>14}" for s in STRATEGIES)
    header += f"  {'winner':<14}{'seed table':<14}"
    print("\nTest accuracy (%), resnet_tiny pre-trained on fractals, seed", args.seed)
    print(header)
    for q, accs in table.items():
        cells = "".join(f"{100 * accs[s]:14.1f}" for s in STRATEGIES)
        print(f"{q:<17}{cells}  {winners[q]:<14}{RULE_OF_THUMB[q]:<14}")
    wall = time.time() - t0
    print(
        f"\nsource (fractals, 30 classes) test accuracy {100 * pre['test_accuracy']:.1f}%; "
        f"demo wall time {wall:.0f} s"
    )

    with open(os.path.join(args.workdir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(
            {
                "pretrain_test_accuracy": pre["test_accuracy"],
                "rows": rows,
                "winners": winners,
                "seed_table": RULE_OF_THUMB,
                "wall_s": wall,
            },
            f,
            indent=1,
        )
    print(f"wrote {args.workdir}/results.csv and results.json")


if __name__ == "__main__":
    main()
