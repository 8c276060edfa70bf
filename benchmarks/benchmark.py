#!/usr/bin/env python
"""Throughput, memory and start-up of the project's training and inference paths, against plain-PyTorch ceilings.

    python benchmarks/benchmark.py                     # 32 px, batch 64: about 3 minutes on 2 cores
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
   also the forward alone), and `pipeline("image-classification", batch_size=B)`;
5. peak resident memory and start-up time (process start to the end of the first optimizer step) of 1 and 2;
6. the data path of `recipes/gpu_imagenet_384px.json` at 224 and 384 px: bytes per sample crossing the DataLoader
   and a worker's CPU time per 1,000 samples, before and after preprocessing moved to the device (which takes
   `DevicePreprocessor`'s time, measured apart); `--data_path_only` measures only this.

Every measurement runs `--repeats` times, alternating, and the fastest run counts. A table goes to stdout, then one
JSON line with the ratios, the figures behind them and the settings. The targets in the table are for a quiet
2-core machine; `other_processes_cpu_share` says how busy the machine was (other processes lower every figure).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
# The project modules are imported inside the functions that use them: the ceiling's process then holds only what
# a plain training loop needs (torch and the model), so its memory and start-up are not inflated by `datasets`.

HUB_DATASET = "uoft-cs/cifar100"
GENERATED = "generated"
RESULT_PREFIX = "BENCHMARK_CHILD_RESULT "
SEED = 42
BUSY_SHARE = 0.05  # above this share of the CPUs taken by other processes, the table warns
# name: (direction, threshold); for a quiet 2-core machine at 32 px and batch 64.
TARGETS = {
    "train_ratio": (">=", 0.95),
    "loader_ratio": (">=", 5.0),
    "pipeline_ratio": (">=", 0.8),
    "memory_ratio": ("<=", 1.3),
}
# The GPU recipe's data path (any machine): bytes per CIFAR sample crossing the DataLoader, and how many times less
# worker CPU time per sample it takes at 384 px than when workers also resized, normalised, erased and mixed.
DATA_PATH_TARGETS = {"after_bytes_per_sample": ("<=", 4096.0), "worker_cpu_reduction_384": (">=", 10.0)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark options; `--tiny` shrinks every default for a smoke test."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_size", type=int, default=32, help="Model input resolution (default 32).")
    parser.add_argument("--batch_size", type=int, default=None, help="Training and inference batch (default 64).")
    parser.add_argument("--steps", type=int, default=None, help="Timed training steps after warm-up (default 40).")
    parser.add_argument("--warmup_steps", type=int, default=None, help="Untimed first training steps (default 5).")
    parser.add_argument(
        "--loader_batches", type=int, default=None, help="Timed data-pipeline batches per image size (default 20)."
    )
    parser.add_argument(
        "--inference_images", type=int, default=None, help="Images for the inference measurements (default 1024)."
    )
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
    parser.add_argument("--child", choices=("ceiling", "trainer"), help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--spawn_time", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = {"batch_size": 64, "steps": 40, "warmup_steps": 5, "loader_batches": 20, "inference_images": 1024}
    defaults["repeats"] = 2
    if args.tiny:
        defaults = {"batch_size": 8, "steps": 2, "warmup_steps": 1, "loader_batches": 2, "inference_images": 16}
        defaults["repeats"] = 1
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dataset_note = ""
    if args.dataset is None and not args.child:
        args.dataset = GENERATED if args.tiny else HUB_DATASET
        if not args.tiny:
            from remote_resources import hub_reachable, needed_resources

            if not (needed_resources(HUB_DATASET, None, None)[0].cached or hub_reachable()):
                args.dataset, args.dataset_note = GENERATED, f" ({HUB_DATASET} not cached and the Hub does not answer)"
    for name in ("batch_size", "steps", "warmup_steps", "loader_batches", "inference_images", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.image_size < 16:
        raise ValueError(f"--image_size must be >= 16, got {args.image_size}")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (`ru_maxrss` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


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


def write_generated_dataset(folder: Path, num_rows: int) -> None:
    """A parquet shard of random 32x32 PNGs in the `uoft-cs/cifar100` schema (`img`, `fine_label`, `coarse_label`)."""
    from datasets import ClassLabel, Dataset, Features, Image

    from configuration_hierarchical import CIFAR100_COARSE_LABELS, CIFAR100_FINE_LABELS, CIFAR100_FINE_TO_COARSE
    from data_sources import png_bytes

    rng = np.random.default_rng(SEED)
    # Smooth colour fields plus noise: closer to photographs than white noise in PNG size and decoding cost.
    coarse = rng.integers(0, 256, (num_rows, 4, 4, 3)).repeat(8, axis=1).repeat(8, axis=2)
    pixels = np.clip(coarse + rng.normal(0, 24, coarse.shape), 0, 255).astype(np.uint8)  # (rows, 32, 32, 3)
    images = [{"bytes": png_bytes(array), "path": None} for array in pixels]
    fine = rng.integers(0, len(CIFAR100_FINE_LABELS), num_rows)
    features = Features(
        {
            "img": Image(),
            "fine_label": ClassLabel(names=CIFAR100_FINE_LABELS),
            "coarse_label": ClassLabel(names=CIFAR100_COARSE_LABELS),
        }
    )
    columns = {"img": images, "fine_label": fine.tolist(), "coarse_label": [CIFAR100_FINE_TO_COARSE[f] for f in fine]}
    folder.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(columns, features=features).to_parquet(str(folder / "train-00000-of-00001.parquet"))


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


def peak_gpu_mb(device: str) -> float | None:
    """Peak memory allocated by tensors on the CUDA device in MiB; None on CPU."""
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def synchronize(device: str) -> None:
    """Wait for the accelerator's queued work, so that a time stamp covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# 1 and 2: training, each in its own process
