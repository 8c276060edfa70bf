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
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark.py
from benchmark import (  # noqa: E402
    AUGMENTATION_OPTIONS,
    RECIPE,
    SEED,
    peak_gpu_mb,
    run_ceiling,
    step_figures,
    synchronize,
    training_plan,
    write_generated_dataset,
)

TARGETS = {"trainer_ratio": 0.95, "loader_headroom": 2.0}
RECIPE_MODEL_OPTIONS = (
    "dropout", "drop_path_rate", "label_smoothing", "coarse_loss_weight", "num_frozen_stages", "lr_conv", "lr_fc",
    "layer_decay", "weight_decay", "max_grad_norm", "ema_decay",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options; `--tiny` shrinks every size and count for a smoke test on any machine."""
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
    args = parser.parse_args(argv)
    recipe = json.loads(RECIPE.read_text())
    defaults = {
        "sizes": [224, 384], "batch_size": 128, "steps": 40, "warmup_steps": 5, "trainer_image_size": 224,
        "trainer_steps": 60, "loader_batches": 100, "workers": recipe["dataloader_num_workers"],
        "train_minutes": 1.5, "train_image_size": 32, "train_batch_size": 256,
    }  # fmt: skip
    if args.tiny:
        defaults.update(
            sizes=[32], batch_size=4, steps=2, warmup_steps=1, trainer_image_size=32, trainer_steps=3,
            loader_batches=2, workers=0, train_minutes=0.05, train_batch_size=16,
        )  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available (use --device cpu)")
    if args.dataset_name is None and not args.tiny:
        raise ValueError("--dataset_name is needed: a parquet folder in the uoft-cs/cifar100 schema")
    for name in ("batch_size", "steps", "warmup_steps", "trainer_steps", "loader_batches", "train_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.sizes + [args.trainer_image_size, args.train_image_size]) < 16:
        raise ValueError(
            f"image sizes must be >= 16, got {args.sizes}, {args.trainer_image_size}, {args.train_image_size}"
        )
    return args


def recipe_argv(args: argparse.Namespace, image_size: int, compile_model: bool, output_dir: str) -> list[str]:
    """`run_classification.py` options of the GPU recipe for a speed measurement: random initialisation (no
    download), `image_size`, the check's batch and workers, no evaluation, checkpoints or progress bars."""
    recipe = json.loads(RECIPE.read_text())
    cuda = args.device.startswith("cuda")
    options = {name: recipe[name] for name in RECIPE_MODEL_OPTIONS + AUGMENTATION_OPTIONS if name in recipe}
    argv = [f"--{name}={value}" for name, value in options.items()]
    argv += [
        "--dataset_name", args.dataset_name, "--output_dir", output_dir, "--do_train", "--backbone_weights", "none",
        "--image_size", str(image_size), "--batch_size", str(args.batch_size), "--channels_last", "true",
        "--bf16", str(recipe["bf16"] and cuda).lower(), "--torch_compile", str(compile_model).lower(),
        "--train_val_split", str(recipe["train_val_split"]), "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--logging_steps", str(recipe["logging_steps"]), "--report_to", "none",
        "--dataloader_num_workers", str(args.workers), "--seed", str(SEED), "--disable_tqdm", "true",
        "--log_level", "warning", "--use_cpu", str(not cuda).lower(),
    ]  # fmt: skip
    if not cuda:
        argv += ["--torch_compile_backend", "eager"]  # dynamo without compiling kernels: seconds on a CPU
    return argv


def reset_device(device: str) -> None:
    """Forget compiled graphs and the peak memory of the previous measurement."""
    torch._dynamo.reset()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------------------------
# 1: plain loop
# ----------------------------------------------------------------------------------------------------------------


def measure_plain_loop(
    args: argparse.Namespace, plan: dict[str, Any], image_size: int, compile_model: bool
) -> dict[str, Any]:
    """Images/s and peak GPU memory of the plain loop with the recipe's optimizer and settings (`plan`, from
    `benchmark.training_plan`) at `image_size`, eager or compiled as the recipe compiles."""
    plan = {**plan, "compile": plan["compile"] if compile_model else None}
    reset_device(args.device)
    loop_args = argparse.Namespace(
        batch_size=args.batch_size, image_size=image_size, warmup_steps=args.warmup_steps, steps=args.steps
    )
    start = time.perf_counter()
    record = run_ceiling(loop_args, plan)
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


class SyncCheckError(RuntimeError):
    """A training step synchronised the host with the device."""


def run_trainer(args: argparse.Namespace, argv: list[str], warmup_steps: int, check_syncs: bool) -> dict[str, Any]:
    """`run_classification.main(argv)` timed step by step; with `check_syncs` (CUDA only), every step after the
    warm-up runs under `torch.cuda.set_sync_debug_mode("error")`, and a synchronisation raises `SyncCheckError`."""
    from transformers import TrainerCallback

    import run_classification

    record: dict[str, Any] = {"stamps": []}
    check = check_syncs and args.device.startswith("cuda")

    class SyncCheck(TrainerCallback):
        def on_step_begin(self, training_args, state, control, **kwargs):
            if check and state.global_step >= warmup_steps:
                torch.cuda.set_sync_debug_mode("error")

        def on_step_end(self, training_args, state, control, **kwargs):
            if check:
                torch.cuda.set_sync_debug_mode("default")

    class StepTimer(TrainerCallback):
        def on_step_end(self, training_args, state, control, **kwargs):
            if state.global_step in (warmup_steps, state.max_steps):
                synchronize(args.device)
            record["stamps"].append(time.perf_counter())

        def on_train_end(self, training_args, state, control, **kwargs):
            record["peak_gpu_mb"] = peak_gpu_mb(args.device)

    class CheckedTrainer(run_classification.HierarchicalTrainer):
        def __init__(self, *trainer_args, callbacks=None, **kwargs):
            super().__init__(*trainer_args, callbacks=[*(callbacks or []), SyncCheck(), StepTimer()], **kwargs)

    reset_device(args.device)
    try:
        metrics = run_classification.main(argv, trainer_class=CheckedTrainer)
    except RuntimeError as error:
        if check and "synchronizing" in str(error):
            frames = traceback.extract_tb(error.__traceback__)
            where = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-4:])
            raise SyncCheckError(f"{str(error).splitlines()[0]} (at {where})") from error
        raise
    finally:
        if check:
            torch.cuda.set_sync_debug_mode("default")
    if not math.isfinite(metrics["train_loss"]):
        raise ValueError(f"the Trainer run ended with train_loss {metrics['train_loss']}")
    return {**step_figures(record["stamps"], warmup_steps, args.batch_size), "peak_gpu_mb": record["peak_gpu_mb"]}


