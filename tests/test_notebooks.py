"""The notebooks execute top to bottom on a fresh kernel (offline, small data) and produce what they promise."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, workdir: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # "python3" is the native kernel of the current interpreter (ipykernel), found without `ipykernel install`.
    client = NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    client.execute(env={**os.environ, "OMP_NUM_THREADS": "1"})  # a busy machine makes more threads slower
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(
        out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
    )


@pytest.mark.parametrize("name", ["quickstart.ipynb", "inside_hkt.ipynb"])
def test_notebook_is_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


def test_quickstart(tmp_path):
    text = outputs(execute("quickstart.ipynb", tmp_path))
    assert "parent: 172,218 parameters" in text and "HKT child: 4,934 parameters" in text
    assert "child alone: test top-1" in text and "hkt/loss_parent_head" in text
    assert "hkt_config.json" in text and "parent:" in text
    assert (tmp_path / "hkt-child" / "model.safetensors").is_file()


def test_inside_hkt(tmp_path):
    text = outputs(execute("inside_hkt.ipynb", tmp_path))
    assert "resnet.layer2=resnet.layer2" in text and "classifier:input=classifier:input" in text
    assert "HKT child test top-1" in text
    assert (tmp_path / "inside_hkt.png").stat().st_size > 10_000
