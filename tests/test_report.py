"""Aggregation of a sweep: intervals over seeds, paired differences, winners, and the report files,
checked against values computed by hand."""

import csv
import json
import math
import os

import pytest

from tlx import report, strategies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUADRANTS = os.path.join(ROOT, "configs", "quadrants.py")

T_975_DF2 = 4.302652729749  # t(0.975) with 2 degrees of freedom (tables: 4.303)
AXES = ["target", "size", "strategy", "seed"]


def rows_of(table: dict) -> list[dict]:
    """{(target, size, strategy): [acc by seed]} -> results.csv-like rows."""
    out = []
    for (target, size, strategy), accs in table.items():
        for seed, acc in enumerate(accs):
            if acc is not None:
                out.append(
                    {
                        "target": target,
                        "size": size,
                        "strategy": strategy,
                        "seed": seed,
                        "test_accuracy": acc,
                        "train_accuracy": 1.0,
                    }
                )
    return out


def test_t_interval_of_three_seeds_matches_the_textbook_formula():
    ci = report.t_interval([0.80, 0.85, 0.90])
    half = T_975_DF2 * 0.05 / math.sqrt(3)  # t * s / sqrt(n), s = 0.05 exactly
    assert ci["n"] == 3
    assert ci["mean"] == pytest.approx(0.85, abs=1e-12)
    assert ci["std"] == pytest.approx(0.05, abs=1e-12)
    assert ci["ci_low"] == pytest.approx(0.85 - half, abs=1e-9)
    assert ci["ci_high"] == pytest.approx(0.85 + half, abs=1e-9)
    assert half == pytest.approx(0.1242069, abs=1e-7)


def test_t_interval_of_one_seed_has_a_mean_and_no_spread():
    ci = report.t_interval([0.7])
    assert ci["mean"] == 0.7 and ci["n"] == 1
    assert math.isnan(ci["std"]) and math.isnan(ci["ci_low"]) and math.isnan(ci["ci_high"])


def test_summary_has_one_row_per_cell_over_seeds_with_train_accuracy_beside():
    rows = rows_of({("digits", "small", "none"): [0.80, 0.85, 0.90]})
    (s,) = report.summarize(rows, AXES)
    assert (s["target"], s["size"], s["strategy"], s["n"]) == ("digits", "small", "none", 3)
    assert s["ci_high"] - s["mean"] == pytest.approx(T_975_DF2 * 0.05 / math.sqrt(3), abs=1e-9)
    assert s["train_accuracy_mean"] == 1.0
    assert "seed" not in s


def test_paired_differences_use_the_common_seeds_and_say_which_is_better():
    rows = rows_of(
        {
            ("digits", "small", "a"): [0.90, 0.80, 0.70],
            ("digits", "small", "b"): [0.80, 0.75, 0.60, 0.99],  # seed 3 has no pair: ignored
            ("digits", "small", "c"): [0.88, 0.78, 0.66],
        }
    )
    pairs = {(p["a"], p["b"]): p for p in report.paired_differences(rows, AXES, "strategy")}
    assert set(pairs) == {("a", "b"), ("a", "c"), ("b", "c")}
    ab = pairs[("a", "b")]  # differences 0.10, 0.05, 0.10: mean 1/12, s = 0.05/sqrt(3)
    half = T_975_DF2 * (0.05 / math.sqrt(3)) / math.sqrt(3)
    assert ab["n"] == 3
    assert ab["mean_diff"] == pytest.approx(1 / 12, abs=1e-12)
    assert ab["ci_low"] == pytest.approx(1 / 12 - half, abs=1e-9)  # 0.0116 > 0
    assert ab["verdict"] == "a better"
    # differences 0.02, 0.02, 0.04: every seed favours a, yet with 3 seeds the interval
    # 0.02667 -+ 4.3027 * 0.011547 / sqrt(3) = [-0.0020, 0.0354] contains zero
    ac = pairs[("a", "c")]
    assert ac["mean_diff"] == pytest.approx(0.08 / 3, abs=1e-12)
    assert ac["ci_low"] == pytest.approx(-0.0020176, abs=1e-6)
    assert ac["verdict"] == "not different"
    bc = pairs[("b", "c")]  # differences -0.08, -0.03, -0.06: s = 0.025166, half = 0.062516
    assert bc["mean_diff"] == pytest.approx(-17 / 300, abs=1e-12)
    assert bc["ci_high"] == pytest.approx(-17 / 300 + 0.0625163, abs=1e-6)
    assert bc["verdict"] == "not different"


