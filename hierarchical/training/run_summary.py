"""What a run of `run_classification.py` says about itself: a short summary at the top of its log, and every option
in `run_options.json` in its output folder."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import transformers
from torch import nn
from transformers import TrainingArguments

from hierarchical.data.arguments import SPLITS

OPTIONS_FILE = "run_options.json"
SECRET_OPTIONS = ("token", "hub_token")


def _plain(value: Any) -> Any:
    """JSON-friendly value: enums as their value, other unknown objects as text."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_options(*option_groups: Any) -> dict[str, Any]:
    """Every option of the run in one flat dict (dataclasses in order; tokens masked)."""
    options: dict[str, Any] = {}
    for group in option_groups:
        values = group.to_dict() if isinstance(group, TrainingArguments) else dataclasses.asdict(group)
        options.update({key: _plain(value) for key, value in values.items()})
    for key in SECRET_OPTIONS:
        if options.get(key) is not None:
            options[key] = f"<{key.upper()}>"
    return options


def write_run_options(output_dir: str, *option_groups: Any) -> Path:
    """Write [`run_options`] to `output_dir/run_options.json` and return the path."""
    path = Path(output_dir, OPTIONS_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run_options(*option_groups), indent=2, sort_keys=True) + "\n")
    return path


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Inside this context transformers logs warnings only (loading a model logs its whole config at info level:
    the run summary says what matters)."""
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity(max(verbosity, transformers.utils.logging.WARNING))
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


def run_summary(
    model: nn.Module,
    model_source: str | None,
    dataset_name: str,
    split_sizes: dict[str, int],
    training_args: TrainingArguments,
    checkpoint: str | None,
    columns: str | None = None,
    calibrate: bool = False,
) -> str:
    """A few lines a person reads before the run starts: model, data (and `columns`, the columns read), image size,
    batch, learning rates, epochs, devices, the tasks (with the evaluation and calibration that `--do_train` brings by
    default), output folder and resume point. `calibrate`: whether the validation split also calibrates the model
    (`--calibrate`)."""
    sizes = ", ".join(f"{split} {split_sizes[split]:,}" for split in SPLITS if split in split_sizes)
    lines = [
        _model_line(model, model_source),
        f"data:           {dataset_name}: {sizes} images",
        *([f"columns:        {columns}"] if columns else []),
        f"image size:     {model.config.image_size} px",
    ]
    if training_args.do_train:
        lines += _training_lines(training_args, split_sizes.get("train", 0))
    else:
        lines.append(f"batch:          {training_args.per_device_eval_batch_size} per device (evaluation)")
    lines += [
        f"devices:        {training_args.device.type} x {max(1, training_args.world_size)} process(es)",
        f"tasks:          {', '.join(_tasks(training_args, calibrate))}",
        f"output folder:  {os.path.abspath(training_args.output_dir)}",
    ]
    if training_args.do_train:
        lines.append(f"resume from:    {checkpoint if checkpoint else 'nothing (training starts at step 0)'}")
    lines.append(f"all options:    {os.path.join(os.path.abspath(training_args.output_dir), OPTIONS_FILE)}")
    return "Run summary\n  " + "\n  ".join(lines)


def _tasks(training_args: TrainingArguments, calibrate: bool) -> list[str]:
    """What the run does, in order; the evaluation and calibration that come with `--do_train` say how to skip them."""
    tasks = ["train"] if training_args.do_train else []
    if training_args.do_eval:
        schedule = _plain(training_args.eval_strategy)
        if training_args.do_train and schedule != "no":
            tasks.append(f"evaluate on the validation split (--eval_strategy {schedule}; --eval_strategy no skips it)")
        else:
            tasks.append("evaluate on the validation split")
        if calibrate:
            tasks.append("calibrate on it (temperatures, selective threshold; --no_calibrate skips it)")
    if training_args.do_predict:
        tasks.append("predict on the test split")
    return tasks


def _model_line(model: nn.Module, model_source: str | None) -> str:
    """Where the model comes from and its parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    origin = (
        f"loaded from {model_source}" if model_source else f"new, backbone weights: {model.config.backbone_weights}"
    )
    return (
        f"model:          HierarchicalEfficientNetV2 ({origin}), {total / 1e6:.1f}M parameters, "
        f"{trainable / 1e6:.1f}M trainable"
    )


def _training_lines(training_args: TrainingArguments, train_size: int) -> list[str]:
    """Batch, learning rates and length of the training."""
    per_step = (
        training_args.per_device_train_batch_size
        * max(1, training_args.world_size)
        * training_args.gradient_accumulation_steps
    )
    if training_args.max_steps > 0:
        length = f"{training_args.max_steps} steps"
    else:
        steps = math.ceil(train_size / per_step) * training_args.num_train_epochs
        length = f"{training_args.num_train_epochs:g} ({math.ceil(steps):,} steps)"
    if training_args.max_train_minutes is not None:
        length += f", stopped after {training_args.max_train_minutes:g} minutes of training"
    scheduler = _plain(training_args.lr_scheduler_type)
    return [
        f"batch:          {training_args.per_device_train_batch_size} per device, {per_step} per step",
        f"learning rates: backbone {training_args.lr_conv:g}, heads {training_args.lr_fc:g} "
        f"({scheduler}, warmup {training_args.warmup_steps:g})",
        f"epochs:         {length}",
    ]


__all__ = ["OPTIONS_FILE", "quiet_transformers", "run_options", "run_summary", "write_run_options"]
