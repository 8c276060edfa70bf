"""Smoke test of `benchmarks/benchmark.py`: it runs end to end and reports every figure (targets are not checked:
they hold on a quiet machine only)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[1]
RATIOS = ("train_ratio", "loader_ratio", "pipeline_ratio", "memory_ratio")
FIGURES = (
    "ceiling_images_per_s", "trainer_images_per_s", "loader_images_per_s", "loader_images_per_s_32",
    "loader_images_per_s_224", "batched_images_per_s", "forward_only_images_per_s", "pipeline_images_per_s",
    "ceiling_peak_rss_mb", "trainer_peak_rss_mb", "ceiling_startup_s", "trainer_startup_s",
)  # fmt: skip


@pytest.mark.slow
def test_tiny_benchmark_prints_the_figures_as_one_json_line():
    completed = subprocess.run(
        [sys.executable, "benchmarks/benchmark.py", "--tiny", "--dataset", "generated"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    results = json.loads(lines[-1])
    for key in RATIOS + FIGURES:
        assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] > 0, (key, results)
    assert results["train_ratio"] == pytest.approx(results["trainer_images_per_s"] / results["ceiling_images_per_s"])
    assert results["pipeline_top1_agreement"] == 1.0  # the pipeline ran the same model on the same images
    assert (results["image_size"], results["batch_size"], results["dataset"]) == (32, 8, "generated")
    assert results["threads"] >= 1 and results["torch_version"]
    assert "train_ratio" in completed.stdout.split(lines[-1])[0]  # the table comes first
