"""The notebooks in analysis/ run top to bottom against a hand-made store and draw their figures."""

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
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the frontier and the other figures rendered inline
    text = "".join(o.get("text", "") for o in outputs)
    assert "on the frontier" in text and "1 failed" in text
    assert not list(tmp_path.glob("*.db"))  # read only: no store appeared beside the notebook
