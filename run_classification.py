#!/usr/bin/env python
"""Train and evaluate the hierarchical EfficientNetV2-S on CIFAR-100 with the Hugging Face Trainer.

    python run_classification.py --output_dir outputs/run --do_train --do_eval --do_predict
    accelerate launch run_classification.py --output_dir outputs/run --do_train --do_eval --do_predict
    python run_classification.py recipes/cpu_32px.json

Options are the dataclasses below plus every `TrainingArguments` option; a single `.json` file may hold them all.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import datasets
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    EvalPrediction,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.integrations import is_tensorboard_available
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy, SaveStrategy, SchedulerType

from configuration_hierarchical import NUM_BACKBONE_STAGES, HierarchicalEfficientNetV2Config
from data_utils import (
    DataArguments,
    EpochCallback,
    HierarchicalCollator,
    apply_transforms,
    load_raw_datasets,
    prepare_datasets,
)
from eval_report import write_prediction_report
from hierarchy_data import Hierarchy, balanced_class_weights, discover_hierarchy, reinitialize_heads, set_class_weights
from hierarchy_metrics import compute_hierarchy_metrics
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification, build_image_processor

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
HEAD_PREFIXES = ("coarse_classifier.", "fine_classifier.")
EMA_FILE = "ema.safetensors"


@dataclass
class ModelArguments:
    """Where the model comes from: a saved model / Hub id, or a fresh model built from these options."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A saved model folder or Hub id to start from. Unset: build a fresh model."},
    )
    backbone_weights: str = field(
        default="imagenet",
        metadata={
            "help": "Fresh models only: 'imagenet' (torchvision IMAGENET1K_V1), 'none' (random) or a local "
            "torchvision state dict (.pth/.safetensors)."
        },
    )
    image_size: int | None = field(default=None, metadata={"help": "Input resolution (default 224)."})
    num_frozen_stages: int | None = field(
        default=None, metadata={"help": "Backbone stages frozen from the input, of 8 (default 4)."}
    )
    dropout: float | None = field(default=None, metadata={"help": "Dropout before the heads (default 0.2)."})
    drop_path_rate: float | None = field(default=None, metadata={"help": "Stochastic depth rate (default 0.2)."})
    fine_head_uses_coarse_logits: bool | None = field(
        default=None, metadata={"help": "Feed the coarse logits to the fine head (default true)."}
    )
    coarse_loss_weight: float | None = field(default=None, metadata={"help": "Weight of the coarse loss (default 1)."})
    label_smoothing: float | None = field(
        default=None, metadata={"help": "Label smoothing inside both losses (default 0). Use this, not "
        "--label_smoothing_factor, which would drop the coarse loss."}
    )  # fmt: skip
    channels_last: bool | None = field(default=None, metadata={"help": "Channels-last memory format."})
    reinitialize_heads: bool = field(
        default=False,
        metadata={
            "help": "With --model_name_or_path: keep its backbone and start both heads afresh for the classes of the "
            "data (transfer to a new task). Without it, a model whose classes or superclasses differ from the data's "
            "is refused."
        },
    )
    class_weights: str = field(
        default="none",
        metadata={
            "help": "'balanced': weigh both cross-entropies by inverse class frequency in the training split (saved "
            "in the config); 'none': all classes alike.",
            "choices": ("none", "balanced"),
        },
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})

    def __post_init__(self) -> None:
        if self.backbone_weights.lower() == "none":
            self.backbone_weights = None
        if self.class_weights not in ("none", "balanced"):
            raise ValueError(f"--class_weights must be 'none' or 'balanced', got {self.class_weights!r}")
        if self.reinitialize_heads and self.model_name_or_path is None:
            raise ValueError("--reinitialize_heads needs --model_name_or_path (a fresh model has new heads anyway)")

    def config_overrides(self) -> dict:
        """The config options given on the command line (unset ones keep the config's values)."""
        names = (
            "image_size", "num_frozen_stages", "dropout", "drop_path_rate", "fine_head_uses_coarse_logits",
            "coarse_loss_weight", "label_smoothing", "channels_last",
        )  # fmt: skip
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class HierarchicalTrainingArguments(TrainingArguments):
    """`TrainingArguments` with this project's defaults, two learning rates and the original tool's option names.

    Original option -> Trainer option: `--epochs` -> `--num_train_epochs` (10), `--batch_size` ->
    `--per_device_train_batch_size` and `--per_device_eval_batch_size` (128), `--weight_decay` (1e-4, same name),
    `--checkpoint_path` -> `--resume_from_checkpoint`. `--lr_conv` and `--lr_fc` replace `--learning_rate`.
    """

    output_dir: str | None = field(
        default="outputs/hierarchical-efficientnetv2-cifar100",
        metadata={"help": "Where checkpoints, metrics, the final model and its card are written."},
    )
    lr_conv: float = field(default=5e-4, metadata={"help": "Peak learning rate of the convolutional backbone."})
    lr_fc: float = field(default=1e-3, metadata={"help": "Peak learning rate of the linear heads."})
    layer_decay: float = field(
        default=1.0,
        metadata={"help": "Layer-wise LR decay: backbone stage s trains at lr_conv * layer_decay**(7 - s). 1 = off."},
    )
    learning_rate: float | None = field(default=None, metadata={"help": "Not used: see --lr_conv and --lr_fc."})
    epochs: float | None = field(default=None, metadata={"help": "Alias of --num_train_epochs."})
    batch_size: int | None = field(default=None, metadata={"help": "Alias: per-device train and eval batch size."})
    checkpoint_path: str | None = field(default=None, metadata={"help": "Alias of --resume_from_checkpoint."})
    restart_from_scratch: bool = field(
        default=False,
        metadata={"help": "Start over although output_dir holds checkpoints, none of them usable (they are kept)."},
    )
    sync_batchnorm: bool = field(default=False, metadata={"help": "Use SyncBatchNorm in multi-process runs."})
    max_train_minutes: float | None = field(
        default=None,
        metadata={"help": "Stop training (then evaluate and save as usual) after this many minutes of training."},
    )
    keep_freed_memory: bool = field(
        default=True,
        metadata={
            "help": "On Linux with glibc, keep freed memory in the process (mmap threshold 32 MiB, trim threshold "
            "1 GiB) instead of handing it back to the system and faulting it in again at every step."
        },
    )
    schedule_by_time: bool = field(
        default=False,
        metadata={
            "help": "With --max_train_minutes: warm up and cosine-decay the learning rates over that time budget "
            "instead of over the steps, so the schedule ends when the time does, on any machine. Set "
            "--num_train_epochs above what fits in the budget."
        },
    )
    ema_decay: float = field(
        default=0.0, metadata={"help": "Exponential moving average of the weights (e.g. 0.9998); 0 = off."}
    )
    num_train_epochs: float = field(default=10.0, metadata={"help": "Total number of training epochs."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Batch size per device for training."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Batch size per device for evaluation."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Scheduler of both learning rates."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup steps, or a ratio of all steps if < 1."})
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "Clip gradients to this global norm; 0 (the default) does not clip."}
    )
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate on the validation split."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N steps."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Keep the best checkpoint as final model."})
    metric_for_best_model: str | None = field(default="fine_accuracy", metadata={"help": "Metric of the best model."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Checkpoints kept (the best one always)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep image columns for the transforms."})
    label_names: list[str] | None = field(
        default_factory=lambda: ["labels", "coarse_labels"], metadata={"help": "Label inputs of the model."}
    )
    report_to: None | str | list[str] = field(
        default=None, metadata={"help": "Integrations to log to; default: TensorBoard when installed, else none."}
    )

    def __post_init__(self) -> None:
        if self.epochs is not None:
            self.num_train_epochs = self.epochs
        if self.batch_size is not None:
            self.per_device_train_batch_size = self.per_device_eval_batch_size = self.batch_size
        if self.checkpoint_path is not None:
            if self.resume_from_checkpoint not in (None, self.checkpoint_path):
                raise ValueError(
                    f"--checkpoint_path {self.checkpoint_path!r} and --resume_from_checkpoint "
                    f"{self.resume_from_checkpoint!r} disagree; give one of them"
                )
            self.resume_from_checkpoint = self.checkpoint_path
        if self.learning_rate is not None and self.learning_rate != self.lr_fc:
            raise ValueError(
                f"--learning_rate {self.learning_rate} is not used: set --lr_conv (backbone) and --lr_fc (heads)"
            )
        self.learning_rate = self.lr_fc
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_conv", "lr_fc", "weight_decay"):
            if getattr(self, name) < 0 or not math.isfinite(getattr(self, name)):
                raise ValueError(f"--{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.lr_fc == 0:
            raise ValueError("--lr_fc must be > 0, got 0")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"--layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ValueError(f"--num_train_epochs must be > 0, got {self.num_train_epochs}")
        if self.resume_from_checkpoint is not None and not os.path.isdir(self.resume_from_checkpoint):
            raise ValueError(f"--resume_from_checkpoint {self.resume_from_checkpoint!r} is not a folder")
        if self.report_to is None:
            self.report_to = ["tensorboard"] if is_tensorboard_available() else "none"
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"--max_train_minutes must be > 0, got {self.max_train_minutes}")
        if self.schedule_by_time:
            if self.max_train_minutes is None:
                raise ValueError("--schedule_by_time needs --max_train_minutes, the time to schedule over")
            if SchedulerType(self.lr_scheduler_type) != SchedulerType.COSINE:
                raise ValueError(
                    f"--schedule_by_time decays with a cosine, got --lr_scheduler_type {self.lr_scheduler_type}"
                )
            if not 0 <= self.warmup_steps < 1:
                raise ValueError(
                    f"--schedule_by_time needs --warmup_steps as a share of the time in [0, 1), got {self.warmup_steps}"
                )
        if IntervalStrategy.NO in (IntervalStrategy(self.eval_strategy), SaveStrategy(self.save_strategy)):
            self.load_best_model_at_end = False  # no evaluation or no checkpoints: no best checkpoint to reload
        if not self.use_cpu and not torch.accelerator.is_available():
            self.use_cpu = True  # lets `accelerate launch --multi_gpu` start gloo processes on a CPU-only machine
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False  # every trainable parameter takes part in every step
        super().__post_init__()


MALLOC_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest; smaller blocks come from the heap, which is reused
MALLOC_TRIM_THRESHOLD = 2**30  # free heap kept before any is handed back to the system


def keep_freed_memory() -> bool:
    """Make glibc's allocator keep freed memory for reuse: by default it maps large tensors fresh and trims the
    heap, so every training step faults tens of thousands of pages in again (about 8% of a CPU step at 32 px).
    The same as starting Python with `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` set to these values.
    Returns whether it applied (Linux with glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD) and mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD))


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, HierarchicalTrainingArguments]:
    """Parse the command line, or a single `.json` file holding every option."""
    parser = HfArgumentParser((ModelArguments, DataArguments, HierarchicalTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        if not os.path.isfile(argv[0]):
            raise ValueError(f"options file {argv[0]!r} does not exist")
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def setup_logging(training_args: TrainingArguments) -> None:
    """Log to stdout; the main process at the Trainer's log level, the others at warnings only."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:  # "passive" log level: info on the main process, as the transformers examples
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def load_model(
    model_args: ModelArguments, cache_dir: str | None = None, hierarchy: Hierarchy | None = None
) -> HierarchicalEfficientNetV2ForImageClassification:
    """Load a saved model (folder or Hub id, Hub files cached in `cache_dir`) or build a fresh one for the classes of
    `hierarchy` (the data's, from `discover_hierarchy`; CIFAR-100 when None). A saved model of another hierarchy is
    refused, or with `--reinitialize_heads` gets new heads for `hierarchy`."""
    overrides = model_args.config_overrides()
    if model_args.model_name_or_path is None:
        classes = hierarchy.config_kwargs() if hierarchy is not None else {}
        config = HierarchicalEfficientNetV2Config(backbone_weights=model_args.backbone_weights, **classes, **overrides)
        return HierarchicalEfficientNetV2ForImageClassification(config)
    model = load_saved_model(model_args, cache_dir, overrides)
    if model_args.reinitialize_heads:
        if hierarchy is None:
            raise ValueError(
                "--reinitialize_heads needs the classes of the data, but it names no hierarchy (plain integer labels, "
                "or class names without superclasses): pass a --hierarchy_file, a coarse label column or "
                "superclass/class image folders"
            )
        return reinitialize_heads(model, hierarchy)
    if hierarchy is not None and (problem := hierarchy.mismatch(model.config)):
        raise ValueError(
            f"--model_name_or_path {model_args.model_name_or_path!r} was trained for other classes: {problem}. Pass "
            "--reinitialize_heads true to keep its backbone and train new heads for the data's classes"
        )
    return model


def load_saved_model(
    model_args: ModelArguments, cache_dir: str | None, overrides: dict
) -> HierarchicalEfficientNetV2ForImageClassification:
    """Load `--model_name_or_path` (folder or Hub id) with the config options given on the command line."""
    source = model_args.model_name_or_path
    if os.path.isdir(source):
        missing = [name for name in ("config.json",) if not os.path.isfile(os.path.join(source, name))]
        if not any(name.endswith((".safetensors", ".bin")) for name in os.listdir(source)):
            missing.append("model.safetensors")
        if missing:
            raise ValueError(f"--model_name_or_path {source!r} is not a saved model: it has no {', '.join(missing)}")
    elif os.path.sep in source and source.count("/") != 1:
        raise ValueError(f"--model_name_or_path {source!r} is neither a folder nor a Hub id (owner/name)")
    try:
        return HierarchicalEfficientNetV2ForImageClassification.from_pretrained(
            source,
            cache_dir=cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            **overrides,
        )
    except OSError as error:
        raise ValueError(
            f"could not load the model {source!r}: {str(error).splitlines()[0]} "
            "(offline? pass a local folder written by this script)"
        ) from error


def parameter_groups(
    model: nn.Module, lr_conv: float, lr_fc: float, weight_decay: float, layer_decay: float = 1.0
) -> list[dict]:
    """AdamW groups: backbone at `lr_conv` (scaled per stage by `layer_decay`), heads at `lr_fc`; weight decay on
    conv and linear weights only (not on biases or BatchNorm); frozen parameters in no group."""
    groups: dict[tuple[str, float, float], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith(HEAD_PREFIXES):
            kind, lr = "head", lr_fc
        else:
            stage = int(name.split(".")[1])  # features.<stage>.…
            kind, lr = f"stage{stage}", lr_conv * layer_decay ** (NUM_BACKBONE_STAGES - 1 - stage)
            if layer_decay == 1.0:
                kind = "backbone"
        decay = weight_decay if parameter.ndim > 1 else 0.0
        groups.setdefault((kind, lr, decay), []).append(parameter)
    return [
        {"params": params, "lr": lr, "weight_decay": decay, "name": kind}
        for (kind, lr, decay), params in groups.items()
    ]


class EMACallback(TrainerCallback):
    """Exponential moving average of the model's floating-point state (weights and BatchNorm statistics).

    Updated after every optimizer step, saved as `ema.safetensors` in each checkpoint and restored on resume.
    [`HierarchicalTrainer`] evaluates with the averaged weights, and they become the final model.

    Args:
        decay (`float`): weight of the past in each update, e.g. 0.9998.
        resume_from (`str`, *optional*): checkpoint whose `ema.safetensors` to start from.
    """

    def __init__(self, decay: float, resume_from: str | None = None):
        self.decay = decay
        self.resume_from = resume_from
        self.shadow: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = kwargs["model"]
        if self.resume_from is not None:
            self.shadow = load_file(os.path.join(self.resume_from, EMA_FILE), device=str(args.device))
        else:
            self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        current = kwargs["model"].state_dict()
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in names], [current[k].float() for k in names], 1.0 - self.decay)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            save_file({k: v.contiguous().cpu() for k, v in self.shadow.items()}, os.path.join(folder, EMA_FILE))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Make the averaged weights the final model (those of the best checkpoint when it was reloaded)."""
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best and os.path.isfile(os.path.join(best, EMA_FILE)):
            self.shadow = load_file(os.path.join(best, EMA_FILE), device=str(args.device))
        kwargs["model"].load_state_dict(self.shadow, strict=False)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Inside this context `model` holds the averaged weights; its own weights come back afterwards."""
        if self.shadow is None:
            yield
            return
        backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(backup, strict=False)


class TimeBudgetCallback(TrainerCallback, ExportableState):
    """Stop training once `minutes` of wall-clock training time have passed (checked after each optimizer step);
    the run then saves, evaluates and writes its outputs as at a normal end.

    The time spent up to each checkpoint is saved in it (`trainer_state.json`), so a resumed run continues the same
    budget. `progress()` (0 to 1) drives the learning-rate schedule of `--schedule_by_time`.
    """

    def __init__(self, minutes: float, elapsed_seconds: float = 0.0):
        self.seconds = minutes * 60
        self.elapsed_before = elapsed_seconds  # training time of earlier runs, up to the resumed checkpoint
        self.start = None

    def elapsed(self) -> float:
        """Seconds of training so far, earlier runs included."""
        return self.elapsed_before + (time.monotonic() - self.start if self.start is not None else 0.0)

    def progress(self) -> float:
        """Share of the budget used, in [0, 1]."""
        return min(self.elapsed() / self.seconds, 1.0)

    def state(self) -> dict:
        """What a checkpoint keeps: the budget and the training time spent until then."""
        return {"args": {"minutes": self.seconds / 60, "elapsed_seconds": self.elapsed()}, "attributes": {}}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step > 0 else None
        if isinstance(saved, dict):  # resumed: the loaded state holds the time spent before the checkpoint
            self.elapsed_before = float(saved.get("args", {}).get("elapsed_seconds", 0.0))
            logger.info("Time budget: %.1f of %.1f minutes already spent", self.elapsed_before / 60, self.seconds / 60)
        self.start = time.monotonic()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.elapsed() > self.seconds:
            logger.warning(
                "Time budget of %.1f minutes reached at step %d: stopping", self.seconds / 60, state.global_step
            )
            control.should_training_stop = control.should_save = True
        return control


def time_schedule_factor(progress: float, warmup: float) -> float:
    """Learning-rate multiplier at `progress` (0 to 1) of a time budget: linear warmup over the first `warmup`
    share, then a cosine decay that reaches 0 at the end of the budget."""
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / (1.0 - warmup))))


