#!/usr/bin/env python
"""GPU check: the training speed, memory and data headroom of the GPU recipe on one GPU, in about 6 minutes.

    python benchmarks/gpu_check.py --dataset_name DATA     # DATA: a parquet folder in the uoft-cs/cifar100 schema
    python benchmarks/gpu_check.py --tiny --device cpu     # smoke test of every part on generated data (CPU)

Parts, each sized by step counts (the options below), in this order:

1. plain loop: forward, backward and AdamW step on pre-made tensors (the Trainer's parameter groups and optimizer
   settings, bf16 autocast, channels-last), images/s and peak GPU memory at 224 and 384 px, eager and with
   `torch.compile`;
2. Trainer: `run_classification.main` with the options of `recipes/gpu_imagenet_384px.json` (8-bit images at the
   source size from the DataLoader workers, preprocessing and augmentation on the GPU, EMA, gradient clipping,
   `torch.compile`) at `--trainer_image_size`, against the plain loop with the same settings (target >= 0.95);
   meanwhile the sync check: `torch.cuda.set_sync_debug_mode("error")` from the start to the end of every step
   after the warm-up (logging, evaluation and saving happen outside it), so any host-device synchronisation in a
   training step stops the run and is reported with where it happened;
3. DataLoader: images/s of the training data path with the recipe's workers (decode, policy, collation, pinned
   memory), against the Trainer's images/s (target >= 2);
4. from-scratch training on `--dataset_name` at `--train_image_size` for `--train_minutes` (shortened if the
   parts before took longer than planned) with its validation accuracy.

One table, then one JSON line with every figure and the settings. `--budget_minutes` (default 6) bounds the whole:
the plain loop with `torch.compile` at the larger size and the from-scratch training are shortened or skipped
(and reported so) when the earlier parts leave too little time.

What this check shares with `benchmark.py` lives beside it: `workloads.py` (the plain loop, the recipe's options,
generated data), `trainer_timing.py` (the step timer and the sync check), `throughput.py` (the DataLoader's
images/s) and `measuring.py` (memory, step figures).

On a machine without network access and without `datasets` and `evaluate` (which `run_classification.py` needs),
prepare a folder `.gpu` beside the checkout, on a machine with both:

    echo /.gpu/ >> .git/info/exclude
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .gpu/whl datasets evaluate dill multiprocess
    mkdir -p .gpu/data && cp DATA/train-0000[0-3]-*.parquet .gpu/data/   # a few shards (about 11 MB each)

and on the GPU machine, in the checkout:

    python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu/site .gpu/whl/*.whl
    PYTHONPATH=$PWD/.gpu/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \\
        python3 benchmarks/gpu_check.py --dataset_name .gpu/data --json_path results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the modules beside this script
from measuring import SEED, check_at_least, fill_defaults, reset_device, step_figures, target_met  # noqa: E402
from throughput import measure_worker_loader  # noqa: E402
from workloads import (  # noqa: E402
    AUGMENTATION_OPTIONS,
    RECIPE,
    recipe,
    recipe_options,
    run_plain_loop,
    training_plan,
    write_generated_dataset,
)

TARGETS = {"trainer_ratio": (">=", 0.95), "loader_headroom": (">=", 2.0)}
RECIPE_MODEL_OPTIONS = (
    "dropout", "drop_path_rate", "label_smoothing", "coarse_loss_weight", "num_frozen_stages", "lr_conv", "lr_fc",
    "layer_decay", "weight_decay", "max_grad_norm", "ema_decay",
)  # fmt: skip
DEFAULTS = dict(  # and --workers: the recipe's
    sizes=[224, 384], batch_size=128, steps=40, warmup_steps=5, trainer_image_size=224, trainer_steps=60,
    loader_batches=100, train_minutes=1.5, train_image_size=32, train_batch_size=256,
)  # fmt: skip
TINY_DEFAULTS = dict(
    sizes=[32], batch_size=4, steps=2, warmup_steps=1, trainer_image_size=32, trainer_steps=3, loader_batches=2,
    workers=0, train_minutes=0.05, train_batch_size=16,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The command line; unset sizes and counts take `DEFAULTS` (or `TINY_DEFAULTS` with `--tiny`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_name", help="Parquet folder in the uoft-cs/cifar100 schema (train shards).")
    parser.add_argument("--device", default=None, help="'cuda' (default when available) or 'cpu'.")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="Plain-loop image sizes (224 384).")
    parser.add_argument("--batch_size", type=int, default=None, help="Batch of the speed measurements (128).")
    parser.add_argument("--steps", type=int, default=None, help="Timed plain-loop steps per setting (40).")
    parser.add_argument("--warmup_steps", type=int, default=None, help="Untimed first steps (compilation) (5).")
    parser.add_argument("--trainer_image_size", type=int, default=None, help="Trainer and DataLoader size (224).")
    parser.add_argument("--trainer_steps", type=int, default=None, help="Timed Trainer steps (60).")
    parser.add_argument("--loader_batches", type=int, default=None, help="Timed DataLoader batches (100).")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (the recipe's: 8).")
    parser.add_argument("--train_minutes", type=float, default=None, help="From-scratch training time (1.5).")
    parser.add_argument("--train_image_size", type=int, default=None, help="From-scratch image size (32).")
    parser.add_argument("--train_batch_size", type=int, default=None, help="From-scratch batch size (256).")
    parser.add_argument("--budget_minutes", type=float, default=6.0, help="Time for the whole check (6).")
    parser.add_argument("--json_path", help="Also write the JSON line to this file.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's; --tiny: 1).")
    parser.add_argument("--tiny", action="store_true", help="Tiny sizes on generated data (seconds, any device).")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options; `--tiny` shrinks every size and count for a smoke test on any machine."""
    args = build_parser().parse_args(argv)
    defaults = {**DEFAULTS, "workers": recipe()["dataloader_num_workers"]}
    fill_defaults(args, {**defaults, **TINY_DEFAULTS} if args.tiny else defaults)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available (use --device cpu)")
    if args.dataset_name is None and not args.tiny:
        raise ValueError("--dataset_name is needed: a parquet folder in the uoft-cs/cifar100 schema")
    check_at_least(
        args, 1, ("batch_size", "steps", "warmup_steps", "trainer_steps", "loader_batches", "train_batch_size")
    )
    if min(args.sizes + [args.trainer_image_size, args.train_image_size]) < 16:
        raise ValueError(
            f"image sizes must be >= 16, got {args.sizes}, {args.trainer_image_size}, {args.train_image_size}"
        )
    return args


