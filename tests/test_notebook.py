"""experiments/ablation.ipynb runs headless on a finished tiny sweep, start to end."""

import os

import nbformat
import pytest
from nbclient import NotebookClient
from test_sweep import ROOT, tiny_sweep

NOTEBOOK = os.path.join(ROOT, "experiments", "ablation.ipynb")


@pytest.mark.slow
def test_the_ablation_notebook_runs_on_a_finished_sweep_and_shows_its_tables_and_plots(
    tmp_path_factory, monkeypatch
):
    sweep_dir = tiny_sweep(tmp_path_factory)
    monkeypatch.setenv("TLX_SWEEP_DIR", sweep_dir)  # the kernel inherits this environment
    monkeypatch.setenv("TLX_NOTEBOOK_STEPS", "6")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    ).execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # heatmap, frozen stages, examples per class, curves, the run's loss
    tables = "".join(o["data"].get("text/markdown", "") for o in outputs if "data" in o)
    assert "| winner |" in tables.replace("winner | runner_up", "winner |")
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "test_accuracy" in printed and "params_frozen" in printed


STRATEGY_NOTEBOOK = os.path.join(ROOT, "experiments", "strategies.ipynb")


@pytest.mark.slow
def test_a_strategy_defined_in_one_notebook_cell_fine_tunes_and_sweeps(monkeypatch):
    """experiments/strategies.ipynb: BitFit registered in one cell, trained, swept; no tlx edit."""
    monkeypatch.setenv("TLX_NOTEBOOK_STEPS", "6")
    monkeypatch.setenv("TLX_PRETRAIN_STEPS", "10")
    nb = nbformat.read(STRATEGY_NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "'my_bitfit'" in printed
    assert "frozen kernels unchanged" in printed
    tables = "".join(o["data"].get("text/markdown", "") for o in outputs if "data" in o)
    assert "my_bitfit" in tables and "linear_probe" in tables