def test_when_the_second_of_a_pair_is_better_the_verdict_names_it():
    rows = rows_of(
        {
            ("digits", "small", "a"): [0.80, 0.75, 0.60],
            ("digits", "small", "b"): [0.88, 0.82, 0.67],
        }
    )
    (p,) = report.paired_differences(rows, AXES, "strategy")
    # differences -0.08, -0.07, -0.07: mean -0.07333, s = 0.0057735, half = 0.0143424
    assert p["ci_high"] == pytest.approx(-0.0733333 + 0.0143424, abs=1e-6)
    assert p["verdict"] == "b better"


def test_a_difference_whose_interval_contains_zero_is_not_different():
    rows = rows_of(
        {
            ("digits", "small", "a"): [0.82, 0.77, 0.84],
            ("digits", "small", "b"): [0.80, 0.80, 0.80],
        }
    )
    (p,) = report.paired_differences(rows, AXES, "strategy")
    # differences 0.02, -0.03, 0.04: mean 0.01, s = 0.0360555, half = 0.0895669
    assert p["mean_diff"] == pytest.approx(0.01, abs=1e-12)
    assert p["ci_low"] == pytest.approx(0.01 - 0.0895669, abs=1e-6)
    assert p["ci_high"] == pytest.approx(0.01 + 0.0895669, abs=1e-6)
    assert p["verdict"] == "not different"


def test_the_winner_is_chosen_on_validation_and_reported_on_test():
    rows = rows_of(
        {
            ("digits", "small", "a"): [0.90, 0.91, 0.92],  # best on test
            ("digits", "small", "b"): [0.80, 0.81, 0.82],  # best on validation
        }
    )
    for r in rows:
        r["val_accuracy"] = 0.7 if r["strategy"] == "b" else 0.6
    (w,) = report.winners(rows, AXES, "strategy")
    assert (w["winner"], w["runner_up"], w["chosen_on"]) == ("b", "a", "val_accuracy")
    assert w["winner_mean"] == pytest.approx(0.81)  # reported on test
    assert w["margin"] == pytest.approx(-0.10)  # the test margin of the val winner: negative


def test_the_winner_leaves_scratch_out_and_carries_its_paired_margin():
    rows = rows_of(
        {
            ("digits", "small", "none"): [0.80, 0.80, 0.80],
            ("digits", "small", "linear_probe"): [0.82, 0.77, 0.84],
            ("digits", "small", "scratch"): [0.95, 0.95, 0.95],
            ("digits", "large", "none"): [0.90, 0.80, 0.70],
            ("digits", "large", "linear_probe"): [0.80, 0.75, 0.60],
        }
    )
    win = {w["size"]: w for w in report.winners(rows, AXES, "strategy")}
    small = win["small"]
    assert (small["winner"], small["runner_up"]) == ("linear_probe", "none")
    assert small["margin"] == pytest.approx(2.43 / 3 - 0.80, abs=1e-12)
    # oriented as winner - runner-up: the negated interval of none - linear_probe
    assert small["margin_ci_high"] == pytest.approx(0.01 + 0.0895669, abs=1e-6)
    assert small["verdict"] == "not different"
    assert small["scratch_mean"] == pytest.approx(0.95)
    assert (win["large"]["winner"], win["large"]["verdict"]) == ("none", "none better")


