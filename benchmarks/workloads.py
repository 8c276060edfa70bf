"""What `benchmark.py` and `gpu_check.py` both run: the GPU recipe's options, generated CIFAR-style data, and the
plain PyTorch training loop (forward, backward, AdamW step on pre-made tensors) with the Trainer's settings.

The project modules are imported inside the functions that use them: the plain loop's process then holds only
what a training loop needs (torch and the model), so its memory and start-up are not inflated by `datasets`.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from measuring import REPO_ROOT, SEED, peak_gpu_mb, peak_rss_mb, synchronize

RECIPE = REPO_ROOT / "recipes" / "gpu_imagenet_384px.json"
AUGMENTATION_OPTIONS = (
    "augmentation", "random_crop", "horizontal_flip", "rotation_degrees", "color_jitter", "random_erasing",
    "mixup_alpha", "cutmix_alpha", "mix_prob", "cutmix_switch_prob",
)  # fmt: skip


def recipe() -> dict[str, Any]:
    """Every option of `RECIPE`."""
    return json.loads(RECIPE.read_text())


def recipe_options(names: tuple[str, ...] = AUGMENTATION_OPTIONS) -> dict[str, Any]:
    """The options of `RECIPE` among `names` (by default its augmentation), in the order of `names`."""
    options = recipe()
    return {name: options[name] for name in names if name in options}


def write_generated_dataset(folder: Path, num_rows: int) -> None:
    """A parquet shard of random 32x32 PNGs in the `uoft-cs/cifar100` schema (`img`, `fine_label`, `coarse_label`)."""
    from datasets import ClassLabel, Dataset, Features, Image

    from configuration_hierarchical import CIFAR100_COARSE_LABELS, CIFAR100_FINE_LABELS, CIFAR100_FINE_TO_COARSE
    from hierarchical.data.sources import png_bytes

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


def training_plan(argv: list[str]) -> dict[str, Any]:
    """What the Trainer builds for `argv`, for the plain loop to copy: model config, parameter groups (by parameter
    name), optimizer kwargs, device, mixed precision and torch.compile settings."""
    from hierarchical.training.model_loading import load_model
    from hierarchical.training.trainer import HierarchicalTrainer, parameter_groups
    from run_classification import parse_args

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


def run_plain_loop(
    plan: dict[str, Any], batch_size: int, image_size: int, warmup_steps: int, steps: int
) -> dict[str, Any]:
    """Forward, backward and AdamW step on one pre-made batch, as `plan` (from [`training_plan`]) says, timed
    after every step: the time stamps, the wall-clock end of the first step and the memory peaks."""
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
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, device=device)
    labels = torch.randint(0, config.num_labels, (batch_size,), device=device)
    coarse_labels = config.fine_to_coarse_tensor(device)[labels]

    stamps, first_step_end, total = [], None, warmup_steps + steps
    for step in range(total):
        with autocast:
            loss = forward(pixel_values=pixel_values, labels=labels, coarse_labels=coarse_labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in (0, warmup_steps - 1, total - 1):
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
