#!/usr/bin/env python
"""Throughput, memory and start-up of the project's training and inference paths, against plain-PyTorch ceilings.

    python benchmarks/benchmark.py                     # 32 px, batch 64: several minutes on 2 cores
    python benchmarks/benchmark.py --image_size 224 --batch_size 32 --steps 10 --warmup_steps 2
    python benchmarks/benchmark.py --tiny              # smoke test on generated data (seconds)

Measured side by side in one run, on the current machine:

1. ceiling: a plain loop of forward, backward and AdamW step on pre-made tensors (same model, parameter groups,
   optimizer settings, batch and image size as the Trainer), in its own process, started with the allocator
   thresholds that `--keep_freed_memory` (on by default) sets in the Trainer's process;
2. trainer: `run_classification.main([...])` reading the parquet dataset, in its own process, timed by a callback
   from the end of the warm-up steps to the last step (no evaluation, no checkpoints, no logging in between);
3. loader: the data pipeline alone (`apply_transforms` + `HierarchicalCollator` through a `DataLoader` in the
   main process with one thread, as in one worker), at 32 px, 224 px and the model's image size;
4. inference on the same PIL images: by hand in batches (image processor, then an eval-mode forward under no_grad;
   also the forward alone), `pipeline("image-classification", batch_size=B)`, and
   `pipeline("hierarchical-image-classification")` at the batch size a user gets without asking for one;
5. peak resident memory and start-up time (process start to the end of the first optimizer step) of 1 and 2;
6. the data path of `recipes/gpu_imagenet_384px.json` at 224 and 384 px: bytes per sample crossing the DataLoader
   and a worker's CPU time per 1,000 samples, before and after preprocessing moved to the device (which takes
   `DevicePreprocessor`'s time, measured apart); `--data_path_only` measures only this.

Every measurement runs `--repeats` times, alternating (ABAB...), and the fastest run counts for the figures. The
train and pipeline ratios are the median of the ratios of the runs measured back to back (ceiling then Trainer;
by hand then pipeline), with their lowest and highest; a path faster than its ceiling (median above 1.05) is
flagged as a measurement problem: the machine's speed moved during the pair. A table goes to stdout, then one
JSON line with the ratios, the figures behind them and the settings. The targets in the table are for a quiet
2-core machine; `other_processes_cpu_share` says how busy the machine was (other processes lower every figure).

The parts live beside this script: `training_runs.py` (1 and 2, each in its own process), `workloads.py` (the
plain loop, generated data, the GPU recipe's options), `trainer_timing.py` (the callbacks that time the Trainer),
`throughput.py` (3 and 4), `data_path.py` (6) and `measuring.py` (memory, CPU share, step figures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from data_path import measure_recipe_data_path, print_data_path_table
from measuring import (
    MEASUREMENT_PROBLEM_RATIO,
    busy_cpu_seconds,
    check_at_least,
    fill_defaults,
    other_cpu_share,
    paired_ratios,
    target_met,
)
from throughput import measure_inference, measure_loader, prepare_splits
from training_runs import KINDS, fastest, measure_training, run_child, write_plan
from workloads import write_generated_dataset

HUB_DATASET = "uoft-cs/cifar100"
GENERATED = "generated"
BUSY_SHARE = 0.05  # above this share of the CPUs taken by other processes, the table warns
# name: (direction, threshold); for a quiet 2-core machine at 32 px and batch 64.
TARGETS = {
    "train_ratio": (">=", 0.95),
    "loader_ratio": (">=", 5.0),
    "pipeline_ratio": (">=", 0.8),
    "hierarchical_pipeline_ratio": (">=", 0.5),
    "memory_ratio": ("<=", 1.3),
}
DEFAULTS = dict(batch_size=64, steps=40, warmup_steps=5, loader_batches=20, inference_images=1024, repeats=2)
TINY_DEFAULTS = dict(batch_size=8, steps=2, warmup_steps=1, loader_batches=2, inference_images=16, repeats=2)


# ----------------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------------


def add_size_options(parser: argparse.ArgumentParser) -> None:
    """Image size, batch and how many steps, batches and images each measurement takes."""
    parser.add_argument("--image_size", type=int, default=32, help="Model input resolution (default 32).")
    counts = {
        "batch_size": "Training and inference batch",
        "steps": "Timed training steps after warm-up",
        "warmup_steps": "Untimed first training steps",
        "loader_batches": "Timed data-pipeline batches per image size",
        "inference_images": "Images for the inference measurements",
    }
    for name, text in counts.items():
        parser.add_argument(f"--{name}", type=int, default=None, help=f"{text} (default {DEFAULTS[name]}).")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The data, the repeats, the threads, the Trainer's extra options, and what to measure."""
    parser.add_argument(
        "--dataset_name",
        "--dataset",
        dest="dataset",
        default=None,
        help=f"A Hub id, a local folder in a format --dataset_name of run_classification.py reads, or '{GENERATED}' "
        f"for random images written to a temp folder. Default: {HUB_DATASET} (generated with --tiny, and when the "
        "Hub does not answer and it is not cached, which the table says).",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="Runs of every measurement, alternating; the fastest counts (default 2). Other processes only ever "
        "slow a run down, so the best of a few is the closest to a quiet machine.",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core).")
    parser.add_argument(
        "--trainer_args",
        default="",
        help="Extra run_classification.py options for the Trainer measurement (and the ceiling's optimizer), "
        'e.g. "--max_grad_norm 1 --dataloader_num_workers 1" to measure a change of default.',
    )
    parser.add_argument("--tiny", action="store_true", help="Tiny settings on generated data, for the smoke test.")
    parser.add_argument(
        "--data_path_only",
        action="store_true",
        help="Measure only the GPU recipe's data path at 224 and 384 px (before and after preprocessing moved to "
        "the device), not training or inference.",
    )


def add_child_options(parser: argparse.ArgumentParser) -> None:
    """Hidden options of the child processes that run the two training measurements."""
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--spawn_time", type=float, help=argparse.SUPPRESS)


def default_dataset(tiny: bool) -> tuple[str, str]:
    """The data when `--dataset_name` is not given, and a note for the table: generated data with `--tiny`, and
    when the Hub dataset is neither cached nor reachable."""
    if tiny:
        return GENERATED, ""
    from hierarchical.hub import dataset_is_cached, hub_reachable

    if not (dataset_is_cached(HUB_DATASET) or hub_reachable()):
        return GENERATED, f" ({HUB_DATASET} not cached and the Hub does not answer)"
    return HUB_DATASET, ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark options; `--tiny` shrinks every default for a smoke test."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_options(parser)
    add_run_options(parser)
    add_child_options(parser)
    args = parser.parse_args(argv)
    fill_defaults(args, TINY_DEFAULTS if args.tiny else DEFAULTS)
    args.dataset_note = ""
    if args.dataset is None and not args.child:
        args.dataset, args.dataset_note = default_dataset(args.tiny)
    check_at_least(args, 1, DEFAULTS)
    check_at_least(args, 16, ["image_size"])
    return args


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def benchmark_data(args: argparse.Namespace, tmp: Path) -> tuple[str, str | None]:
    """The dataset to read and its datasets cache folder: generated data written to `tmp` (enough rows for every
    measurement), or `--dataset_name`, cached where a training run caches it."""
    if args.dataset == GENERATED:
        rows = math.ceil(1.25 * (args.warmup_steps + args.steps + 2) * args.batch_size) + 64
        write_generated_dataset(tmp / "data", max(rows, args.inference_images))
        return str(tmp / "data"), str(tmp / "cache")
    from hierarchical.hub import is_hub_id

    if not Path(args.dataset).exists() and not is_hub_id(args.dataset):
        raise FileNotFoundError(f"--dataset_name {args.dataset!r}: no such folder")
    return args.dataset, None


def measure_loaders(args: argparse.Namespace, splits, data_args) -> dict[int, float]:
    """Images/s of the data pipeline at 32 px, 224 px and `--image_size`, best of `--repeats`."""
    return {
        size: max(
            measure_loader(splits, data_args, size, args.batch_size, args.loader_batches) for _ in range(args.repeats)
        )
        for size in dict.fromkeys((32, 224, args.image_size))
    }


def ratios_and_figures(
    args: argparse.Namespace,
    loader: dict[int, float],
    inference: dict[str, float],
    data_path: dict[str, Any],
    runs: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """The ratios (the train and pipeline ones: medians of paired runs, with their spread), then every figure
    behind them (of the fastest run of each training measurement)."""
    best = fastest(runs)
    ceiling, trainer = best["ceiling"], best["trainer"]
    paired = {
        "train_ratio": paired_ratios(
            [run["images_per_s"] for run in runs["trainer"]], [run["images_per_s"] for run in runs["ceiling"]]
        ),
        "pipeline_ratio": paired_ratios(
            inference["pipeline_images_per_s_runs"], inference["batched_images_per_s_runs"]
        ),
        "hierarchical_pipeline_ratio": paired_ratios(
            inference["hierarchical_pipeline_images_per_s_runs"], inference["batched_images_per_s_runs"]
        ),
    }
    figures = {
        "train_ratio": paired["train_ratio"]["median"],
        "loader_ratio": loader[args.image_size] / trainer["images_per_s"],
        "pipeline_ratio": paired["pipeline_ratio"]["median"],
        "hierarchical_pipeline_ratio": paired["hierarchical_pipeline_ratio"]["median"],
        "memory_ratio": trainer["peak_rss_mb"] / ceiling["peak_rss_mb"],
        "ceiling_images_per_s": ceiling["images_per_s"],
        "trainer_images_per_s": trainer["images_per_s"],
        "loader_images_per_s": loader[args.image_size],
        **{f"loader_images_per_s_{size}": value for size, value in loader.items()},
        "loader_image_sizes": list(loader),
        **inference,
        **data_path,
    }
    for name, summary in paired.items():
        figures.update({f"{name}_low": summary["low"], f"{name}_high": summary["high"]})
    figures["measurement_problems"] = [name for name, summary in paired.items() if summary["measurement_problem"]]
    for name in ("peak_rss_mb", "peak_gpu_mb", "startup_s", "step_spread"):
        figures.update({f"{kind}_{name}": best[kind][name] for kind in KINDS})
    figures.update({f"{kind}_images_per_s_runs": [run["images_per_s"] for run in runs[kind]] for kind in KINDS})
    figures.update({f"{kind}_median_step_images_per_s": best[kind]["median_step_images_per_s"] for kind in KINDS})
    return figures


def settings_and_machine(
    args: argparse.Namespace,
    plan: dict[str, Any],
    threads: int,
    before: tuple[tuple[float, float, float], tuple[float, float] | None, float],
) -> dict[str, Any]:
    """The settings of the run, and the machine: device, threads, load, other processes' CPU share, versions.
    `before`: the load average, `busy_cpu_seconds()` and `time.perf_counter()` when the benchmark started."""
    import transformers

    load_before, cpu_before, start = before
    return {
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "trainer_args": args.trainer_args,
        "keep_freed_memory": plan["keep_freed_memory"],
        "device": plan["device"],
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "other_processes_cpu_share": other_cpu_share(cpu_before, time.perf_counter() - start),
        "benchmark_seconds": time.perf_counter() - start,
        "dataset": args.dataset + args.dataset_note,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "transformers_version": transformers.__version__,
    }


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def print_table(results: dict[str, Any]) -> None:
    """The figures, then the ratios against their targets."""
    r = results
    rows = [
        ("1 ceiling: plain loop, pre-made tensors", r["ceiling_images_per_s"], r["ceiling_peak_rss_mb"],
         r["ceiling_startup_s"], f"step spread {r['ceiling_step_spread']:.0%}"),
        ("2 trainer: run_classification.main", r["trainer_images_per_s"], r["trainer_peak_rss_mb"],
         r["trainer_startup_s"], f"step spread {r['trainer_step_spread']:.0%}"),
        *((f"3 data pipeline, 1 worker, {size} px", r[f"loader_images_per_s_{size}"], None, None,
           "decode+policy+collate") for size in r["loader_image_sizes"]),
        ("4 by hand: processor + forward, batched", r["batched_images_per_s"], None, None, "PIL images, no_grad"),
        ("4 forward alone, batched", r["forward_only_images_per_s"], None, None, "pre-processed tensors"),
        ("4 pipeline('image-classification')", r["pipeline_images_per_s"], None, None,
         f"PIL images, top-1 agrees {r['pipeline_top1_agreement']:.0%}"),
        ("4 pipeline('hierarchical-...'), default", r["hierarchical_pipeline_images_per_s"], None, None,
         f"PIL images, its default batch_size {r['hierarchical_pipeline_batch_size']}"),
    ]  # fmt: skip
    print(
        f"\nimage_size {r['image_size']}, batch_size {r['batch_size']}, steps {r['steps']} after "
        f"{r['warmup_steps']} warm-up, best of {r['repeats']}, {r['device']}, {r['threads']} threads, "
        f"torch {r['torch_version']}, data: {r['dataset']}"
    )
    if r["keep_freed_memory"]:
        print("allocator: glibc keeps freed memory in both training processes (the script's --keep_freed_memory)")
    share = r["other_processes_cpu_share"]
    busy = "" if share is None else f"; other processes took {share:.0%} of the CPUs during the run"
    print(f"load average {r['load_average_before'][0]:.2f} before, {r['load_average_after'][0]:.2f} after{busy}")
    if share is not None and share > BUSY_SHARE:
        print("WARNING: the machine was busy; these are not the figures of a quiet machine")
    print()
    print(f"{'measurement':<42} {'images/s':>10} {'peak RSS MiB':>13} {'start-up s':>11}  notes")
    for name, speed, memory, startup, note in rows:
        memory_text = f"{memory:13.0f}" if memory is not None else f"{'':13}"
        startup_text = f"{startup:11.1f}" if startup is not None else f"{'':11}"
        print(f"{name:<42} {speed:10.1f} {memory_text} {startup_text}  {note}")
    print(f"\n{'ratio':<28} {'value':>7}  {'paired runs':<13}  target (quiet 2-core machine, 32 px, batch 64)")
    for name in TARGETS:
        print(ratio_line(name, r))
    print()


def ratio_line(name: str, results: dict[str, Any]) -> str:
    """One row of the ratio table: the value, the spread of the paired runs, the target and whether it was met;
    a paired ratio above `MEASUREMENT_PROBLEM_RATIO` says the measurement, not the code, moved."""
    direction, threshold = TARGETS[name]
    value = results[name]
    spread = f"{results[f'{name}_low']:.3f}-{results[f'{name}_high']:.3f}" if f"{name}_low" in results else ""
    verdict = "met" if target_met(value, direction, threshold) else "MISSED"
    if name in results.get("measurement_problems", ()):
        verdict = f"MEASUREMENT PROBLEM: faster than its ceiling (> {MEASUREMENT_PROBLEM_RATIO}); measure again"
    return f"{name:<28} {value:7.3f}  {spread:<13}  {direction} {threshold:<5} {verdict}"


def report_data_path_only(args: argparse.Namespace, data_path: dict[str, Any]) -> dict[str, Any]:
    """`--data_path_only`: the data path table and the JSON line with its figures and settings."""
    results = {**data_path, "batch_size": args.batch_size, "repeats": args.repeats, "dataset": args.dataset}
    results["torch_version"] = torch.__version__
    print_data_path_table(results)
    print(json.dumps(results), flush=True)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every measurement, print the table and the JSON line, and return the results."""
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    before = os.getloadavg(), busy_cpu_seconds(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hierarchical-benchmark-") as tmp:
        dataset, cache_dir = benchmark_data(args, Path(tmp))
        # The data measurements come first: they also build the datasets cache the Trainer's process then reads.
        splits, data_args = prepare_splits(dataset, cache_dir)
        data_path = measure_recipe_data_path(splits, args.batch_size, args.loader_batches, args.repeats)
        if args.data_path_only:
            return report_data_path_only(args, data_path)
        loader = measure_loaders(args, splits, data_args)
        plan, plan_path = write_plan(args, dataset, cache_dir, Path(tmp))
        inference = measure_inference(
            splits, args.image_size, args.batch_size, args.inference_images, args.repeats, plan["device"],
            Path(tmp, "saved-model"),
        )  # fmt: skip
        runs = measure_training(args, plan_path)
    results = {
        **ratios_and_figures(args, loader, inference, data_path, runs),
        **settings_and_machine(args, plan, fastest(runs)["trainer"]["threads"], before),
    }
    print_table(results)
    print_data_path_table(results)
    print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()