class HierarchicalTrainer(Trainer):
    """`Trainer` with separate learning rates for the backbone and the heads, evaluation of the weight average
    when `--ema_decay` is set, and this project's model card."""

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the optimizer chosen by `--optim` over [`parameter_groups`]; the scheduler scales every group."""
        if self.optimizer is None:
            args = self.args
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(args, self.model)
            groups = parameter_groups(self.model, args.lr_conv, args.lr_fc, args.weight_decay, args.layer_decay)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """The `--lr_scheduler_type` schedule over the steps, or with `--schedule_by_time` over the time budget."""
        if not self.args.schedule_by_time or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        budget = next((c for c in self.callback_handler.callbacks if isinstance(c, TimeBudgetCallback)), None)
        if budget is None:  # a Trainer built without main(): the budget callback is part of the schedule
            budget = TimeBudgetCallback(self.args.max_train_minutes)
            self.add_callback(budget)
        warmup = self.args.warmup_steps

        def factor(step: int) -> float:  # a function, so the scheduler's saved state holds no reference to it
            return time_schedule_factor(budget.progress(), warmup)

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def _get_grad_norm(self, model: nn.Module, grad_norm: torch.Tensor | float | None = None):
        """The gradient norm for the logs. Without clipping the Trainer would compute it after every step, a pass
        over every gradient as costly as clipping; it is computed only for the steps that log."""
        step = self.state.global_step + 1  # the step being finished
        logs = self.args.logging_strategy != IntervalStrategy.STEPS or step % self.state.logging_steps == 0
        if grad_norm is None and not (logs or (step == 1 and self.args.logging_first_step)):
            return None
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def floating_point_ops(self, inputs: dict[str, torch.Tensor]) -> int:
        """The Trainer's estimate (6 x input elements x parameters), with the parameters counted once, not per step."""
        if not hasattr(self, "_num_parameters"):
            self._num_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs["pixel_values"].numel() * self._num_parameters

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        """Evaluate; with `--ema_decay`, the averaged weights are evaluated (and so pick the best checkpoint)."""
        ema = next((c for c in self.callback_handler.callbacks if isinstance(c, EMACallback)), None)
        with ema.applied(self.model) if ema is not None else contextlib.nullcontext():
            return super().evaluate(*args, **kwargs)

    def create_model_card(self, *args, **kwargs) -> None:
        """Write this project's model card (used by `push_to_hub` too)."""
        if self.is_world_process_zero():
            write_model_card(self.args.output_dir, self.model, self.args, getattr(self, "dataset_name", None))


def compute_metrics(eval_prediction: EvalPrediction, fine_to_coarse: list[int]) -> dict[str, float]:
    """Hierarchy metrics from the Trainer's predictions `(logits, coarse_logits)` and labels."""
    logits, coarse_logits = eval_prediction.predictions
    labels, coarse_labels = eval_prediction.label_ids
    return compute_hierarchy_metrics(logits, coarse_logits, labels, coarse_labels, fine_to_coarse)


def checkpoint_problem(path: str, needs_ema: bool = False) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a missing or truncated file), or None if it is complete.
    With `needs_ema`, the weight average `ema.safetensors` must be there too."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as file:
            json.load(file)
    except (OSError, ValueError) as error:
        return f"trainer_state.json is missing or truncated ({type(error).__name__})"
    for name in ["model.safetensors"] + ([EMA_FILE] if needs_ema else []):
        try:  # safetensors checks that the header covers the whole file
            with safe_open(os.path.join(path, name), framework="pt"):
                pass
        except Exception as error:
            return f"{name} is missing or truncated ({str(error).splitlines()[0][:100]})"
    rng_files = [name for name in os.listdir(path) if name.startswith("rng_state")]
    for name in ["optimizer.pt", "scheduler.pt", *rng_files]:
        try:  # torch.save writes a zip archive; a truncated one has no central directory. Nothing is unpickled.
            with zipfile.ZipFile(os.path.join(path, name)) as archive:
                archive.infolist()
        except (OSError, zipfile.BadZipFile) as error:
            return f"{name} is missing or truncated ({type(error).__name__})"
    return None


