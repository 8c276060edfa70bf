"""Smoke test of `benchmarks/gpu_check.py` on the CPU: every part runs at tiny sizes and is reported (the GPU
figures and targets need a GPU)."""

import json
import math

import pytest

from conftest import run_script


@pytest.mark.slow
def test_tiny_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    completed = run_script(
        "benchmarks/gpu_check.py", "--tiny", "--device", "cpu", "--json_path", str(tmp_path / "r.json"),
        "--budget_minutes", "60",  # the from-scratch part runs whatever this machine's speed today
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    results = json.loads(lines[-1])
    assert json.loads((tmp_path / "r.json").read_text()) == results
    for key in (
        "plain_eager_32_images_per_s", "plain_compile_32_images_per_s", "trainer_images_per_s",
        "loader_images_per_s", "trainer_ratio", "loader_headroom",
    ):  # fmt: skip
        assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] > 0, key
    assert results["trainer_ratio"] == pytest.approx(
        results["trainer_images_per_s"] / results["plain_compile_32_images_per_s"]
    )
    assert results["sync_check"] == "not run (CPU)" and results["sync_check_passed"] is False
    scratch = results["from_scratch"]
    assert scratch["image_size"] == 32 and 0 <= scratch["fine_accuracy"] <= 1 and scratch["train_images"] > 0
    assert (results["device"], results["batch_size"], results["tiny"]) == ("cpu", 4, True)
    table = completed.stdout.split(lines[-1])[0]
    assert "trainer_ratio" in table and "from scratch" in table and "sync check" in table
