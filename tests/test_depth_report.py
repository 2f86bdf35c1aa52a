"""The freeze-depth benchmark's statistics (tlx.report.depth) on hand-made results whose answers
are known: the oracle is chosen on validation and never on test, regrets and hits, Holm and
equivalence verdicts, the grid-edge share, and the report's files."""

import csv
import math
import os

import pytest

from tlx.report import depth

S = 2  # depths 0, 1, 2


def row(target, size, d, seed, test, val, wall=1.0):
    return {
        "target": target,
        "size": size,
        "depth": d,
        "max_depth": S,
        "seed": seed,
        "test_accuracy": test,
        "val_accuracy": val,
        "wall_s": wall,
        "cell_wall_s": wall,
        "grid_size": 1,
    }


def test_the_oracle_is_chosen_on_validation_not_test():
    cell = {
        0: row("t", 10, 0, 0, test=0.9, val=0.5),
        1: row("t", 10, 1, 0, test=0.6, val=0.7),
        2: row("t", 10, 2, 0, test=0.7, val=0.6),
    }
    assert depth.oracle_depth(cell) == 1
    assert depth.oracle_depth(cell, "test_accuracy") == 0


def test_a_validation_tie_goes_to_the_deeper_cheaper_depth():
    cell = {d: row("t", 10, d, 0, test=0.5 + d / 10, val=0.8) for d in range(S + 1)}
    assert depth.oracle_depth(cell) == S


def test_regret_and_hits_on_a_known_table():
    # Two cells. Oracle (on val): depth 1 in cell A, depth 2 in cell B.
    rows = [
        row("a", 10, 0, 0, test=0.50, val=0.1),
        row("a", 10, 1, 0, test=0.80, val=0.9),
        row("a", 10, 2, 0, test=0.70, val=0.2),
        row("b", 10, 0, 0, test=0.40, val=0.1),
        row("b", 10, 1, 0, test=0.60, val=0.2),
        row("b", 10, 2, 0, test=0.90, val=0.9),
    ]
    table = {r["rule"]: r for r in depth.regret_table(rows)}
    assert table["constant_1"]["regret_pp"] == pytest.approx((0 + 30) / 2)
    assert table["constant_1"]["hits"] == 1
    assert table["constant_0"]["regret_pp"] == pytest.approx((30 + 50) / 2)
    assert table["constant_0"]["hits"] == 0
    # small (10/class): the seed's table says linear probe (S) if similar, depth 1 if not
    assert table["seed_table_similar"]["regret_pp"] == pytest.approx((10 + 0) / 2)
    assert table["seed_table_different"]["regret_pp"] == pytest.approx(15)
    assert table["size_only"]["regret_pp"] == pytest.approx(15)  # small -> S - 1 = 1
    assert all(r["cells"] == 2 for r in table.values())


def test_a_cell_missing_a_depth_is_left_out():
    rows = [row("a", 10, d, 0, 0.5, 0.5) for d in range(S + 1)] + [row("b", 10, 0, 0, 0.5, 0.5)]
    assert list(depth.cells(rows)) == [("a", 10, 0)]


def test_bootstrap_interval_of_the_mean():
    low, high = depth.bootstrap_mean([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert low < 3.5 < high
    assert depth.bootstrap_mean([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert all(math.isnan(v) for v in depth.bootstrap_mean([1.0]))


def _seeds(d, tests, val):
    return [row("t", 10, d, s, test=t, val=val) for s, t in enumerate(tests)]


def test_against_winner_separates_worse_equivalent_and_not_different():
    rows = (
        _seeds(2, [0.800, 0.810, 0.790, 0.805, 0.795], val=0.9)  # the winner on val
        + _seeds(1, [0.801, 0.809, 0.791, 0.806, 0.794], val=0.8)  # within 0.1 pp: equivalent
        + _seeds(0, [0.600, 0.620, 0.580, 0.610, 0.590], val=0.7)  # 20 pp below: worse
        + _seeds("scratch", [0.75, 0.95, 0.55, 0.85, 0.65], val=0.5)  # noisy: not different
    )
    out = {r["depth"]: r for r in depth.against_winner(rows)}
    assert set(out) == {0, 1, "scratch"} and out[0]["winner"] == 2
    assert out[0]["verdict"] == "worse"
    assert out[1]["verdict"] == "equivalent"
    assert out["scratch"]["verdict"] == "not different"
    # Holm: the adjusted p is at least the raw one, and the smallest is multiplied by m = 3
    assert all(r["p_holm"] >= r["p"] for r in out.values())
    smallest = min(out.values(), key=lambda r: r["p"])
    assert smallest["p_holm"] == pytest.approx(min(1.0, 3 * smallest["p"]))


def test_grid_edge_share():
    grid = [{"optim.lr": 1e-4}, {"optim.lr": 3e-4}, {"optim.lr": 1e-3}]
    choices = [
        {"grid": grid, "chosen": {"optim.lr": 3e-4}},
        {"grid": grid, "chosen": {"optim.lr": 1e-3}},
        {"grid": grid, "chosen": {"optim.lr": 1e-4}},
        {"grid": grid, "chosen": {"optim.lr": 3e-4}},
    ]
    assert depth.grid_edges(choices) == {"choices": 4, "on_edge": 2, "share": 0.5}


def test_run_seconds_prefers_single_runs_and_amortises_a_grid():
    grid_row = {**row("t", 10, 1, 0, 0.5, 0.5), "grid_size": 3, "cell_wall_s": 30.0}
    single = {**row("t", 10, 1, 1, 0.5, 0.5), "wall_s": 12.0}
    assert depth.run_seconds([grid_row, single]) == 12.0
    assert depth.run_seconds([grid_row]) == 10.0


def test_write_depth_report(tmp_path):
    rows = [
        row(t, 10, d, s, test=0.5 + 0.1 * d + 0.01 * s, val=0.5 + 0.1 * d)
        for t in ("a", "b")
        for d in (0, 1, 2, "scratch")
        if not (d == "scratch")
        for s in range(3)
    ] + [row("a", 10, "scratch", s, 0.3 + 0.01 * s, 0.3) for s in range(3)]
    for r in rows:
        r["optim.lr"] = 3e-3
    with open(tmp_path / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cells = [
        {
            "name": "a/10/1/0",
            "axes": {"target": "a", "size": 10, "depth": 1, "max_depth": S, "seed": 0},
            "grid": [{"optim.lr": 1e-3}, {"optim.lr": 3e-3}],
        },
    ]
    written = depth.write_depth_report(str(tmp_path), cells)
    names = {os.path.basename(p) for p in written}
    assert {"regret.csv", "oracle.csv", "depth_report.md", "accuracy_vs_depth.png"} <= names
    report = (tmp_path / "depth_report.md").read_text()
    assert "6 complete cells" in report
    assert "constant_2" in report
    assert "grid edge: 1 of 1 (100%)" in report  # chose 3e-3, the top of (1e-3, 3e-3)
