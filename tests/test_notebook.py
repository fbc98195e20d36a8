"""Executes `notebooks/quickstart.ipynb` on a tiny configuration so it never rots."""

from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_runs(monkeypatch):
  monkeypatch.setenv("SOO_QUICKSTART_TINY", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  repo = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [repo] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": repo}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "final training loss" in outputs
  assert "adam" in outputs
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors
