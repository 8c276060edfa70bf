"""`run_classification.main` timed step by step: a callback that stamps the end of every optimizer step, one that
turns CUDA's sync debug mode on for every step after the warm-up, and the run with them added to the Trainer's.

Imported by the benchmark scripts only where they train (it imports transformers and the training script).
"""

from __future__ import annotations

import math
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from measuring import peak_gpu_mb, peak_rss_mb, synchronize
from transformers import TrainerCallback

import run_classification


class StepTimer(TrainerCallback):
    """Stamps the end of every optimizer step (waiting for the device first at `sync_steps` and at the last step),
    the wall-clock end of the first step, and the memory peaks when training ends, before the model is saved."""

    def __init__(self, device: str, sync_steps: tuple[int, ...]) -> None:
        self.device, self.sync_steps = device, sync_steps
        self.stamps: list[float] = []
        self.first_step_end: float | None = None
        self.peak_rss_mb: float | None = None
        self.peak_gpu_mb: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (*self.sync_steps, state.max_steps):
            synchronize(self.device)
        self.stamps.append(time.perf_counter())
        self.first_step_end = self.first_step_end or time.time()

    def on_train_end(self, args, state, control, **kwargs):
        self.peak_rss_mb = peak_rss_mb()
        self.peak_gpu_mb = peak_gpu_mb(self.device)

    def record(self) -> dict[str, Any]:
        """What it measured, as `workloads.run_plain_loop` returns it."""
        return {
            "stamps": self.stamps,
            "first_step_end": self.first_step_end,
            "peak_rss_mb": self.peak_rss_mb,
            "peak_gpu_mb": self.peak_gpu_mb,
        }


class SyncCheck(TrainerCallback):
    """Runs every step from `warmup_steps` on under `torch.cuda.set_sync_debug_mode("error")`: a host-device
    synchronisation inside a step raises. Logging, evaluation and saving happen between steps, outside it."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.warmup_steps:
            torch.cuda.set_sync_debug_mode("error")

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.set_sync_debug_mode("default")


class SyncCheckError(RuntimeError):
    """A training step synchronised the host with the device."""


def train_with(argv: list[str], *callbacks: TrainerCallback) -> dict[str, float]:
    """`run_classification.main(argv)` with `callbacks` added to the Trainer's; its metrics. `ValueError` when the
    run ends with a non-finite training loss."""
    metrics = run_classification.main(argv, callbacks)
    if not math.isfinite(metrics["train_loss"]):
        raise ValueError(f"the Trainer run ended with train_loss {metrics['train_loss']}")
    return metrics


def train_checking_syncs(argv: list[str], warmup_steps: int, *callbacks: TrainerCallback) -> dict[str, float]:
    """[`train_with`] under [`SyncCheck`] (CUDA only): a host-device synchronisation in a step after the warm-up
    raises `SyncCheckError`, which says where it happened."""
    try:
        return train_with(argv, SyncCheck(warmup_steps), *callbacks)
    except RuntimeError as error:
        if "synchronizing" in str(error):
            frames = traceback.extract_tb(error.__traceback__)
            where = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-4:])
            raise SyncCheckError(f"{str(error).splitlines()[0]} (at {where})") from error
        raise
    finally:
        torch.cuda.set_sync_debug_mode("default")
