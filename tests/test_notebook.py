"""The usage notebook: stored executed (small, figures inline), and it runs top to bottom offline, on a local
folder or, with neither the Hub nor a local copy, on generated images."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

PROJECT_DIR = Path(__file__).resolve().parents[1]
NOTEBOOK = PROJECT_DIR / "examples" / "usage_example.ipynb"
DATA_CELL = 5  # the cell that chooses the data source and prepares the splits


def all_text(notebook: nbformat.NotebookNode) -> str:
    """Every stream and text/plain output of the code cells."""
    return "\n".join(
        output.get("text", "") + output.get("data", {}).get("text/plain", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def offline_kernel_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No Hub, an empty datasets cache, the project importable from the kernel."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setenv("EXAMPLE_TRAIN_SAMPLES", "64")
    monkeypatch.setenv("EXAMPLE_EVAL_SAMPLES", "16")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PROJECT_DIR), os.environ.get("PYTHONPATH")])))


def test_notebook_is_stored_small_and_executed():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert NOTEBOOK.stat().st_size < 300_000
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "executed top to bottom"
    outputs = [output for cell in code for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 3, "the figures are stored inline"
    text = all_text(notebook)
    assert "fine_accuracy" in text and "evaluate_saved_model" in text and "USING SMALL GENERATED IMAGES" in text
    code_text = "\n".join(cell.source for cell in code)
    assert 'pipeline("hierarchical-image-classification"' in code_text and "min_confidence" in code_text
    assert "min_confidence 0.9: abstain -> unknown" in text, "a selective answer is shown"
    assert "IProgress" not in text and "widget" not in str(notebook.metadata)
    assert "/tmp/" not in text and "/work/" not in text, "outputs show relative paths only"


@pytest.mark.slow
def test_notebook_runs_offline_on_local_data(tiny_parquet_dir, tmp_path, monkeypatch):
    offline_kernel_env(monkeypatch, tmp_path)
    monkeypatch.setenv("CIFAR100_DATASET", str(tiny_parquet_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    outputs = all_text(notebook)
    assert f"Using CIFAR100_DATASET = {tiny_parquet_dir}" in outputs
    assert "fine_accuracy" in outputs and "coarse_accuracy" in outputs
    assert "IProgress not found" not in outputs
    model_dir = tmp_path / "outputs" / "usage-example"
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "reports" / "validation" / "eval_report.md").is_file()
    assert "min_confidence 0.9: " in outputs
    assert (model_dir / "validation-report" / "superclass_accuracy.png").is_file()


def test_notebook_falls_back_to_generated_images_without_hub_or_local_copy(tmp_path, monkeypatch):
    offline_kernel_env(monkeypatch, tmp_path)
    monkeypatch.delenv("CIFAR100_DATASET", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells = notebook.cells[: DATA_CELL + 1]  # up to the data: the rest is the same as on any source
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = all_text(notebook)
    assert "uoft-cs/cifar100 cannot be loaded" in outputs
    assert "python data_utils.py download cifar100-local" in outputs and "USING SMALL GENERATED IMAGES" in outputs
    assert "validation: Dataset" in outputs and "IProgress not found" not in outputs
    assert len(list((tmp_path / "outputs" / "usage-example" / "generated-data").glob("*.parquet"))) == 2
