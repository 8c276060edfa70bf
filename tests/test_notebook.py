"""The usage notebook runs top to bottom, offline, on the tiny generated dataset."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

PROJECT_DIR = Path(__file__).resolve().parents[1]
NOTEBOOK = PROJECT_DIR / "examples" / "usage_example.ipynb"


def test_notebook_is_stored_small_and_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert NOTEBOOK.stat().st_size < 300_000
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.slow
def test_notebook_runs_offline_on_local_data(tiny_parquet_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setenv("CIFAR100_DATASET", str(tiny_parquet_dir))
    monkeypatch.setenv("EXAMPLE_TRAIN_SAMPLES", "64")
    monkeypatch.setenv("EXAMPLE_EVAL_SAMPLES", "16")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PROJECT_DIR), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    outputs = "\n".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert f"Using CIFAR100_DATASET = {tiny_parquet_dir}" in outputs
    assert "fine_accuracy" in outputs and "coarse_accuracy" in outputs
    model_dir = tmp_path / "outputs" / "usage-example"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "eval_report.md").is_file()
    assert (model_dir / "validation-report" / "superclass_accuracy.png").is_file()
