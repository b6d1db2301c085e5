"""The notebooks in analysis/ run top to bottom against a hand-made store, draw their figures, show tables
formatted as the command line prints them, and print no warning."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from test_analysis_store import STUDY, shared_store

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return shared_store(tmp_path_factory)


@pytest.mark.parametrize("name", ["frontier.ipynb", "compare.ipynb"])
def test_notebook_runs_on_a_store(name, store, tmp_path, monkeypatch):
    # The first cell reads these, so the notebook itself is run unchanged.
    monkeypatch.setenv("MMSCALE_TRACKING_URI", store.uri)
    monkeypatch.setenv("MMSCALE_EXPERIMENT", STUDY)
    monkeypatch.setenv("MMSCALE_EXPERIMENTS", STUDY)
    nb = nbformat.read(ANALYSIS / name, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    # no warning (MLflow's import of tqdm.auto warned in the first cell) nor anything else on stderr
    assert not [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert "Warning" not in "".join(o.get("text", "") + str(o.get("data", "")) for o in outputs)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the frontier scatter and the other figures rendered inline
    text = "".join(o.get("text", "") for o in outputs)
    assert "on the frontier" in text and "1 failed" in text
    # tables read as the command line prints them: tiny costs in scientific notation, counts with separators,
    # no row index; the frontier's table names its trials and shows text_score
    html = "".join(o["data"].get("text/html", "") for o in outputs if "data" in o)
    assert "2.00e-04" in html and "36,864" in html and "0.000200" not in html and "36864.0" not in html
    frontier_table = next(o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})
                          and "run_name" in o["data"]["text/html"] and "score" in o["data"]["text/html"])
    assert "0.3m r8 a16 lr3e-3" in frontier_table and "text_score" in frontier_table
    assert "<th></th>" not in frontier_table  # no index column
    if name == "frontier.ipynb":  # the trials logged a forecast: it is shown against the measured cost
        assert "gpu_hours_ratio" in html and "1.25" in html
    assert not list(tmp_path.glob("*.db"))  # read only: no store appeared beside the notebook