# ----------------------------------------------------------------------------------------------------------------


def training_plan(argv: list[str]) -> dict[str, Any]:
    """What the Trainer builds for `argv`, for the ceiling to copy: model config, parameter groups (by parameter
    name), optimizer kwargs, device, mixed precision and torch.compile settings."""
    from run_classification import HierarchicalTrainer, load_model, parameter_groups, parse_args

    model_args, _, training_args = parse_args(argv)
    model = load_model(model_args)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    groups = parameter_groups(
        model, training_args.lr_conv, training_args.lr_fc, training_args.weight_decay, training_args.layer_decay
    )
    optimizer_cls, kwargs = HierarchicalTrainer.get_optimizer_cls_and_kwargs(training_args, model)
    if optimizer_cls is not torch.optim.AdamW:
        raise ValueError(f"the ceiling loop uses torch.optim.AdamW, but the Trainer would use {optimizer_cls}")
    if training_args.fp16:
        raise ValueError("--fp16 needs a gradient scaler, which the ceiling loop does not have: measure with --bf16")
    compile_options = None
    if training_args.torch_compile:
        compile_options = {"backend": training_args.torch_compile_backend, "mode": training_args.torch_compile_mode}
    return {
        "config": model.config.to_diff_dict(),
        "groups": [{**group, "params": [names[id(p)] for p in group["params"]]} for group in groups],
        "optimizer_kwargs": {key: value for key, value in kwargs.items() if key != "params"},
        "device": str(training_args.device),
        "autocast": "bfloat16" if training_args.bf16 else None,
        "compile": compile_options,
        "keep_freed_memory": training_args.keep_freed_memory,
    }


