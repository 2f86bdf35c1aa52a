"""The streaming input path against the in-memory one, and fractaldb's build speed.

    python experiments/bench_input.py --workdir=runs/bench_input [--large=100] [--steps=60]

Builds fractaldb at 32 px with ``--small`` and ``--large`` categories x 1000 images (timed: render
speed per core, and what 1M images would take on 16 cores), then pre-trains resnet_tiny at 32 px
for the same steps, each run in its own process:
  A: fractaldb small, streaming;  B: fractaldb large, streaming;  C: fractaldb small, in memory
and prints, besides each run's figures:
  rss_growth_mb=       peak RSS of B minus A (the training process; its workers beside)
  stream_over_memory=  wall time per step of A over C (the median logged interval, after compile,
                       as summary.json's images_per_s); stream_over_memory_best= the same from
                       the fastest interval of each. On a shared machine both move with the load.
  the input pipeline's images/s alone (both paths, no train step) beside the train step's.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a child process: one pre-training run, then its peak RSS (self, and the largest of its
# worker processes) and the input pipeline alone.
CHILD = r"""
import json, os, resource, sys, time
from tlx import config as tlx_config, data, train

def main():
    args = json.loads(sys.argv[1])
    c = tlx_config.load(args["spec"], progress=False, tensorboard=False, **args["overrides"])
    summary = train.run(c, args["workdir"])
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    ds = data.load(c.data)
    it = ds.train_iter(c.batch_size, seed=1)
    for _ in range(3):
        next(it)
    t, n = time.time(), args["input_batches"]
    for _ in range(n):
        next(it)
    input_ips = n * c.batch_size / (time.time() - t)
    getattr(it, "close", lambda: None)()
    logged = [json.loads(x) for x in open(os.path.join(args["workdir"], "metrics.jsonl"))]
    rates = [r["images_per_s"] for r in logged if "split" not in r][1:]  # the first: compile
    print("RESULT " + json.dumps(dict(
        best_train_images_per_s=max(rates),
        rss_mb=rss_self, workers_rss_mb=rss_workers, input_images_per_s=input_ips,
        train_images_per_s=summary["images_per_s"], wall_s=summary["wall_s"],
        test_accuracy=summary["test_accuracy"], input=summary["dataset"]["input"],
    )))

if __name__ == "__main__":
    main()
"""


def build(data_dir: str, classes: int, workers: int) -> dict:
    from tlx.data import fractaldb

    params = dict(num_classes=classes, train_per_class=1000, test_per_class=100, resolution=32)
    config = fractaldb.make_config(**params)
    path = os.path.join(data_dir, "fractaldb", config.name, str(fractaldb.FractalDB.VERSION))
    cached = os.path.exists(os.path.join(path, "dataset_info.json"))
    t = time.time()
    fractaldb.prepare(data_dir, **params, workers=workers)
    seconds = time.time() - t
    images = classes * 1100
    out = dict(classes=classes, images=images, seconds=round(seconds, 1), cached=cached)
    if not cached:
        out["images_per_s"] = round(images / seconds, 1)
        out["images_per_s_per_core"] = round(images / seconds / workers, 1)
    return out


def run(workdir, data_dir, classes, in_memory, steps, batch_size, workers, input_batches):
    spec = os.path.join(ROOT, f"configs/pretrain.py:steps={steps},batch_size={batch_size}")
    overrides = {
        "data.name": "fractaldb",
        "data.data_dir": data_dir,
        "data.in_memory": in_memory,
        "data.workers": workers,
        "data.fractaldb.num_classes": classes,
        "data.fractaldb.train_per_class": 1000,
        "data.fractaldb.test_per_class": 100,
        "data.fractaldb.resolution": 32,
        "data.augment.flip": False,
        "eval_train": False,
        "eval_every": 0,
        "checkpoint_every": 0,
        "log_every": 10,
    }
    args = dict(spec=spec, overrides=overrides, workdir=workdir, input_batches=input_batches)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"run {workdir} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--data_dir", default="", help="default: WORKDIR/tfds")
    p.add_argument("--small", type=int, default=10, help="categories x 1000 images (A, C)")
    p.add_argument("--large", type=int, default=100, help="categories x 1000 images (B)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="data.workers (and build processes)")
    p.add_argument("--input_batches", type=int, default=40)
    a = p.parse_args()
    data_dir = a.data_dir or os.path.join(a.workdir, "tfds")
    os.makedirs(data_dir, exist_ok=True)

    builds = [build(data_dir, c, a.workers) for c in (a.small, a.large)]
    for b in builds:
        print("build", json.dumps(b))
    fresh = [b for b in builds if not b["cached"]]
    if fresh:
        per_core = max(b["images_per_s_per_core"] for b in fresh)
        print(f"render_images_per_s_per_core={per_core}")
        print(f"fractaldb_1m_on_16_cores_min={1e6 / (per_core * 16) / 60:.1f}")

    common = (a.steps, a.batch_size, a.workers, a.input_batches)
    runs = {}  # A and C one after the other: the pair compared for time
    for key, classes, in_memory in (("A", a.small, "false"), ("C", a.small, "true")):
        runs[key] = run(os.path.join(a.workdir, key), data_dir, classes, in_memory, *common)
    runs["B"] = run(os.path.join(a.workdir, "B"), data_dir, a.large, "false", *common)
    for key, r in sorted(runs.items()):
        print("run", key, json.dumps(r))
    print(f"rss_growth_mb={runs['B']['rss_mb'] - runs['A']['rss_mb']:.1f}")
    print(f"workers_rss_growth_mb={runs['B']['workers_rss_mb'] - runs['A']['workers_rss_mb']:.1f}")
    best = runs["C"]["best_train_images_per_s"] / runs["A"]["best_train_images_per_s"]
    median = runs["C"]["train_images_per_s"] / runs["A"]["train_images_per_s"]
    print(f"stream_over_memory={median:.3f}")
    print(f"stream_over_memory_best={best:.3f}")
    for key, label in (("A", "stream"), ("C", "memory")):
        r = runs[key]
        print(
            f"{label}: input_images_per_s={r['input_images_per_s']:.0f} "
            f"train_images_per_s={r['train_images_per_s']:.0f}"
        )


if __name__ == "__main__":
    main()
