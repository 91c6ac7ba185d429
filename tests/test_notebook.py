"""notebooks/inspect_trials.ipynb runs top to bottom against the session's tune experiment (and the forgetting report
of its prerequisite run)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "inspect_trials.ipynb"

pytestmark = pytest.mark.slow


def test_inspect_trials_notebook_executes(tune_experiment, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    params[0].source = f"EXPERIMENT_DIR = {str(tune_experiment.exp_dir)!r}"
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))
    assert "exam@sel" in text and "baseline_raw_best" in text
    assert "forgetting and drift" in text and "KL base" in text
    assert images >= 6  # curves, scatter, Pareto, importances, forgetting (all, length)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