def find_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_checkpoint(training_args: HierarchicalTrainingArguments) -> str | None:
    """The checkpoint to resume from: the one asked for (it must be complete) or, by default, the newest complete
    checkpoint in `output_dir`. Incomplete ones are named in a warning and moved aside to `incomplete-<name>`
    (never deleted). With checkpoints present but none usable, stop unless `--restart_from_scratch`."""
    needs_ema = training_args.ema_decay > 0
    if training_args.resume_from_checkpoint is not None:
        problem = checkpoint_problem(training_args.resume_from_checkpoint, needs_ema)
        if problem:
            raise ValueError(f"cannot resume from {training_args.resume_from_checkpoint!r}: {problem}")
        logger.info("Resuming from %s", training_args.resume_from_checkpoint)
        return training_args.resume_from_checkpoint
    checkpoints = find_checkpoints(training_args.output_dir)
    for path in reversed(checkpoints):
        problem = checkpoint_problem(path, needs_ema)
        if problem is None:
            logger.info("output_dir holds checkpoints: continuing from the last complete one, %s", path)
            return path
        aside = os.path.join(os.path.dirname(path), f"incomplete-{os.path.basename(path)}-{int(time.time())}")
        logger.warning("Checkpoint %s is incomplete (%s): skipped and moved to %s", path, problem, aside)
        if training_args.should_save:
            shutil.move(path, aside)
    if checkpoints and not training_args.restart_from_scratch:
        raise ValueError(
            f"{training_args.output_dir!r} holds checkpoints but none is complete (moved aside, not deleted); "
            "pass --restart_from_scratch to train from the start, or another --output_dir"
        )
    return None


