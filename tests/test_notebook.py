"""The quickstart notebook runs top to bottom on the embedded model (so it never goes stale)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow  # about 100 s: it runs the whole quickstart on SmolLM2 (the CLI and API tests cover its calls)
def test_quickstart_notebook_runs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    assert not any(o.get("output_type") == "error" for cell in nb.cells for o in cell.get("outputs", []))
    printed = ["".join(o.get("text", "") for o in c.get("outputs", [])) for c in nb.cells if c.cell_type == "code"]
    generate_cell = next(p for p in printed if "tok/s" in p)
    assert generate_cell.startswith("' Paris")  # the greedy continuation of "The capital of France is"
    assert printed[-1].startswith("' Paris")  # the jitted call inside the user's own function agrees
