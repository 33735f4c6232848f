"""docs/tutorial.ipynb runs from top to bottom (in a fresh kernel, in a temporary working directory), so the
tutorial cannot rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"
MISSING = [name for name in ("nbclient", "nbformat", "ipykernel") if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed (they are in the dev extra)")
def test_the_tutorial_notebook_runs(tmp_path, example_data_dir):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel inherits this process's environment, with the session's example data cache (conftest)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    run = tmp_path / "runs" / "tutorial" / "version_0"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "runs" / "evaluate" / "evaluation.csv").is_file()
    assert (tmp_path / "runs" / "embedding_pca.png").stat().st_size > 0
    outputs = "".join(str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
                      for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    assert "unimodality CrossModalSetup from runs/tutorial/version_0/checkpoints/best.ckpt" in outputs
    assert "(2018, 64)" in outputs  # the AnnData's embedding, one row per cell
    errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
              if o.output_type == "error"]
    assert not errors