def write_model_card(
    output_dir: str, model: nn.Module, training_args: TrainingArguments, dataset_name: str | None
) -> None:
    """Write `README.md` in `output_dir`: what the model is, how to load it, its metrics and its training setup."""
    results_path = os.path.join(output_dir, "all_results.json")
    results = json.loads(Path(results_path).read_text()) if os.path.isfile(results_path) else {}
    config = model.config
    rows = []
    for name in (
        "fine_accuracy", "fine_top5_accuracy", "coarse_accuracy", "coarse_from_fine_accuracy",
        "consistency", "both_correct", "mistake_severity",
    ):  # fmt: skip
        values = [
            f"{results[f'{split}_{name}']:.4f}" if f"{split}_{name}" in results else "-" for split in ("eval", "test")
        ]
        rows.append(f"| {name} | {values[0]} | {values[1]} |")
    setup = {
        "image_size": config.image_size,
        "epochs": training_args.num_train_epochs,
        "batch size (per device)": training_args.per_device_train_batch_size,
        "lr_conv / lr_fc": f"{training_args.lr_conv} / {training_args.lr_fc}",
        "weight decay": training_args.weight_decay,
        "scheduler": f"{training_args.lr_scheduler_type}, warmup {training_args.warmup_steps}",
        "frozen backbone stages": config.num_frozen_stages,
        "label smoothing": config.label_smoothing,
        "coarse loss weight": config.coarse_loss_weight,
        "backbone initialisation": config.backbone_weights,
        "seed": training_args.seed,
    }
    figure = "superclass_accuracy.png"
    figure_line = (
        f"\n![Accuracy per superclass]({figure})\n" if os.path.isfile(os.path.join(output_dir, figure)) else ""
    )
    repo = training_args.hub_model_id or os.path.basename(os.path.abspath(output_dir))
    sizes = [len(config.coarse_children(c)) for c in range(config.num_coarse_labels)]
    superclasses = ", ".join(f"{name} ({size})" for name, size in zip(config.coarse_label_names, sizes, strict=True))
    if len(superclasses) > 2000:
        superclasses = superclasses[:2000].rsplit(", ", 1)[0] + ", ..."
    card = f"""---
library_name: transformers
pipeline_tag: image-classification
datasets:
- {dataset_name or "uoft-cs/cifar100"}
tags:
- image-classification
- hierarchical-classification
- efficientnet_v2
- custom_code
---

# Hierarchical EfficientNetV2-S for {os.path.basename(os.path.normpath(dataset_name or "uoft-cs/cifar100"))}

EfficientNetV2-S (torchvision) with a coarse head for {config.num_coarse_labels} superclasses and a fine head for
{config.num_labels} classes that sees the pooled features together with the coarse logits. Trained on
`{dataset_name or "uoft-cs/cifar100"}` with `run_classification.py`.

Superclasses (classes): {superclasses}

## Results

| metric | validation | test |
| --- | --- | --- |
{chr(10).join(rows)}

`coarse_from_fine_accuracy`: the fine prediction mapped to its superclass; `consistency`: share of images whose
fine prediction lies in the predicted superclass; `mistake_severity`: mean tree distance of wrong fine predictions
(1 = right superclass, 2 = wrong superclass).
{figure_line}
## Usage

```python
from transformers import AutoModelForImageClassification, pipeline

classifier = pipeline("image-classification", model="{repo}", trust_remote_code=True)
classifier("image.png", top_k=5)

model = AutoModelForImageClassification.from_pretrained("{repo}", trust_remote_code=True)
prediction = model.predict_hierarchical(pixel_values)  # superclass and class, consistent with the hierarchy
```

## Training setup

| option | value |
| --- | --- |
{chr(10).join(f"| {k} | {v} |" for k, v in setup.items())}
"""
    Path(output_dir, "README.md").write_text(card)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse options, load data and model, train, evaluate, predict, save; return all metrics."""
    model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args)
    if training_args.keep_freed_memory and keep_freed_memory():
        logger.info("glibc allocator keeps freed memory for reuse (--keep_freed_memory)")
    logger.info("Training options %s", training_args.to_json_string() if training_args.should_log else "")
    set_seed(training_args.seed)
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        raise ValueError("nothing to do: pass --do_train, --do_eval and/or --do_predict")
    if not training_args.do_train and model_args.model_name_or_path is None:
        raise ValueError("evaluating without --do_train needs --model_name_or_path (a trained model)")

    checkpoint = None
    if training_args.do_train:
        with training_args.main_process_first(desc="checkpoint scan"):
            checkpoint = resolve_checkpoint(training_args)

    with training_args.main_process_first(desc="dataset loading"):
        raw = load_raw_datasets(data_args)
    hierarchy = discover_hierarchy(raw, data_args)  # the classes of the data decide the heads
    if hierarchy is not None:
        logger.info("Classes of the data: %s", hierarchy.describe())
    model = load_model(model_args, data_args.cache_dir, hierarchy)
    config = model.config
    with training_args.main_process_first(desc="dataset preparation"):
        splits = prepare_datasets(data_args, config, seed=training_args.seed, raw=raw)
    if model_args.class_weights == "balanced" and "train" in splits:
        train_columns = splits["train"].select_columns(["labels", "coarse_labels"]).with_format("numpy")[:]
        set_class_weights(
            model,
            balanced_class_weights(train_columns["labels"], config.num_labels),
            balanced_class_weights(train_columns["coarse_labels"], config.num_coarse_labels),
        )
    if training_args.sync_batchnorm and training_args.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    splits = apply_transforms(splits, config, data_args, seed=training_args.seed)
    if training_args.do_eval and "validation" not in splits:
        raise ValueError("--do_eval needs a validation split: set --train_val_split > 0 or provide one")
    if training_args.do_predict and "test" not in splits:
        raise ValueError(f"--do_predict needs a test split ({data_args.test_split_name!r} not found)")

    callbacks = [EpochCallback(splits["train"])] if "train" in splits else []
    if training_args.do_train and training_args.ema_decay > 0:
        callbacks.append(EMACallback(training_args.ema_decay, resume_from=checkpoint))
    if training_args.max_train_minutes is not None:
        callbacks.append(TimeBudgetCallback(training_args.max_train_minutes))
    trainer = HierarchicalTrainer(
        model=model,
        args=training_args,
        train_dataset=splits.get("train") if training_args.do_train else None,
        eval_dataset=splits.get("validation"),
        data_collator=HierarchicalCollator(
            config,
            mixup_alpha=data_args.mixup_alpha,
            cutmix_alpha=data_args.cutmix_alpha,
            mix_prob=data_args.mix_prob,
            cutmix_switch_prob=data_args.cutmix_switch_prob,
            seed=training_args.seed,
        ),
        processing_class=build_image_processor(config),
        compute_metrics=partial(compute_metrics, fine_to_coarse=config.fine_to_coarse),
        callbacks=callbacks,
    )
    trainer.dataset_name = data_args.dataset_name

    metrics: dict[str, float] = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        train_metrics = {**result.metrics, "train_samples": len(splits["train"])}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
    else:
        trainer.save_model()  # evaluation-only runs also leave a loadable model beside their metrics
    if training_args.do_eval:
        # predict, not evaluate: the same eval_* metrics plus the logits the report needs
        prediction = trainer.predict(splits["validation"], metric_key_prefix="eval")
        eval_metrics = prediction.metrics
        trainer.log(eval_metrics)  # as trainer.evaluate does: log history, integrations, "epoch"
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
        if trainer.is_world_process_zero():
            write_prediction_report(training_args.output_dir, prediction, config, splits["validation"], "validation")
    if training_args.do_predict:
        prediction = trainer.predict(splits["test"], metric_key_prefix="test")
        test_metrics = prediction.metrics
        trainer.log_metrics("test", test_metrics)
        trainer.save_metrics("test", test_metrics)
        metrics.update(test_metrics)
        if trainer.is_world_process_zero():
            write_prediction_report(training_args.output_dir, prediction, config, splits["test"], "test")
    trainer.create_model_card()
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="Hierarchical EfficientNetV2-S trained with run_classification.py")
    return metrics


if __name__ == "__main__":
    main()