def recipe_argv(args: argparse.Namespace, image_size: int, compile_model: bool, output_dir: str) -> list[str]:
    """`run_classification.py` options of the GPU recipe for a speed measurement: random initialisation (no
    download), `image_size`, the check's batch and workers, no evaluation, checkpoints or progress bars."""
    options = recipe()
    cuda = args.device.startswith("cuda")
    argv = [f"--{name}={value}" for name, value in recipe_options(RECIPE_MODEL_OPTIONS + AUGMENTATION_OPTIONS).items()]
    argv += [
        "--dataset_name", args.dataset_name, "--output_dir", output_dir, "--do_train", "--backbone_weights", "none",
        "--image_size", str(image_size), "--batch_size", str(args.batch_size), "--channels_last", "true",
        "--bf16", str(options["bf16"] and cuda).lower(), "--torch_compile", str(compile_model).lower(),
        "--train_val_split", str(options["train_val_split"]), "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--logging_steps", str(options["logging_steps"]), "--report_to", "none",
        "--dataloader_num_workers", str(args.workers), "--seed", str(SEED), "--disable_tqdm", "true",
        "--log_level", "warning", "--use_cpu", str(not cuda).lower(),
    ]  # fmt: skip
    if not cuda:
        argv += ["--torch_compile_backend", "eager"]  # dynamo without compiling kernels: seconds on a CPU
    return argv


# ----------------------------------------------------------------------------------------------------------------
# 1: plain loop
# ----------------------------------------------------------------------------------------------------------------


def measure_plain_loop(
    args: argparse.Namespace, plan: dict[str, Any], image_size: int, compile_model: bool
) -> dict[str, Any]:
    """Images/s and peak GPU memory of the plain loop with the recipe's optimizer and settings (`plan`, from
    `workloads.training_plan`) at `image_size`, eager or compiled as the recipe compiles."""
    plan = {**plan, "compile": plan["compile"] if compile_model else None}
    reset_device(args.device)
    start = time.perf_counter()
    record = run_plain_loop(plan, args.batch_size, image_size, args.warmup_steps, args.steps)
    figures = step_figures(record["stamps"], args.warmup_steps, args.batch_size)
    return {
        "images_per_s": figures["images_per_s"],
        "peak_gpu_mb": record["peak_gpu_mb"],
        "seconds": time.perf_counter() - start,
        "plan": plan,
    }


# ----------------------------------------------------------------------------------------------------------------
# 2: the Trainer, with the sync check
# ----------------------------------------------------------------------------------------------------------------


def run_trainer(args: argparse.Namespace, argv: list[str], warmup_steps: int, check_syncs: bool) -> dict[str, Any]:
    """`run_classification.main(argv)` timed step by step; with `check_syncs` (CUDA only), every step after the
    warm-up runs under `torch.cuda.set_sync_debug_mode("error")`, and a synchronisation raises `SyncCheckError`."""
    from trainer_timing import StepTimer, train_checking_syncs, train_with

    timer = StepTimer(args.device, sync_steps=(warmup_steps,))
    reset_device(args.device)
    if check_syncs and args.device.startswith("cuda"):
        train_checking_syncs(argv, warmup_steps, timer)
    else:
        train_with(argv, timer)
    return {**step_figures(timer.stamps, warmup_steps, args.batch_size), "peak_gpu_mb": timer.peak_gpu_mb}


def measure_trainer(args: argparse.Namespace, argv: list[str]) -> tuple[dict[str, Any], str]:
    """The Trainer's figures with the sync check, and the check's outcome; run once more without the check when
    it stops the run."""
    from trainer_timing import SyncCheckError

    sync_check = "passed" if args.device.startswith("cuda") else "not run (CPU)"
    try:
        trainer = run_trainer(args, argv, args.warmup_steps, check_syncs=True)
    except SyncCheckError as error:
        sync_check = f"FAILED: {error}"
        trainer = run_trainer(args, argv, args.warmup_steps, check_syncs=False)
    return trainer, sync_check


# ----------------------------------------------------------------------------------------------------------------
# 4: from-scratch training
# ----------------------------------------------------------------------------------------------------------------


def train_from_scratch(args: argparse.Namespace, minutes: float, output_dir: str) -> dict[str, Any]:
    """Train from random weights for `minutes` (cosine over the time) and evaluate on the carved validation split."""
    import run_classification

    cuda = args.device.startswith("cuda")
    argv = [
        "--dataset_name", args.dataset_name, "--output_dir", output_dir, "--do_train", "--do_eval",
        "--backbone_weights", "none", "--image_size", str(args.train_image_size), "--num_frozen_stages", "0",
        "--dropout", "0", "--drop_path_rate", "0", "--label_smoothing", "0.1", "--augmentation", "none",
        "--train_val_split", "0.1", "--batch_size", str(args.train_batch_size), "--lr_conv", "2e-3",
        "--lr_fc", "2e-3", "--weight_decay", "0.05", "--max_train_minutes", str(minutes), "--schedule_by_time",
        "--epochs", "1000", "--warmup_steps", "0.05", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--logging_steps", "100", "--report_to", "none",
        "--dataloader_num_workers", str(args.workers), "--bf16", str(cuda).lower(), "--channels_last", "true",
        "--seed", str(SEED), "--disable_tqdm", "true", "--log_level", "warning", "--use_cpu", str(not cuda).lower(),
    ]  # fmt: skip
    reset_device(args.device)
    metrics = run_classification.main(argv)
    return {
        "minutes": minutes,
        "image_size": args.train_image_size,
        "train_images": metrics["train_samples"],
        "epochs": metrics["epoch"],
        "fine_accuracy": metrics["eval_fine_accuracy"],
        "coarse_accuracy": metrics["eval_coarse_accuracy"],
        "fine_top5_accuracy": metrics["eval_fine_top5_accuracy"],
    }


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def print_table(r: dict[str, Any]) -> None:
    """One table: the measurements, then the ratios against their targets."""

    def speed(value: float | None) -> str:
        return "skipped" if value is None else f"{value:,.0f} img/s"

    def memory(value: float | None) -> str:
        return "" if value is None else f"peak {value / 1024:.1f} GiB"

    print(
        f"\nGPU check on {r['device_name']}, torch {r['torch_version']}, batch {r['batch_size']}, "
        f"{'bf16 autocast, ' if r['bf16'] else ''}channels-last, {r['seconds']:.0f} s"
    )
    rows = []
    for size in r["sizes"]:
        for mode in ("eager", "compile"):
            rows.append((f"1 plain loop {size} px {mode}", speed(r[f"plain_{mode}_{size}_images_per_s"]),
                         memory(r[f"plain_{mode}_{size}_peak_gpu_mb"])))  # fmt: skip
    size = r["trainer_image_size"]
    rows += [
        (f"2 Trainer (run_classification) {size} px compile", speed(r["trainer_images_per_s"]),
         memory(r["trainer_peak_gpu_mb"])),
        ("2 sync check, steps after warm-up", r["sync_check"], ""),
        (f"3 DataLoader, {r['workers']} workers, {size} px", speed(r["loader_images_per_s"]), ""),
    ]  # fmt: skip
    scratch = r["from_scratch"]
    if scratch is None:
        rows.append(("4 from-scratch training", "skipped", ""))
    else:
        rows.append(
            (f"4 from scratch, {scratch['image_size']} px, {scratch['minutes']:.2f} min",
             f"fine top-1 {scratch['fine_accuracy']:.2%}",
             f"coarse {scratch['coarse_accuracy']:.2%}, top-5 {scratch['fine_top5_accuracy']:.2%}, "
             f"{scratch['epochs']:.1f} epochs of {scratch['train_images']:,} images")
        )  # fmt: skip
    for name, value, note in rows:
        print(f"{name:<44} {value:>22}  {note}")
    for name, (direction, threshold) in TARGETS.items():
        verdict = "met" if target_met(r[name], direction, threshold) else "MISSED"
        print(f"{name:<44} {r[name]:>22.3f}  target {direction} {threshold:g}: {verdict}")
    print()


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def measure_plain_loops(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, dict], dict[int, dict], list[int]]:
    """Part 1 before the others: the plain loop eager at every size, and compiled at the Trainer's size (the
    Trainer's reference). Returns the runs by `plain_<mode>_<size>`, the plans by size, and the sizes."""
    sizes = list(dict.fromkeys([args.trainer_image_size, *args.sizes]))
    plans = {size: training_plan(recipe_argv(args, size, True, str(tmp / "plan"))) for size in sizes}
    results = {f"plain_eager_{size}": measure_plain_loop(args, plans[size], size, False) for size in sizes}
    size = args.trainer_image_size
    results[f"plain_compile_{size}"] = measure_plain_loop(args, plans[size], size, compile_model=True)
    return results, plans, sizes