def test_the_rule_of_thumb_is_checked_quadrant_by_quadrant_with_a_paired_gap():
    quadrant_axes = ["similarity", "size", "strategy", "seed"]
    table = {
        ("similar", "large", "freeze_most"): [0.9, 0.9, 0.9],  # the prescribed one wins
        ("similar", "large", "none"): [0.8, 0.8, 0.8],
        ("different", "large", "none"): [0.7, 0.7, 0.7],  # loses by 0.1 +- 0.248: a tie
        ("different", "large", "freeze_early"): [0.8, 0.9, 0.7],
        ("similar", "small", "linear_probe"): [0.5, 0.5, 0.5],  # loses by 0.11 +- 0.025
        ("similar", "small", "none"): [0.6, 0.61, 0.62],
        ("different", "small", "none"): [0.6, 0.6, 0.6],  # freeze_early not run: no row
    }
    rows = [
        {"similarity": sim, "size": size, "strategy": st, "seed": i, "test_accuracy": acc}
        for (sim, size, st), accs in table.items()
        for i, acc in enumerate(accs)
    ]
    got = {
        (r["similarity"], r["size"]): r for r in report.against_rule_of_thumb(rows, quadrant_axes)
    }
    assert set(got) == {("similar", "large"), ("different", "large"), ("similar", "small")}
    agree = got["similar", "large"]
    assert (agree["seed_table"], agree["winner"], agree["verdict"]) == (
        "freeze_most",
        "freeze_most",
        "agrees",
    )
    tie = got["different", "large"]
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert (tie["seed_table"], tie["winner"], tie["verdict"]) == (
        "none",
        "freeze_early",
        "not different",
    )
    assert tie["gap"] == pytest.approx(0.1, abs=1e-12)
    assert (tie["gap_ci_low"], tie["gap_ci_high"]) == pytest.approx((0.1 - half, 0.1 + half))
    lose = got["similar", "small"]
    assert (lose["seed_table"], lose["winner"], lose["verdict"]) == (
        "linear_probe",
        "none",
        "disagrees",
    )
    assert lose["gap"] == pytest.approx(0.11, abs=1e-12)
    assert lose["gap_ci_low"] == pytest.approx(0.11 - T_975_DF2 * 0.01 / math.sqrt(3))
    assert lose["seed_table_mean"] == pytest.approx(0.5)


