"""A study file's vocabulary (`tlx.study`): loading one, its cells' and its report's checks, and
what one run of a cell trains with."""

import os

import pytest

from tlx import report, study, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = ("quadrants", "yosinski", "source_scale", "peft")


def test_a_study_file_with_a_syntax_error_is_one_error_naming_file_and_line(tmp_path):
    path = tmp_path / "bad_study.py"
    path.write_text("def get_sweep(arg=None):\n    return [\n        {'name': 'a',, }\n    ]\n")
    with pytest.raises(ValueError, match=rf"^{path}:3: syntax error in the study file"):
        study.load_study(str(path))


def test_the_sweep_command_prints_the_syntax_error_in_one_line(tmp_path, capsys):
    path = tmp_path / "bad_study.py"
    path.write_text("def get_sweep(arg=None)\n    return []\n")
    assert sweep.main([f"--config={path}", f"--workdir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:1: syntax error in the study file" in err


def test_a_run_config_is_not_a_study(tmp_path):
    with pytest.raises(ValueError, match="declares no get_sweep"):
        study.load_study(os.path.join(ROOT, "configs", "finetune.py"))


@pytest.mark.parametrize("name", STUDIES)
def test_every_committed_study_declares_a_report_that_checks(name):
    declared = study.load_report(os.path.join(ROOT, "configs", f"{name}.py"))
    assert declared["compare"] in ("strategy", "treatment")
    assert declared["plots"] and all(p["plot"] in study.PLOT_OPTIONS for p in declared["plots"])


def test_the_report_schema_names_exactly_the_plots_the_reporter_draws():
    assert set(study.PLOT_OPTIONS) == set(report.PLOTS)


def test_a_report_with_an_unknown_key_plot_or_option_is_one_error_naming_it():
    with pytest.raises(ValueError, match=r"unknown keys \['axes'\]"):
        study.check_report({"axes": ["size"]})
    with pytest.raises(ValueError, match="plot 'violin' is unknown"):
        study.check_report({"plots": [{"plot": "violin"}]})
    with pytest.raises(ValueError, match=r"no option\(s\) \['colour'\]"):
        study.check_report({"plots": [{"plot": "learning_curves", "colour": "red"}]})
    with pytest.raises(ValueError, match=r"give \['cols'\]"):
        study.check_report({"plots": [{"plot": "winner_heatmap", "rows": "size"}]})
    with pytest.raises(ValueError, match="set compare='strategy'"):
        study.check_report({"compare": "treatment", "rule_of_thumb": True})


def test_a_report_gets_its_defaults():
    assert study.check_report({}) == {"compare": None, "rule_of_thumb": False, "plots": []}


def test_a_run_of_a_cell_takes_its_overrides_then_the_grid_point_then_init_from():
    cell = {"overrides": {"optim.lr": 0.1, "data.image_size": 16}}
    assert study.run_overrides(cell, {"optim.lr": 0.2}, "sweep:abc") == {
        "optim.lr": 0.2,
        "data.image_size": 16,
        "progress": False,
        "tensorboard": False,
        "init_from": "sweep:abc",
    }
    assert "init_from" not in study.run_overrides({}, {})


def test_cells_with_a_dangling_reference_or_an_unknown_key_are_refused():
    with pytest.raises(ValueError, match="init_from='src' names no cell"):
        study.check_cells([{"name": "a", "config": "x", "init_from": "src"}])
    with pytest.raises(ValueError, match="unknown keys"):
        study.check_cells([{"name": "a", "config": "x", "seeds": 3}])