def measure_while_time_allows(
    args: argparse.Namespace, results: dict[str, dict], plans: dict[int, dict], deadline: float, tmp: Path
) -> dict[str, Any] | None:
    """Parts 1 and 4 with the time left before `deadline`: the compiled plain loop at the other sizes (compiling
    takes about a minute each), then the from-scratch training, shortened to fit (None when too little is left)."""
    for size, plan in plans.items():
        if f"plain_compile_{size}" not in results and deadline - time.perf_counter() > 150:
            results[f"plain_compile_{size}"] = measure_plain_loop(args, plan, size, compile_model=True)
    minutes = min(args.train_minutes, (deadline - time.perf_counter() - 30) / 60)
    if minutes < min(args.train_minutes, 0.5):
        return None
    return train_from_scratch(args, round(minutes, 2), str(tmp / "scratch"))


def plain_loop_figures(results: dict[str, dict], sizes: list[int]) -> dict[str, float | None]:
    """Images/s, peak GPU memory and seconds of every plain-loop setting (None where it was skipped)."""
    figures = {}
    for size in sizes:
        for mode in ("eager", "compile"):
            run = results.get(f"plain_{mode}_{size}")
            for name in ("images_per_s", "peak_gpu_mb", "seconds"):
                figures[f"plain_{mode}_{size}_{name}"] = run[name] if run else None
    return figures


def settings_and_machine(args: argparse.Namespace, sizes: list[int], bf16: bool, start: float) -> dict[str, Any]:
    """The sizes and counts of the check, the recipe, the device and the versions."""
    import transformers

    cuda = args.device.startswith("cuda")
    return dict(
        sizes=sizes,
        trainer_image_size=args.trainer_image_size,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        trainer_steps=args.trainer_steps,
        workers=args.workers,
        bf16=bf16,
        recipe=RECIPE.name,
        device=args.device,
        device_name=torch.cuda.get_device_name() if cuda else platform.processor() or "CPU",
        cpu_count=os.cpu_count(),
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        python_version=platform.python_version(),
        seconds=time.perf_counter() - start,
        tiny=args.tiny,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every part, print the table and the JSON line, and return the results."""
    args = parse_args(argv)
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)  # tiny: one thread is faster on a busy shared CPU
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        if args.dataset_name is None:  # --tiny
            args.dataset_name = str(Path(tmp, "data"))
            write_generated_dataset(Path(args.dataset_name), 400)
        results, plans, sizes = measure_plain_loops(args, Path(tmp))
        trainer_argv = recipe_argv(args, args.trainer_image_size, True, str(Path(tmp, "trainer")))
        trainer_argv += ["--max_steps", str(args.warmup_steps + args.trainer_steps)]
        trainer, sync_check = measure_trainer(args, trainer_argv)
        loader = measure_worker_loader(trainer_argv, args.batch_size, args.workers, args.loader_batches, args.device)
        scratch = measure_while_time_allows(args, results, plans, start + args.budget_minutes * 60, Path(tmp))
    reference = results[f"plain_compile_{args.trainer_image_size}"]
    summary: dict[str, Any] = {
        "trainer_ratio": trainer["images_per_s"] / reference["images_per_s"],
        "loader_headroom": loader / trainer["images_per_s"],
        **{f"trainer_{name}": value for name, value in trainer.items()},
        "loader_images_per_s": loader,
        "sync_check": sync_check,
        "sync_check_passed": sync_check == "passed",
        "from_scratch": scratch,
        **plain_loop_figures(results, sizes),
        **settings_and_machine(args, sizes, reference["plan"]["autocast"] is not None, start),
    }
    print_table(summary)
    line = json.dumps(summary)
    print(line, flush=True)
    if args.json_path:
        Path(args.json_path).write_text(line + "\n")
    return summary


if __name__ == "__main__":
    main()