# ----------------------------------------------------------------------------------------------------------------
# 3: DataLoader
# ----------------------------------------------------------------------------------------------------------------


def measure_loader(args: argparse.Namespace, argv: list[str]) -> float:
    """Images/s of the Trainer's training batches (decode, policy, collation in `--workers` workers, pinned
    memory on CUDA), without training."""
    from torch.utils.data import DataLoader

    from configuration_hierarchical import HierarchicalEfficientNetV2Config
    from data_utils import HierarchicalCollator, apply_transforms, prepare_datasets
    from run_classification import parse_args

    model_args, data_args, _ = parse_args(argv)
    config = HierarchicalEfficientNetV2Config(backbone_weights=None, **model_args.config_overrides())
    train = apply_transforms(prepare_datasets(data_args, config, seed=SEED), config, data_args, seed=SEED)["train"]
    collator = HierarchicalCollator(
        config, data_args.mixup_alpha, data_args.cutmix_alpha, data_args.mix_prob, data_args.cutmix_switch_prob, SEED
    )
    loader = DataLoader(
        train,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        collate_fn=collator,
        pin_memory=args.device.startswith("cuda"),
        generator=torch.Generator().manual_seed(SEED),
    )
    iterator, images, start = iter(loader), 0, None
    for _ in range(args.loader_batches + 1):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        if start is None:  # the first batch waits for the workers to start
            start = time.perf_counter()
            continue
        images += len(batch["labels"])
    return images / (time.perf_counter() - start)


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
    for name, threshold in TARGETS.items():
        value = r[name]
        verdict = "not measured" if value is None else ("met" if value >= threshold else "MISSED")
        shown = "-" if value is None else f"{value:.3f}"
        print(f"{name:<44} {shown:>22}  target >= {threshold:g}: {verdict}")
    print()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every part, print the table and the JSON line, and return the results."""
    args = parse_args(argv)
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)  # tiny: one thread is faster on a busy shared CPU
    start = time.perf_counter()
    budget = args.budget_minutes * 60

    def remaining() -> float:
        return budget - (time.perf_counter() - start)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        if args.dataset_name is None:  # --tiny
            args.dataset_name = str(Path(tmp, "data"))
            write_generated_dataset(Path(args.dataset_name), 400)
        results: dict[str, Any] = {}
        # 1: plain loop; the compiled one at the Trainer's size is the Trainer's reference
        plain_sizes = list(dict.fromkeys([args.trainer_image_size, *args.sizes]))
        plans = {size: training_plan(recipe_argv(args, size, True, str(Path(tmp, "plan")))) for size in plain_sizes}
        for size in plain_sizes:
            results[f"plain_eager_{size}"] = measure_plain_loop(args, plans[size], size, compile_model=False)
        size = args.trainer_image_size
        results[f"plain_compile_{size}"] = measure_plain_loop(args, plans[size], size, compile_model=True)
        # 2: the Trainer, with the sync check (and once more without it if it stops the run)
        trainer_argv = recipe_argv(args, args.trainer_image_size, True, str(Path(tmp, "trainer")))
        trainer_argv += ["--max_steps", str(args.warmup_steps + args.trainer_steps)]
        sync_check = "passed" if args.device.startswith("cuda") else "not run (CPU)"
        try:
            trainer = run_trainer(args, trainer_argv, args.warmup_steps, check_syncs=True)
        except SyncCheckError as error:
            sync_check = f"FAILED: {error}"
            trainer = run_trainer(args, trainer_argv, args.warmup_steps, check_syncs=False)
        # 3: DataLoader
        loader = measure_loader(args, trainer_argv)
        # 1 again: the compiled plain loop at the other sizes, if the time allows (compiling takes about a minute)
        for size in plain_sizes:
            if f"plain_compile_{size}" not in results and remaining() > 150:
                results[f"plain_compile_{size}"] = measure_plain_loop(args, plans[size], size, compile_model=True)
        # 4: from-scratch training with what is left
        minutes = min(args.train_minutes, (remaining() - 30) / 60)
        scratch = None
        if minutes >= min(args.train_minutes, 0.5):
            scratch = train_from_scratch(args, round(minutes, 2), str(Path(tmp, "scratch")))

    reference = results[f"plain_compile_{args.trainer_image_size}"]["images_per_s"]
    summary: dict[str, Any] = {
        "trainer_ratio": trainer["images_per_s"] / reference,
        "loader_headroom": loader / trainer["images_per_s"],
        "trainer_images_per_s": trainer["images_per_s"],
        "trainer_median_step_images_per_s": trainer["median_step_images_per_s"],
        "trainer_step_spread": trainer["step_spread"],
        "trainer_peak_gpu_mb": trainer["peak_gpu_mb"],
        "loader_images_per_s": loader,
        "sync_check": sync_check,
        "sync_check_passed": sync_check == "passed",
        "from_scratch": scratch,
    }
    for size in plain_sizes:
        for mode in ("eager", "compile"):
            run = results.get(f"plain_{mode}_{size}")
            summary[f"plain_{mode}_{size}_images_per_s"] = run["images_per_s"] if run else None
            summary[f"plain_{mode}_{size}_peak_gpu_mb"] = run["peak_gpu_mb"] if run else None
            summary[f"plain_{mode}_{size}_seconds"] = run["seconds"] if run else None
    cuda = args.device.startswith("cuda")
    import transformers

    summary.update(
        sizes=plain_sizes,
        trainer_image_size=args.trainer_image_size,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        trainer_steps=args.trainer_steps,
        workers=args.workers,
        bf16=results[f"plain_compile_{args.trainer_image_size}"]["plan"]["autocast"] is not None,
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
    print_table(summary)
    line = json.dumps(summary)
    print(line, flush=True)
    if args.json_path:
        Path(args.json_path).write_text(line + "\n")
    return summary


if __name__ == "__main__":
    main()