def write_fake_sweep(workdir):
    """A results.csv over the 2x2 quadrants with metrics.jsonl files behind each cell."""
    rows = []
    for sim in ("similar", "different"):
        for size, k in (("small", 10), ("large", 0)):
            for strategy, frozen in (("none", 0), ("linear_probe", 3), ("scratch", 0)):
                for seed in range(3):
                    run = f"{sim}{size}{strategy}{seed}"
                    acc = 0.5 + 0.1 * frozen * (sim == "similar") + 0.01 * seed
                    rows.append(
                        {
                            "target": "fractals" if sim == "similar" else "digits",
                            "similarity": sim,
                            "size": size,
                            "examples_per_class": k,
                            "strategy": strategy,
                            "seed": seed,
                            "test_accuracy": acc,
                            "val_accuracy": acc,
                            "train_accuracy": 0.99,
                            "frozen_stages": frozen,
                            "train_examples": 100 if k else 2000,
                            "num_classes": 10,
                            "run": run,
                        }
                    )
                    os.makedirs(workdir / "runs" / run)
                    with open(workdir / "runs" / run / "metrics.jsonl", "w") as f:
                        for step in (10, 20):
                            f.write(json.dumps({"step": step, "loss": 1 / step, "accuracy": 0.5}))
                            f.write("\n")
    with open(workdir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_report_writes_tables_and_each_plot_the_study_declares_with_the_csv_behind_it(tmp_path):
    write_fake_sweep(tmp_path)
    written = report.write_study_report(str(tmp_path), study=QUADRANTS)
    names = {os.path.relpath(p, tmp_path) for p in written}
    assert {"summary.csv", "paired.csv", "winners.csv", "report.md"} <= names
    for plot in (
        "winner_heatmap",
        "accuracy_vs_frozen_stages",
        "accuracy_vs_examples_per_class",
        "learning_curves",
    ):
        assert f"plots/{plot}.png" in names
        assert os.path.getsize(tmp_path / "plots" / f"{plot}.png") > 1000
        assert (tmp_path / "plots" / f"{plot}.csv").exists()
    heat, _ = report.read_results(str(tmp_path / "plots" / "winner_heatmap.csv"))
    by_cell = {(h["similarity"], h["size"]): h["winner"] for h in heat}
    assert by_cell[("similar", "small")] == "linear_probe"  # scratch never wins: a baseline
    assert by_cell[("different", "large")] == "none"  # equal means: the first seen
    md = (tmp_path / "report.md").read_text()
    assert "## Winner per condition" in md and "## Paired differences" in md
    assert "## The seed's table against the measurement" in md
    # similar linear_probe: 0.80, 0.81, 0.82 -> 81.0 +- t(0.975, 2) * 0.01 / sqrt(3) = 2.48 pp
    assert "| fractals | similar | small | 10 | 51.0 ± 2.5 | 81.0 ± 2.5 | 51.0 ± 2.5 |" in md
    seed, _ = report.read_results(str(tmp_path / "seed_table.csv"))
    # freeze_most / freeze_early were not run here: only the two quadrants they are not needed for
    assert {(r["similarity"], r["size"], r["verdict"]) for r in seed} == {
        ("similar", "small", "agrees"),
        ("different", "large", "agrees"),
    }


def test_a_metrics_line_cut_by_a_kill_is_skipped_and_named(tmp_path, capsys):
    write_fake_sweep(tmp_path)
    rows, axes = report.read_results(str(tmp_path))
    path = tmp_path / "runs" / str(rows[0]["run"]) / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 30, "loss": 0.0')  # a kill mid-line
    curves = report.learning_curves(str(tmp_path), rows, axes)
    assert {c["step"] for c in curves} == {10, 20}
    assert f"{path}:3: not JSON, skipped" in capsys.readouterr().err


def counted_rows(table: dict) -> list[dict]:
    """{(target, size, strategy): (trained, frozen, [acc by seed])} -> results.csv-like rows with
    parameter counts; `trained` is one count, or one per seed."""
    out = []
    for (target, size, strategy), (trained, frozen, accs) in table.items():
        for seed, acc in enumerate(accs):
            out.append(
                {
                    "target": target,
                    "size": size,
                    "strategy": strategy,
                    "seed": seed,
                    "test_accuracy": acc,
                    "params_trainable": trained[seed] if isinstance(trained, list) else trained,
                    "params_frozen": frozen,
                }
            )
    return out


def test_the_registry_tags_presets_peft_strategies_and_the_baseline():
    assert strategies.tagged("preset") == [
        *("none", "linear_probe", "freeze_most", "freeze_early", "freeze_stages")
    ]
    assert strategies.tagged("peft") == ["adapter", "bitfit", "lora", "vpt"]  # registration order
    assert strategies.tagged("baseline") == ["scratch"]


def test_peft_strategies_and_their_variants_are_told_from_freezing_presets():
    assert report.is_peft("vpt_deep") and report.is_peft("lora") and report.is_peft("bitfit")
    assert not report.is_peft("linear_probe")
    assert not report.is_peft("freeze_most") and not report.is_peft("scratch")


def test_the_trained_fraction_is_the_mean_trained_count_over_all_parameters():
    rows = counted_rows(
        {
            ("digits", "small", "lora"): ([100, 110, 120], 890, [0.80, 0.85, 0.90]),
            ("digits", "small", "linear_probe"): (50, 950, [0.70, 0.70, 0.70]),
        }
    )
    lora, probe = report.trained_fractions(rows, AXES)
    half = T_975_DF2 * 0.05 / math.sqrt(3)  # 0.1242069
    assert (lora["target"], lora["size"], lora["strategy"]) == ("digits", "small", "lora")
    assert "seed" not in lora
    assert (lora["params_trainable"], lora["params_frozen"]) == (110.0, 890.0)
    assert lora["trained_fraction"] == pytest.approx(110 / 1000, abs=1e-15)
    assert lora["n"] == 3
    assert lora["mean"] == pytest.approx(0.85, abs=1e-12)
    assert (lora["ci_low"], lora["ci_high"]) == pytest.approx((0.85 - half, 0.85 + half), abs=1e-9)
    assert probe["trained_fraction"] == pytest.approx(0.05, abs=1e-15)
    assert (probe["ci_low"], probe["ci_high"]) == pytest.approx((0.70, 0.70), abs=1e-12)


def test_rows_without_parameter_counts_have_no_trained_fractions():
    rows = rows_of({("digits", "small", "lora"): [0.80, 0.85, 0.90]})
    assert report.trained_fractions(rows, AXES) == []
    assert report.trained_fractions([], AXES) == []
    # A mix (an older run first): only the counted rows make fractions, whatever their order.
    counted = counted_rows({("digits", "small", "bitfit"): (10, 990, [0.6, 0.7, 0.8])})
    (bitfit,) = report.trained_fractions(rows + counted, AXES)
    assert bitfit["strategy"] == "bitfit" and bitfit["trained_fraction"] == pytest.approx(0.01)


def test_the_fraction_table_has_a_column_per_condition_and_spans_differing_head_sizes():
    # The head of a 7-class target is larger than that of a 5-class one: the count is a range.
    rows = counted_rows(
        {
            ("digits", "small", "lora"): (5, 95, [0.80, 0.85, 0.90]),
            ("fractals", "small", "lora"): (7, 93, [0.70, 0.70, 0.70]),
            ("digits", "small", "linear_probe"): (3, 97, [0.60]),
            ("fractals", "small", "linear_probe"): (3, 97, [0.50]),
        }
    )
    table = report.fraction_table(report.trained_fractions(rows, AXES), "strategy")
    assert table == [
        {
            "strategy": "lora",
            "params_trainable": "5-7",
            "trained_%": "5-7",
            "digits/small": "85.0 ± 12.4",  # t(0.975, 2) * 0.05 / sqrt(3) = 0.1242
            "fractals/small": "70.0 ± 0.0",
        },
        {
            "strategy": "linear_probe",
            "params_trainable": "3",
            "trained_%": "3",
            "digits/small": "60.0",  # one seed: no interval
            "fractals/small": "50.0",
        },
    ]


def write_fake_peft_sweep(workdir, strategies: dict):
    """A results.csv over two similarity quadrants, 3 seeds, with parameter counts, and the
    metrics.jsonl files behind it. strategies: {name: {similarity: (trained, frozen, [acc])}}."""
    rows = []
    for strategy, by_sim in strategies.items():
        for sim, (trained, frozen, accs) in by_sim.items():
            for seed, acc in enumerate(accs):
                run = f"{sim}{strategy}{seed}"
                rows.append(
                    {
                        "similarity": sim,
                        "size": "small",
                        "strategy": strategy,
                        "seed": seed,
                        "test_accuracy": acc,
                        "val_accuracy": acc,
                        "train_accuracy": 0.99,
                        "params_trainable": trained,
                        "params_frozen": frozen,
                        "run": run,
                    }
                )
                os.makedirs(workdir / "runs" / run)
                with open(workdir / "runs" / run / "metrics.jsonl", "w") as f:
                    f.write(json.dumps({"step": 10, "loss": 0.5, "accuracy": 0.5}) + "\n")
    with open(workdir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


PEFT_REPORT = {
    "compare": "strategy",
    "plots": [{"plot": "accuracy_vs_trained_fraction", "facet": ["similarity", "size"]}],
}


def test_a_report_with_peft_strategies_puts_accuracy_against_the_trained_share(tmp_path):
    write_fake_peft_sweep(
        tmp_path,
        {
            "linear_probe": {"similar": (50, 950, [0.7] * 3), "different": (25, 975, [0.5] * 3)},
            "lora": {"similar": (100, 900, [0.80, 0.85, 0.90]), "different": (80, 920, [0.6] * 3)},
            "vpt_deep": {"similar": (60, 940, [0.75] * 3), "different": (35, 965, [0.55] * 3)},
        },
    )
    written = report.write_study_report(str(tmp_path), study=PEFT_REPORT)
    names = {os.path.relpath(p, tmp_path) for p in written}
    assert {"trained_fraction.csv", "plots/accuracy_vs_trained_fraction.png"} <= names
    assert os.path.getsize(tmp_path / "plots" / "accuracy_vs_trained_fraction.png") > 1000
    fractions, columns = report.read_results(str(tmp_path / "trained_fraction.csv"))
    assert columns == [
        *("similarity", "size", "strategy", "params_trainable", "params_frozen"),
        *("trained_fraction", "n", "mean", "std", "ci_low", "ci_high"),
    ]
    got = {(r["similarity"], r["strategy"]): r["trained_fraction"] for r in fractions}
    assert got == {
        ("similar", "linear_probe"): 0.05,
        ("different", "linear_probe"): 0.025,
        ("similar", "lora"): 0.1,
        ("different", "lora"): 0.08,
        ("similar", "vpt_deep"): 0.06,
        ("different", "vpt_deep"): 0.035,
    }
    plotted, _ = report.read_results(str(tmp_path / "plots" / "accuracy_vs_trained_fraction.csv"))
    assert plotted == fractions
    md = (tmp_path / "report.md").read_text()
    assert "## Test accuracy (%) against the trained share of the parameters, by strategy" in md
    assert (
        "| strategy | params_trainable | trained_% | similar/small | different/small |\n"
        "|---|---|---|---|---|\n"
        "| linear_probe | 25-50 | 2.5-5 | 70.0 ± 0.0 | 50.0 ± 0.0 |\n"
        "| lora | 80-100 | 8-10 | 85.0 ± 12.4 | 60.0 ± 0.0 |\n"
        "| vpt_deep | 35-60 | 3.5-6 | 75.0 ± 0.0 | 55.0 ± 0.0 |\n"
    ) in md


def test_a_report_without_peft_strategies_has_no_trained_share(tmp_path):
    write_fake_peft_sweep(
        tmp_path,
        {
            "linear_probe": {"similar": (50, 950, [0.7] * 3)},
            "none": {"similar": (1000, 0, [0.8] * 3)},
        },
    )
    written = report.write_study_report(str(tmp_path), study=PEFT_REPORT)
    names = {os.path.relpath(p, tmp_path) for p in written}
    assert "trained_fraction.csv" not in names
    assert not (tmp_path / "plots" / "accuracy_vs_trained_fraction.png").exists()
    assert "trained share" not in (tmp_path / "report.md").read_text()


def test_a_study_without_a_report_gets_summaries_comparisons_and_learning_curves(tmp_path):
    write_fake_sweep(tmp_path)
    written = report.write_study_report(str(tmp_path))
    names = {os.path.relpath(p, tmp_path) for p in written}
    assert names == {
        *("summary.csv", "paired.csv", "winners.csv", "report.md"),
        "plots/learning_curves.png",
    }


def test_a_results_csv_alone_is_reported_without_learning_curves_and_says_so(tmp_path, capsys):
    write_fake_sweep(tmp_path)
    for run in os.listdir(tmp_path / "runs"):
        os.remove(tmp_path / "runs" / run / "metrics.jsonl")
        os.rmdir(tmp_path / "runs" / run)
    os.rmdir(tmp_path / "runs")
    written = report.write_study_report(str(tmp_path), study=QUADRANTS)
    assert "plots/winner_heatmap.png" in {os.path.relpath(p, tmp_path) for p in written}
    assert not (tmp_path / "plots" / "learning_curves.png").exists()
    assert f"{tmp_path}/runs/ not here: no learning curves" in capsys.readouterr().err


def test_a_report_naming_an_axis_the_results_lack_is_one_error(tmp_path):
    write_fake_sweep(tmp_path)
    with pytest.raises(ValueError, match=r"has no axis \['treatment'\]"):
        report.write_study_report(str(tmp_path), study={"compare": "treatment"})


@pytest.mark.parametrize(
    "name, spec",
    [
        ("peft", "configs/peft.py:image_size=16,steps=100,batch_size=32"),
        ("yosinski", "configs/yosinski.py"),
    ],
)
def test_the_committed_tables_are_what_the_reporter_makes_of_the_committed_results(
    tmp_path, name, spec
):
    """experiments/results/NAME/ (written by `make ablations`) from its results.csv and
    dependencies.csv alone: every table byte for byte (the plots' CSVs too)."""
    committed = os.path.join(ROOT, "experiments", "results", name)
    for f in ("results.csv", "dependencies.csv"):
        with open(os.path.join(committed, f)) as src, open(tmp_path / f, "w") as dst:
            dst.write(src.read())
    written = report.write_study_report(str(tmp_path), study=os.path.join(ROOT, spec))
    tables = [p for p in written if p.endswith((".csv", ".md"))]
    tables += [p[:-4] + ".csv" for p in written if p.endswith(".png")]
    assert len(tables) >= 5  # summary, paired, winners, report.md and a plot at least
    for path in tables:
        rel = os.path.relpath(path, tmp_path)
        with open(path) as got, open(os.path.join(committed, rel)) as want:
            assert got.read() == want.read(), rel


def test_the_report_command_takes_the_study_file_and_prints_the_paths(tmp_path, capsys):
    from tlx.report.__main__ import main

    write_fake_sweep(tmp_path)
    assert main([str(tmp_path), f"--study={QUADRANTS}"]) == 0
    assert f"{tmp_path}/plots/winner_heatmap.png" in capsys.readouterr().out.split()


def test_the_report_command_says_in_one_line_what_is_wrong(tmp_path, capsys):
    from tlx.report.__main__ import main

    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tlx.report: FileNotFoundError:") and err.count("\n") == 1


def test_holm_multiplies_the_ith_smallest_p_by_m_minus_i_plus_1_and_keeps_the_order():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> monotone: 0.06
    got = report.stats.holm([0.01, 0.04, 0.03, 0.005])
    assert got == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert report.stats.holm([0.5, 0.6]) == [1.0, 1.0]


def test_tost_is_the_larger_one_sided_p_against_the_margin():
    # mean 0, s = 0.01, se = 0.01 / sqrt(3): t = 0.01 / se = sqrt(3) on 2 degrees of freedom,
    # whose cdf is 1/2 + t / (2 sqrt(2 + t^2)): p = 1/2 - sqrt(3) / (2 sqrt(5)) on both sides
    got = report.stats.tost([0.0, 0.01, -0.01], margin=0.01)
    assert got["p"] == pytest.approx(0.5 - math.sqrt(3) / (2 * math.sqrt(5)), abs=1e-12)
    assert report.stats.tost([0.001, -0.001] * 5, margin=0.01)["p"] < 1e-6  # equivalent
    assert report.stats.tost([0.02, 0.021, 0.019], margin=0.01)["p"] > 0.5  # 2 pp: not
    assert math.isnan(report.stats.tost([0.01], margin=0.01)["p"])


def test_regret_is_against_the_oracle_chosen_on_validation_with_a_bootstrap_over_conditions():
    def row(size, strategy, test, val):
        return {"size": size, "strategy": strategy, "seed": 0, "test_accuracy": test,
                "val_accuracy": val}  # fmt: skip

    rows = [
        row("small", "none", 0.70, 0.80),  # the oracle here (validation), and the rule's pick
        row("small", "linear_probe", 0.75, 0.70),  # better on test, but not chosen: no regret
        row("large", "none", 0.90, 0.90),  # the oracle
        row("large", "linear_probe", 0.80, 0.85),  # the rule's pick: 0.1 regret
    ]
    rule = {"small": "none", "large": "linear_probe"}
    got = report.stats.regret(
        rows, ["size", "strategy", "seed"], "strategy", lambda c: rule[c["size"]]
    )
    by_size = {c["size"]: c for c in got["conditions"]}
    assert by_size["small"]["oracle"] == "none" and by_size["small"]["regret"] == 0.0
    assert by_size["large"]["regret"] == pytest.approx(0.1, abs=1e-12)
    assert got["mean"] == pytest.approx(0.05, abs=1e-12)
    assert 0.0 <= got["ci_low"] <= got["mean"] <= got["ci_high"] <= 0.1 + 1e-12
    with pytest.raises(ValueError, match="picks 'lora'"):
        report.stats.regret(rows, ["size", "strategy", "seed"], "strategy", lambda c: "lora")
