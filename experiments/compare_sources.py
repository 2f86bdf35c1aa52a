"""Cross-source comparisons of the source-scale study, paired over seeds.

`tlx.report`'s paired table compares strategies within one source; the reading of
`configs/source_scale.py` compares *sources* (and each source against training from scratch) for a
fixed target and strategy. Runs with the same seed share the target's training subset, the head's
initialisation and the batch order, so the difference of two sources at one seed is a paired
observation; this prints its mean and 95% t-interval over seeds, and whether every seed agrees.

    python experiments/compare_sources.py experiments/results/source_scale/results.csv \
        > experiments/results/source_scale/compare_sources.txt
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
from collections import defaultdict

from scipy import stats


def paired(a: list[float], b: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of a - b and its t-interval over the pairs (a Student t on the paired differences)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="the study's results.csv")
    args = ap.parse_args(argv)
    acc = defaultdict(dict)  # (target, strategy, source) -> {seed: test accuracy in pp}
    for row in csv.DictReader(open(args.results)):
        key = (row["target"], row["strategy"], row["source"])
        acc[key][row["seed"]] = 100 * float(row["test_accuracy"])
    sources = {k[2] for k in acc if k[1] != "scratch"}
    sources = sorted(sources, key=lambda s: [int(x) for x in s.split("x")])
    targets = sorted({k[0] for k in acc})
    strategies = sorted({k[1] for k in acc if k[1] != "scratch"})
    print("target strategy a b n mean_diff_pp ci_low ci_high every_seed")

    def line(target, strategy, a_key, b_key, a_name, b_name):
        a, b = acc[a_key], acc[b_key]
        seeds = sorted(set(a) & set(b))
        mean, lo, hi = paired([a[s] for s in seeds], [b[s] for s in seeds])
        signs = {math.copysign(1, a[s] - b[s]) for s in seeds if a[s] != b[s]}
        every = "yes" if len(signs) == 1 and all(a[s] != b[s] for s in seeds) else "no"
        n = len(seeds)
        print(f"{target} {strategy} {a_name} {b_name} {n} {mean:.2f} {lo:.2f} {hi:.2f} {every}")

    for target, strategy in itertools.product(targets, strategies):
        for a, b in itertools.combinations(sources, 2):
            line(target, strategy, (target, strategy, b), (target, strategy, a), b, a)
        for s in sources:  # against training from scratch at the same budget
            line(target, strategy, (target, strategy, s), (target, "scratch", "none"), s, "scratch")


if __name__ == "__main__":
    main()
