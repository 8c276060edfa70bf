"""The GPU fast paths of `run_classification.py`, exercised on CPU: bf16 autocast, channels-last, torch.compile."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import run_classification
from hierarchical.training import run as training_run

pytestmark = pytest.mark.slow


def train_tiny(output_dir: Path, data_dir: Path, *options: str) -> dict[str, float]:
    """One epoch of 4 steps of 16 images at 32 px from random weights, with evaluation; returns the metrics."""
    return run_classification.main(
        [
            "--dataset_name", str(data_dir),
            "--output_dir", str(output_dir),
            "--do_train",
            "--image_size", "32",
            "--backbone_weights", "none",
            "--max_train_samples", "64",
            "--max_eval_samples", "32",
            "--epochs", "1",
            "--batch_size", "16",
            "--report_to", "none",
            *options,
        ]
    )  # fmt: skip


def assert_finite_losses(metrics: dict[str, float]) -> None:
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    assert math.isfinite(metrics["eval_loss"]), metrics


@pytest.fixture
def stage_outputs(monkeypatch) -> list[tuple[torch.dtype, bool]]:
    """(dtype, is channels-last) of every training-mode output of backbone stage 2 (48 x 8 x 8 at 32 px) of the
    model that `run_classification.main` builds."""
    seen = []
    load_model = training_run.load_model

    def load_and_hook(*args, **kwargs):
        model = load_model(*args, **kwargs)

        def record(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if model.training:
                seen.append((output.dtype, output.is_contiguous(memory_format=torch.channels_last)))

        model.features[2].register_forward_hook(record)
        return model

    monkeypatch.setattr(training_run, "load_model", load_and_hook)
    return seen


def test_bf16_autocast_trains_with_finite_loss(tmp_path, tiny_parquet_dir, stage_outputs):
    metrics = train_tiny(tmp_path / "run", tiny_parquet_dir, "--bf16", "true", "--use_cpu", "true")
    assert_finite_losses(metrics)
    assert len(stage_outputs) == 4  # one per step
    assert {dtype for dtype, _ in stage_outputs} == {torch.bfloat16}  # the convolutions ran under autocast
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved.get("dtype", "float32") == "float32"  # the weights stay in float32


def test_channels_last_through_the_script(tmp_path, tiny_parquet_dir, stage_outputs):
    metrics = train_tiny(tmp_path / "run", tiny_parquet_dir, "--channels_last", "true")
    assert_finite_losses(metrics)
    assert len(stage_outputs) == 4
    assert all(channels_last for _, channels_last in stage_outputs)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["channels_last"] is True


def test_torch_compile_through_the_trainer(tmp_path, tiny_parquet_dir):
    torch._dynamo.reset()
    counters.clear()
    metrics = train_tiny(
        tmp_path / "run", tiny_parquet_dir, "--torch_compile", "true", "--torch_compile_backend", "eager"
    )
    assert_finite_losses(metrics)
    assert counters["stats"]["unique_graphs"] >= 1  # the model went through dynamo
    assert not counters["graph_break"], dict(counters["graph_break"])  # in one piece, no fallback to eager Python
    torch._dynamo.reset()
