"""What `benchmark.py` and `gpu_check.py` measure with: memory peaks, device waits, step figures, the CPU share of
other processes, endless batches, and the checks of their options.

Imports only the standard library, numpy and torch: the plain loop's process stays free of `datasets`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the project modules, imported inside the functions that use them
SEED = 42


# ----------------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------------


def fill_defaults(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    """Set every option of `defaults` that the command line left unset (`None`)."""
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def target_met(value: float, direction: str, threshold: float) -> bool:
    """Whether `value` meets a target given as (`">="` or `"<="`, `threshold`)."""
    return value >= threshold if direction == ">=" else value <= threshold


# A path measured faster than its own ceiling by more than this says the machine's speed moved, not the code.
MEASUREMENT_PROBLEM_RATIO = 1.05


def paired_ratios(numerators: list[float], denominators: list[float]) -> dict[str, float | bool]:
    """The ratio of each pair of runs measured back to back (`numerators[i] / denominators[i]`): their median,
    lowest and highest, and whether the median is above `MEASUREMENT_PROBLEM_RATIO` (a measurement problem).

    >>> paired_ratios([90.0, 120.0, 100.0], [100.0, 100.0, 125.0])
    {'median': 0.9, 'low': 0.8, 'high': 1.2, 'measurement_problem': False}
    """
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"need pairs of runs, got {len(numerators)} and {len(denominators)}")
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    median = float(np.median(ratios))
    return {
        "median": median,
        "low": min(ratios),
        "high": max(ratios),
        "measurement_problem": median > MEASUREMENT_PROBLEM_RATIO,
    }


def check_at_least(args: argparse.Namespace, minimum: int, names: Iterable[str]) -> None:
    """`ValueError` naming the first option of `names` below `minimum`, with its value."""
    for name in names:
        if getattr(args, name) < minimum:
            raise ValueError(f"--{name} must be >= {minimum}, got {getattr(args, name)}")


# ----------------------------------------------------------------------------------------------------------------
# Memory, device and CPU
# ----------------------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (`ru_maxrss` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def peak_gpu_mb(device: str) -> float | None:
    """Peak memory allocated by tensors on the CUDA device in MiB; None on CPU."""
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def synchronize(device: str) -> None:
    """Wait for the accelerator's queued work, so that a time stamp covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_device(device: str) -> None:
    """Forget compiled graphs and the peak memory of the previous measurement."""
    torch._dynamo.reset()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def busy_cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes spent busy since boot, CPU seconds of this process and its finished children);
    None where `/proc/stat` does not exist. Two readings tell how much CPU other processes took in between."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    own = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy, sum(usage.ru_utime + usage.ru_stime for usage in own)


def other_cpu_share(before: tuple[float, float] | None, seconds: float) -> float | None:
    """Share of all cores that other processes used since the reading `before` (0 on a quiet machine)."""
    after = busy_cpu_seconds()
    if before is None or after is None:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / (seconds * (os.cpu_count() or 1)))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the context, as a DataLoader worker does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# Steps and batches
# ----------------------------------------------------------------------------------------------------------------


def step_figures(stamps: list[float], warmup_steps: int, batch_size: int) -> dict[str, float]:
    """From the time stamps at the end of every step: images/s between the end of step `warmup_steps` and the end
    of the last step, images/s of the median step, and the relative spread of the step times (noise)."""
    timed = np.asarray(stamps[warmup_steps - 1 :])
    durations = np.diff(timed)
    return {
        "images_per_s": batch_size * len(durations) / float(timed[-1] - timed[0]),
        "median_step_images_per_s": batch_size / float(np.median(durations)),
        "step_spread": float(durations.std() / durations.mean()),
    }


def endless(loader: Iterable[dict]) -> Iterator[dict]:
    """The batches of `loader`, starting over whenever it runs out."""
    while True:
        yield from loader


def images_per_s(loader: Iterable[dict], batches: int) -> float:
    """Images/s of `batches` batches of `loader` after a first, untimed one (workers starting, caches filling)."""
    stream = endless(loader)
    next(stream)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(stream)["labels"])
    return images / (time.perf_counter() - start)
