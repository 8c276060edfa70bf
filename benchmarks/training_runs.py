"""Parts 1 and 2 of `benchmark.py`: the ceiling (the plain loop) and the Trainer (`run_classification.main`), each
run in a fresh process (`benchmark.py --child ceiling|trainer`) so that its peak memory and start-up are its own."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from measuring import REPO_ROOT, SEED, step_figures
from workloads import run_plain_loop, training_plan

BENCHMARK_SCRIPT = Path(__file__).resolve().with_name("benchmark.py")
RESULT_PREFIX = "BENCHMARK_CHILD_RESULT "
KINDS = ("ceiling", "trainer")


def trainer_argv(args: argparse.Namespace, dataset: str, cache_dir: str | None, output_dir: str) -> list[str]:
    """`run_classification.py` options: the script's defaults, except no evaluation, checkpoints or logging."""
    total_steps = args.warmup_steps + args.steps
    return [
        "--dataset_name", dataset,
        *(["--cache_dir", cache_dir] if cache_dir else []),
        "--output_dir", output_dir,
        "--do_train",
        "--backbone_weights", "none",
        "--image_size", str(args.image_size),
        "--batch_size", str(args.batch_size),
        "--max_steps", str(total_steps),
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--load_best_model_at_end", "false",
        "--logging_steps", str(total_steps + 1),
        "--report_to", "none",
        "--seed", str(SEED),
        *shlex.split(args.trainer_args),
    ]  # fmt: skip


def write_plan(args: argparse.Namespace, dataset: str, cache_dir: str | None, tmp: Path) -> tuple[dict, Path]:
    """The Trainer's options and what it builds from them (`training_plan`), written for the child processes."""
    argv = trainer_argv(args, dataset, cache_dir, str(tmp / "trainer-output"))
    plan = {**training_plan(argv), "trainer_argv": argv}
    plan_path = tmp / "plan.json"
    plan_path.write_text(json.dumps(plan))
    return plan, plan_path


def run_trainer(args: argparse.Namespace, plan: dict[str, Any]) -> dict[str, Any]:
    """Child process 2: `run_classification.main` with a callback that stamps the end of every optimizer step."""
    from trainer_timing import StepTimer, train_with

    timer = StepTimer(plan["device"], sync_steps=(1, args.warmup_steps))
    argv = list(plan["trainer_argv"])
    # a folder of its own: in the folder of an earlier repeat the script would find a finished run, nothing to do
    at = argv.index("--output_dir") + 1
    argv[at] = tempfile.mkdtemp(prefix="trainer-output-", dir=Path(argv[at]).parent)
    train_with(argv, timer)
    return timer.record()


def run_child(args: argparse.Namespace) -> None:
    """Entry point of a child process: run one training measurement and print its result as one prefixed line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = json.loads(Path(args.plan).read_text())
    if args.child == "ceiling":
        record = run_plain_loop(plan, args.batch_size, args.image_size, args.warmup_steps, args.steps)
    else:
        record = run_trainer(args, plan)
    result = {
        **step_figures(record["stamps"], args.warmup_steps, args.batch_size),
        "startup_s": record["first_step_end"] - args.spawn_time,
        "peak_rss_mb": record["peak_rss_mb"],
        "peak_gpu_mb": record["peak_gpu_mb"],
        "threads": torch.get_num_threads(),
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def spawn_child(kind: str, args: argparse.Namespace, plan_path: Path) -> dict[str, Any]:
    """Run `kind` in a fresh Python process (so its peak memory is its own) and return its result."""
    command = [sys.executable, str(BENCHMARK_SCRIPT), "--child", kind, "--plan", str(plan_path)]
    for name in ("image_size", "batch_size", "steps", "warmup_steps", "threads"):
        if getattr(args, name) is not None:
            command += [f"--{name}", str(getattr(args, name))]
    command += ["--spawn_time", repr(time.time())]
    env = dict(os.environ)
    if kind == "ceiling" and json.loads(plan_path.read_text())["keep_freed_memory"]:
        # The Trainer's process sets the same allocator thresholds on itself (`--keep_freed_memory`, the default).
        from hierarchical.training.run import MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD

        env.update(MALLOC_MMAP_THRESHOLD_=str(MALLOC_MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(MALLOC_TRIM_THRESHOLD))
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(
            f"the {kind} measurement failed (exit code {completed.returncode}):\n{completed.stderr[-3000:]}"
        )
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def measure_training(args: argparse.Namespace, plan_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Every run of the ceiling and the Trainer, `--repeats` times, alternating."""
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for _ in range(args.repeats):
        for kind in KINDS:
            runs[kind].append(spawn_child(kind, args, plan_path))
    return runs


def fastest(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The run of each kind with the most images/s (other processes only ever slow a run down)."""
    return {kind: max(kind_runs, key=lambda run: run["images_per_s"]) for kind, kind_runs in runs.items()}