def run_ceiling(args: argparse.Namespace, plan: dict[str, Any]) -> dict[str, Any]:
    """Child process 1: forward, backward and AdamW step on one pre-made batch, timed after every step."""
    from modeling_hierarchical import HierarchicalEfficientNetV2Config, HierarchicalEfficientNetV2ForImageClassification

    torch.manual_seed(SEED)
    device = plan["device"]
    config = HierarchicalEfficientNetV2Config.from_dict(plan["config"])
    model = HierarchicalEfficientNetV2ForImageClassification(config).to(device).train()
    parameters = dict(model.named_parameters())
    groups = [{**group, "params": [parameters[name] for name in group["params"]]} for group in plan["groups"]]
    optimizer = torch.optim.AdamW(groups, **plan["optimizer_kwargs"])
    forward = torch.compile(model, **plan["compile"]) if plan["compile"] else model
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if plan["autocast"] else nullcontext()
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, config.num_labels, (args.batch_size,), device=device)
    coarse_labels = config.fine_to_coarse_tensor(device)[labels]

    stamps, first_step_end, total = [], None, args.warmup_steps + args.steps
    for step in range(total):
        with autocast:
            loss = forward(pixel_values=pixel_values, labels=labels, coarse_labels=coarse_labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in (0, args.warmup_steps - 1, total - 1):
            synchronize(device)
        stamps.append(time.perf_counter())
        first_step_end = first_step_end or time.time()
    if not math.isfinite(loss.item()):
        raise ValueError(f"the ceiling loop ended with loss {loss.item()}")
    return {
        "stamps": stamps,
        "first_step_end": first_step_end,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": peak_gpu_mb(device),
    }


def run_trainer(args: argparse.Namespace, plan: dict[str, Any]) -> dict[str, Any]:
    """Child process 2: `run_classification.main` with a callback that stamps the end of every optimizer step."""
    from transformers import TrainerCallback

    import run_classification

    record: dict[str, Any] = {"stamps": [], "first_step_end": None}

    class StepTimer(TrainerCallback):
        def on_step_end(self, training_args, state, control, **kwargs):
            if state.global_step in (1, args.warmup_steps, state.max_steps):
                synchronize(plan["device"])
            record["stamps"].append(time.perf_counter())
            record["first_step_end"] = record["first_step_end"] or time.time()

        def on_train_end(self, training_args, state, control, **kwargs):
            record["peak_rss_mb"] = peak_rss_mb()  # before main() saves the model
            record["peak_gpu_mb"] = peak_gpu_mb(plan["device"])

    class TimedTrainer(run_classification.HierarchicalTrainer):
        def __init__(self, *trainer_args, callbacks=None, **kwargs):
            super().__init__(*trainer_args, callbacks=[*(callbacks or []), StepTimer()], **kwargs)

    metrics = run_classification.main(plan["trainer_argv"], trainer_class=TimedTrainer)
    if not math.isfinite(metrics["train_loss"]):
        raise ValueError(f"the Trainer run ended with train_loss {metrics['train_loss']}")
    return record


def run_child(args: argparse.Namespace) -> None:
    """Entry point of a child process: run one training measurement and print its result as one prefixed line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = json.loads(Path(args.plan).read_text())
    record = (run_ceiling if args.child == "ceiling" else run_trainer)(args, plan)
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
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--plan", str(plan_path)]
    for name in ("image_size", "batch_size", "steps", "warmup_steps", "threads"):
        if getattr(args, name) is not None:
            command += [f"--{name}", str(getattr(args, name))]
    command += ["--spawn_time", repr(time.time())]
    env = dict(os.environ)
    if kind == "ceiling" and json.loads(plan_path.read_text())["keep_freed_memory"]:
        # The Trainer's process sets the same allocator thresholds on itself (`--keep_freed_memory`, the default).
        from run_classification import MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD

        env.update(MALLOC_MMAP_THRESHOLD_=str(MALLOC_MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(MALLOC_TRIM_THRESHOLD))
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(
            f"the {kind} measurement failed (exit code {completed.returncode}):\n{completed.stderr[-3000:]}"
        )
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


# ----------------------------------------------------------------------------------------------------------------
# 3 and 4: data pipeline and inference, in this process
# ----------------------------------------------------------------------------------------------------------------


def prepare_splits(dataset: str, cache_dir: str | None):
    """The dataset as `run_classification.py` prepares it (the image size does not matter at this stage)."""
    from configuration_hierarchical import HierarchicalEfficientNetV2Config
    from data_utils import DataArguments, prepare_datasets

    data_args = DataArguments(dataset_name=dataset, cache_dir=cache_dir)
    config = HierarchicalEfficientNetV2Config(backbone_weights=None)
    return prepare_datasets(data_args, config, seed=SEED), data_args


def measure_loader(splits, data_args, image_size: int, batch_size: int, batches: int) -> float:
    """Images/s of decode + augmentation + collation of training batches in the main process, on one thread."""
    from torch.utils.data import DataLoader

    from configuration_hierarchical import HierarchicalEfficientNetV2Config
    from data_utils import HierarchicalCollator, apply_transforms

    config = HierarchicalEfficientNetV2Config(backbone_weights=None, image_size=image_size)
    train = apply_transforms(splits, config, data_args, seed=SEED)["train"]
    loader = DataLoader(
        train,
        batch_size=batch_size,
        shuffle=True,
        num_workers=0,
        collate_fn=HierarchicalCollator(config, seed=SEED),
        generator=torch.Generator().manual_seed(SEED),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs with one thread
    try:
        iterator = iter(loader)
        next(iterator)  # warm-up
        start, images = time.perf_counter(), 0
        for _ in range(batches):
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(loader)
                batch = next(iterator)
            images += len(batch["labels"])
        return images / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


RECIPE = REPO_ROOT / "recipes" / "gpu_imagenet_384px.json"
AUGMENTATION_OPTIONS = (
    "augmentation", "random_crop", "horizontal_flip", "rotation_degrees", "color_jitter", "random_erasing",
    "mixup_alpha", "cutmix_alpha", "mix_prob", "cutmix_switch_prob",
)  # fmt: skip
DATA_PATH_SIZES = (224, 384)


def recipe_data_args(dataset: str, cache_dir: str | None):
    """`DataArguments` with the augmentation options of the GPU recipe."""
    from data_utils import DataArguments

    recipe = json.loads(RECIPE.read_text())
    options = {name: recipe[name] for name in AUGMENTATION_OPTIONS if name in recipe}
    return DataArguments(dataset_name=dataset, cache_dir=cache_dir, **options)


def previous_train_transform(config, data_args):
    """The training transform as workers ran it before preprocessing moved to the device: for the torchvision
    policies, one per-image transform from the PIL image to the normalised float tensor at the model size (crop,
    flip, policy, resize, normalisation, random erasing); for 'original' and 'none', `BatchedAugment`, whose
    device-side steps then also run in the worker (`previous_collate`)."""
    from torchvision.transforms import v2

    from data_utils import PolicyAugment, RandomCropWithPadding, ToNormalizedFloat, build_train_transform, to_rgb

    if data_args.augmentation not in PolicyAugment.POLICIES:
        return build_train_transform(config, data_args)
    steps = [to_rgb]
    if data_args.random_crop:
        steps.append(RandomCropWithPadding())
    if data_args.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [
        PolicyAugment.POLICIES[data_args.augmentation](),
        v2.PILToTensor(),
        v2.Resize((config.image_size, config.image_size), antialias=True),
        ToNormalizedFloat(config.image_mean, config.image_std),
    ]
    if data_args.random_erasing > 0:
        steps.append(v2.RandomErasing(p=data_args.random_erasing, value=0))
    return v2.Compose(steps)


def previous_collate(collator, preprocess):
    """The collation as workers ran it before preprocessing moved to the device: the batch of model-size float
    images (after the device-side steps of 'original' and 'none', run here), then MixUp on the whole batch or
    CutMix by copying the rectangle, on the CPU, with the parameters the collator drew."""

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = collator(examples)
        augmentation = batch.pop("augmentation", {})
        mix = {key: augmentation.pop(key) for key in ("mix_index", "mix_box", "mix_weights") if key in augmentation}
        batch = preprocess({**batch, "augmentation": augmentation})
        if not mix:
            return batch
        pixels, index = batch["pixel_values"], mix["mix_index"]
        top, left, bottom, right = mix["mix_box"][0].tolist()  # the same for every image of a batch
        pixel_lam, target_lam = mix["mix_weights"][0].tolist()
        if bottom > top and right > left:
            pixels[..., top:bottom, left:right] = pixels[index, :, top:bottom, left:right]
        elif pixel_lam != 1.0:
            pixels = pixels * pixel_lam + pixels[index] * (1.0 - pixel_lam)
        targets = torch.nn.functional.one_hot(batch["labels"], collator.config.num_labels).float()
        targets = targets * target_lam + targets[index] * (1.0 - target_lam)
        return {"pixel_values": pixels, "labels": targets, "coarse_labels": targets @ preprocess.hierarchy}

    return collate


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in a (nested) batch."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def measure_data_path(splits, data_args, image_size: int, batch_size: int, batches: int) -> dict[str, float]:
    """The GPU recipe's training data path at `image_size`, before and after preprocessing moved to the device:
    bytes per sample of the batches that cross the DataLoader, and CPU time per 1,000 samples of what a worker
    does (decode, augmentation, collation), measured in this process on one thread. Before: workers ship normalised
    float32 images at the model size, mixed. After: 8-bit images at the source size with the drawn parameters; the
    time `DevicePreprocessor` then takes on these batches on the CPU is measured separately (on a GPU it runs
    there)."""
    from datasets import Image
    from torch.utils.data import DataLoader

    from configuration_hierarchical import HierarchicalEfficientNetV2Config
    from data_utils import HierarchicalCollator, ImageTransform, build_train_transform
    from device_preprocess import DevicePreprocessor

    config = HierarchicalEfficientNetV2Config(backbone_weights=None, image_size=image_size)
    train = splits["train"].cast_column("image", Image(decode=False))
    collator = HierarchicalCollator(
        config, data_args.mixup_alpha, data_args.cutmix_alpha, data_args.mix_prob, data_args.cutmix_switch_prob, SEED
    )
    preprocess = DevicePreprocessor(config)

    def run(transform, collate_fn, device_step=None) -> dict[str, float]:
        loader = DataLoader(
            train.with_transform(ImageTransform(transform, seed=SEED)),
            batch_size=batch_size,
            shuffle=True,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(SEED),
        )
        iterator = iter(loader)
        next(iterator)  # warm-up
        worker_seconds = device_seconds = 0.0
        samples = size = 0
        for _ in range(batches):
            start = time.process_time()
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(loader)
                batch = next(iterator)
            worker_seconds += time.process_time() - start
            samples, size = samples + len(batch["labels"]), size + tensor_bytes(batch)
            if device_step is not None:
                start = time.process_time()
                device_step(batch)
                device_seconds += time.process_time() - start
        return {
            "bytes": size / samples,
            "worker_ms": 1e6 * worker_seconds / samples,
            "device_ms": 1e6 * device_seconds / samples,
        }

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs with one thread
    try:
        before = run(previous_train_transform(config, data_args), previous_collate(collator, preprocess))
        after = run(build_train_transform(config, data_args), collator, device_step=preprocess)
    finally:
        torch.set_num_threads(threads)
    return {
        "before_bytes_per_sample": before["bytes"],
        "after_bytes_per_sample": after["bytes"],
        "before_worker_cpu_ms_per_1000": before["worker_ms"],
        "after_worker_cpu_ms_per_1000": after["worker_ms"],
        "device_step_cpu_ms_per_1000": after["device_ms"],
        "worker_cpu_reduction": before["worker_ms"] / after["worker_ms"],
    }


def measure_inference(
    splits, image_size: int, batch_size: int, num_images: int, repeats: int, device: str, folder: Path
) -> dict[str, float]:
    """Images/s of classifying the same PIL images three ways: by hand in batches (image processor on a batch, then
    an eval-mode forward under no_grad), the forward alone on pre-processed tensors, and
    `pipeline("image-classification", batch_size=...)` loading the model and image processor saved to `folder`."""
    from transformers import pipeline

    from modeling_hierarchical import (
        HierarchicalEfficientNetV2Config,
        HierarchicalEfficientNetV2ForImageClassification,
        build_image_processor,
    )

    torch.manual_seed(SEED)
    config = HierarchicalEfficientNetV2Config(backbone_weights=None, image_size=image_size)
    model = HierarchicalEfficientNetV2ForImageClassification(config).eval()
    processor = build_image_processor(config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    model.to(device)
    source = splits["train"]
    rows = [i % len(source) for i in range(num_images)]
    images = [image.convert("RGB") for image in source.select(rows)["image"]]  # decoded once, outside the timing
    image_batches = [images[start : start + batch_size] for start in range(0, num_images, batch_size)]
    tensor_batches = [
        processor(images=batch, return_tensors="pt")["pixel_values"].to(device) for batch in image_batches
    ]
    classifier = pipeline("image-classification", model=str(folder), batch_size=batch_size, device=device)

    @torch.no_grad()
    def batched() -> torch.Tensor:
        logits = [
            model(pixel_values=processor(images=batch, return_tensors="pt")["pixel_values"].to(device)).logits
            for batch in image_batches
        ]
        return torch.cat(logits).cpu()

    @torch.no_grad()
    def forward_only() -> None:
        for pixel_values in tensor_batches:
            model(pixel_values=pixel_values)
        synchronize(device)

    runs = {"batched": batched, "forward": forward_only, "pipeline": lambda: classifier(images)}
    speeds = dict.fromkeys(runs, 0.0)
    batched(), classifier(images[:batch_size])  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()  # the pipeline returns Python lists and `batched` a CPU tensor: nothing is left queued
            speeds[name] = max(speeds[name], num_images / (time.perf_counter() - start))
    # Same model, same inputs: the top-1 classes agree. Raw logits, since a random model's softmax scores tie.
    checked = classifier(image_batches[0], function_to_apply="none", top_k=1)
    expected = [config.id2label[int(i)] for i in batched()[: len(checked)].argmax(-1)]
    agreement = float(np.mean([p[0]["label"] == e for p, e in zip(checked, expected, strict=True)]))
    return {
        "batched_images_per_s": speeds["batched"],
        "forward_only_images_per_s": speeds["forward"],
        "pipeline_images_per_s": speeds["pipeline"],
        "pipeline_top1_agreement": agreement,
    }


def measure_recipe_data_path(splits, dataset: str, cache_dir: str | None, args: argparse.Namespace) -> dict:
    """`measure_data_path` at 224 and 384 px, best of `--repeats` (the least CPU time of each figure), flattened
    into `<figure>_<size>` keys, with `after_bytes_per_sample` the largest of the sizes."""
    data_args = recipe_data_args(dataset, cache_dir)
    results: dict[str, Any] = {"data_path_sizes": list(DATA_PATH_SIZES), "data_path_recipe": RECIPE.name}
    for size in DATA_PATH_SIZES:
        runs = [
            measure_data_path(splits, data_args, size, args.batch_size, args.loader_batches)
            for _ in range(args.repeats)
        ]
        best = {name: min(run[name] for run in runs) for name in runs[0]}
        best["worker_cpu_reduction"] = best["before_worker_cpu_ms_per_1000"] / best["after_worker_cpu_ms_per_1000"]
        results.update({f"{name}_{size}": value for name, value in best.items()})
    results["after_bytes_per_sample"] = max(results[f"after_bytes_per_sample_{size}"] for size in DATA_PATH_SIZES)
    recipe = json.loads(RECIPE.read_text())
    results["data_path_augmentation"] = {name: recipe[name] for name in AUGMENTATION_OPTIONS if name in recipe}
    return results


def print_data_path_table(results: dict[str, Any]) -> None:
    """The data path figures, before and after preprocessing moved to the device, then their targets."""
    r = results
    print(f"\ndata path of {r['data_path_recipe']}, batch {r['batch_size']}, one thread: {r['data_path_augmentation']}")
    print(
        f"{'size':>5} {'bytes/sample before':>20} {'after':>7} {'worker CPU ms/1000 before':>26} {'after':>7} "
        f"{'reduction':>9}  {'device step on the CPU ms/1000':>30}"
    )
    for size in r["data_path_sizes"]:
        print(
            f"{size:>5} {r[f'before_bytes_per_sample_{size}']:>20,.0f} {r[f'after_bytes_per_sample_{size}']:>7,.0f} "
            f"{r[f'before_worker_cpu_ms_per_1000_{size}']:>26,.0f} {r[f'after_worker_cpu_ms_per_1000_{size}']:>7,.0f} "
            f"{r[f'worker_cpu_reduction_{size}']:>8.1f}x  {r[f'device_step_cpu_ms_per_1000_{size}']:>30,.0f}"
        )
    for name, (direction, threshold) in DATA_PATH_TARGETS.items():
        value = r[name]
        met = value >= threshold if direction == ">=" else value <= threshold
        print(f"{name:<26} {value:9.1f}  {direction} {threshold:<6g} {'met' if met else 'MISSED'}")
    print()


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
    print(f"\n{'ratio':<16} {'value':>7}  target (quiet 2-core machine, 32 px, batch 64)")
    for name, (direction, threshold) in TARGETS.items():
        value = r[name]
        met = value >= threshold if direction == ">=" else value <= threshold
        print(f"{name:<16} {value:7.3f}  {direction} {threshold:<5} {'met' if met else 'MISSED'}")
    print()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every measurement, print the table and the JSON line, and return the results."""
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before, cpu_before, start = os.getloadavg(), busy_cpu_seconds(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hierarchical-benchmark-") as tmp:
        dataset, cache_dir = args.dataset, None  # a real dataset is cached where a training run caches it
        if dataset == GENERATED:
            rows = math.ceil(1.25 * (args.warmup_steps + args.steps + 2) * args.batch_size) + 64
            dataset, cache_dir = str(Path(tmp, "data")), str(Path(tmp, "cache"))
            write_generated_dataset(Path(dataset), max(rows, args.inference_images))
        elif not Path(dataset).exists() and dataset != HUB_DATASET:
            raise FileNotFoundError(f"--dataset_name {dataset!r}: no such folder")
        # The data measurements come first: they also build the datasets cache the Trainer's process then reads.
        splits, data_args = prepare_splits(dataset, cache_dir)
        data_path = measure_recipe_data_path(splits, dataset, cache_dir, args)
        if args.data_path_only:
            results = {**data_path, "batch_size": args.batch_size, "repeats": args.repeats, "dataset": args.dataset}
            results["torch_version"] = torch.__version__
            print_data_path_table(results)
            print(json.dumps(results), flush=True)
            return results
        loader = {
            size: max(
                measure_loader(splits, data_args, size, args.batch_size, args.loader_batches)
                for _ in range(args.repeats)
            )
            for size in dict.fromkeys((32, 224, args.image_size))
        }
        argv_trainer = trainer_argv(args, dataset, cache_dir, str(Path(tmp, "trainer-output")))
        plan = {**training_plan(argv_trainer), "trainer_argv": argv_trainer}
        plan_path = Path(tmp, "plan.json")
        plan_path.write_text(json.dumps(plan))
        inference = measure_inference(
            splits,
            args.image_size,
            args.batch_size,
            args.inference_images,
            args.repeats,
            plan["device"],
            Path(tmp, "saved-model"),
        )
        runs = {"ceiling": [], "trainer": []}
        for _ in range(args.repeats):
            for kind, results in runs.items():
                results.append(spawn_child(kind, args, plan_path))
        ceiling, trainer = (max(runs[kind], key=lambda run: run["images_per_s"]) for kind in ("ceiling", "trainer"))

    results = {
        "train_ratio": trainer["images_per_s"] / ceiling["images_per_s"],
        "loader_ratio": loader[args.image_size] / trainer["images_per_s"],
        "pipeline_ratio": inference["pipeline_images_per_s"] / inference["batched_images_per_s"],
        "memory_ratio": trainer["peak_rss_mb"] / ceiling["peak_rss_mb"],
        "ceiling_images_per_s": ceiling["images_per_s"],
        "trainer_images_per_s": trainer["images_per_s"],
        "loader_images_per_s": loader[args.image_size],
        **{f"loader_images_per_s_{size}": value for size, value in loader.items()},
        "loader_image_sizes": list(loader),
        **inference,
        **data_path,
        "ceiling_peak_rss_mb": ceiling["peak_rss_mb"],
        "trainer_peak_rss_mb": trainer["peak_rss_mb"],
        "ceiling_peak_gpu_mb": ceiling["peak_gpu_mb"],
        "trainer_peak_gpu_mb": trainer["peak_gpu_mb"],
        "ceiling_startup_s": ceiling["startup_s"],
        "trainer_startup_s": trainer["startup_s"],
        "ceiling_step_spread": ceiling["step_spread"],
        "trainer_step_spread": trainer["step_spread"],
        "ceiling_images_per_s_runs": [run["images_per_s"] for run in runs["ceiling"]],
        "trainer_images_per_s_runs": [run["images_per_s"] for run in runs["trainer"]],
        "ceiling_median_step_images_per_s": ceiling["median_step_images_per_s"],
        "trainer_median_step_images_per_s": trainer["median_step_images_per_s"],
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "trainer_args": args.trainer_args,
        "keep_freed_memory": plan["keep_freed_memory"],
        "device": plan["device"],
        "threads": trainer["threads"],
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "other_processes_cpu_share": other_cpu_share(cpu_before, time.perf_counter() - start),
        "benchmark_seconds": time.perf_counter() - start,
        "dataset": (GENERATED if args.dataset == GENERATED else args.dataset) + args.dataset_note,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
    import transformers

    results["transformers_version"] = transformers.__version__
    print_table(results)
    print_data_path_table(results)
    print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()
