"""Smoke test of `benchmarks/benchmark.py`: it runs end to end and reports every figure (targets are not checked:
they hold on a quiet machine only)."""

import json
import math
import sys

import pytest

from conftest import PROJECT_DIR, run_script

sys.path.insert(0, str(PROJECT_DIR / "benchmarks"))
from benchmark import ratio_line  # noqa: E402
from measuring import paired_ratios  # noqa: E402

RATIOS = ("train_ratio", "loader_ratio", "pipeline_ratio", "hierarchical_pipeline_ratio", "memory_ratio")
FIGURES = (
    "ceiling_images_per_s", "trainer_images_per_s", "loader_images_per_s", "loader_images_per_s_32",
    "loader_images_per_s_224", "batched_images_per_s", "forward_only_images_per_s", "pipeline_images_per_s",
    "ceiling_peak_rss_mb", "trainer_peak_rss_mb", "ceiling_startup_s", "trainer_startup_s",
)  # fmt: skip


@pytest.mark.slow
def test_tiny_benchmark_prints_the_figures_as_one_json_line():
    completed = run_script("benchmarks/benchmark.py", "--tiny", "--dataset", "generated")
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    results = json.loads(lines[-1])
    for key in RATIOS + FIGURES:
        assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] > 0, (key, results)
    for name in ("train_ratio", "pipeline_ratio"):  # the median of the paired runs lies within their spread
        assert results[f"{name}_low"] <= results[name] <= results[f"{name}_high"], name
    assert set(results["measurement_problems"]) <= {"train_ratio", "pipeline_ratio", "hierarchical_pipeline_ratio"}
    assert results["pipeline_top1_agreement"] == 1.0  # the pipeline ran the same model on the same images
    assert results["hierarchical_pipeline_batch_size"] > 1  # the default a user gets batches a list
    assert (results["image_size"], results["batch_size"], results["dataset"]) == (32, 8, "generated")
    assert results["threads"] >= 1 and results["torch_version"]
    assert "train_ratio" in completed.stdout.split(lines[-1])[0]  # the table comes first
    assert results["after_bytes_per_sample"] <= 4096 and results["before_bytes_per_sample_384"] > 1_700_000


def test_tiny_data_path_measurement_reports_bytes_and_cpu_time_before_and_after():
    completed = run_script("benchmarks/benchmark.py", "--tiny", "--dataset", "generated", "--data_path_only")
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results["data_path_sizes"] == [224, 384]
    assert results["data_path_augmentation"]["augmentation"] == "trivialaugment"  # the GPU recipe's
    for size in (224, 384):
        # before: normalised float32 images at the model size and soft targets for 100 + 20 classes
        assert results[f"before_bytes_per_sample_{size}"] == 3 * size * size * 4 + (100 + 20) * 4
        # after: the 32 px source image in 8 bits, two labels and the drawn parameters
        assert 3 * 32 * 32 + 2 * 8 < results[f"after_bytes_per_sample_{size}"] <= 4096
        for name in ("before_worker_cpu_ms_per_1000", "after_worker_cpu_ms_per_1000", "device_step_cpu_ms_per_1000"):
            assert math.isfinite(results[f"{name}_{size}"]) and results[f"{name}_{size}"] > 0, name
        reduction = results[f"worker_cpu_reduction_{size}"]
        assert reduction == pytest.approx(
            results[f"before_worker_cpu_ms_per_1000_{size}"] / results[f"after_worker_cpu_ms_per_1000_{size}"]
        )
    assert "worker_cpu_reduction_384" in completed.stdout.split("\n{")[0]  # the table comes first


def test_paired_ratios_by_hand():
    # Three pairs measured back to back: 90/100 = 0.9, 120/100 = 1.2, 100/125 = 0.8 -> median 0.9, spread 0.8-1.2.
    # The ratio of the best runs (120 / 125 = 0.96) would mix two different moments of the machine.
    assert paired_ratios([90.0, 120.0, 100.0], [100.0, 100.0, 125.0]) == pytest.approx(
        {"median": 0.9, "low": 0.8, "high": 1.2, "measurement_problem": False}
    )
    # A path faster than its own ceiling in most pairs (1.1, 1.2, 0.9 -> median 1.1 > 1.05) is a measurement problem.
    assert paired_ratios([110.0, 120.0, 90.0], [100.0, 100.0, 100.0])["measurement_problem"] is True
    with pytest.raises(ValueError, match="pairs of runs"):
        paired_ratios([1.0], [1.0, 2.0])


def test_ratio_table_flags_a_measurement_problem():
    results = {
        "train_ratio": 1.1,
        "train_ratio_low": 0.9,
        "train_ratio_high": 1.2,
        "measurement_problems": ["train_ratio"],
    }
    line = ratio_line("train_ratio", results)
    assert "1.100" in line and "0.900-1.200" in line and "MEASUREMENT PROBLEM" in line and "met" not in line
    results = {"train_ratio": 0.97, "train_ratio_low": 0.95, "train_ratio_high": 0.99, "measurement_problems": []}
    assert ratio_line("train_ratio", results).endswith(">= 0.95  met")


@pytest.mark.slow  # two fresh processes import torch
def test_decode_memory_benchmark_prints_its_line_and_keeps_images_within_the_bound():
    completed = run_script("benchmarks/decode_memory.py", "--side", "1500", "--images", "4", "--batch_size", "2")
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    results = json.loads(lines[-1])
    assert "| reduced while decoded |" in completed.stdout and "| decoded at the source size |" in completed.stdout
    assert results["source_size_largest_pixels"] == 1500 * 1500
    assert results["reduced_largest_pixels"] <= (4 * 32 - 1) ** 2  # the documented bound at 32 px
    for key in ("reduced_peak_mb", "source_size_peak_mb"):
        assert math.isfinite(results[key]) and results[key] >= 0, key
