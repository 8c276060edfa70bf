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
import dataclasses
import difflib
import fcntl
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import time
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
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy, SaveStrategy, SchedulerType, TrainOutput
from transformers.utils.import_utils import is_in_notebook

import model_card
from calibration import CalibrationArguments, calibrate_and_select, evaluate_calibration, subset_prediction
from configuration_hierarchical import NUM_BACKBONE_STAGES, HierarchicalEfficientNetV2Config
from data_utils import (
    DataArguments,
    EpochCallback,
    HierarchicalCollator,
    apply_transforms,
    load_raw_datasets,
    prepare_datasets,
)
from device_preprocess import DevicePreprocessor
from eval_report import write_prediction_report
from hierarchy_data import Hierarchy, balanced_class_weights, discover_hierarchy, reinitialize_heads, set_class_weights
from hierarchy_metrics import compute_hierarchy_metrics
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification, build_image_processor
from remote_resources import check_remote_resources
from run_summary import quiet_transformers, run_summary, write_run_options

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
HEAD_PREFIXES = ("coarse_classifier.", "fine_classifier.")
EMA_FILE = "ema.safetensors"
LOCK_FILE = ".run.lock"
RNG_FILE_RE = re.compile(r"^rng_state(_\d+)?\.pth$")
RNG_KEYS = ("python", "numpy", "cpu")
EVAL_MEMORY_FACTOR = 10  # peak memory of an evaluation batch, measured at 32 and 64 px: 11 to 22 times its input


def check_finite_options(arguments: object) -> None:
    """Raise `ValueError` naming the first floating-point option of a dataclass that is NaN or infinite: such
    values pass every `< 0` check and would train a model full of NaN."""
    for option in dataclasses.fields(arguments):
        value = getattr(arguments, option.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{option.name} must be a finite number, got {value}")


@dataclass
class ModelArguments(CalibrationArguments):
    """Where the model comes from: a saved model / Hub id, or a fresh model built from these options; and how it is
    calibrated after evaluation ([`CalibrationArguments`]: temperatures and selective threshold, saved with it)."""

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
    allow_missing_weights: bool = field(
        default=False,
        metadata={
            "help": "Load a --model_name_or_path whose weights file lacks some of the model's tensors or holds "
            "others (they keep their fresh initialisation). Off: such a folder is an error naming the tensors."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backbone_weights.lower() == "none":
            self.backbone_weights = None
        check_finite_options(self)
        HierarchicalEfficientNetV2Config(backbone_weights=None, **self.config_overrides())  # checks every range
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
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "Replace NaN/inf step losses by the average in the logs. Off (the default): a non-finite loss "
            "shows in the log and stops training with an error."
        },
    )

    def __post_init__(self) -> None:
        check_finite_options(self)
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
        for name in ("max_grad_norm", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
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
        if not self.do_train and (self.do_eval or self.do_predict):  # evaluation only: no training-time schedules
            self.eval_strategy, self.save_strategy = IntervalStrategy.NO.value, SaveStrategy.NO.value
        if IntervalStrategy.NO in (IntervalStrategy(self.eval_strategy), SaveStrategy(self.save_strategy)):
            self.load_best_model_at_end = False  # no evaluation or no checkpoints: no best checkpoint to reload
        if self.load_best_model_at_end:
            self._align_save_and_eval_schedules()
        if not self.use_cpu and not torch.accelerator.is_available():
            self.use_cpu = True  # lets `accelerate launch --multi_gpu` start gloo processes on a CPU-only machine
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False  # every trainable parameter takes part in every step
        if self.disable_tqdm is None and not (sys.stderr.isatty() or is_in_notebook()):
            self.disable_tqdm = True  # a redirected log gets the log lines, not progress bars drawn with "\r"
        do_eval = self.do_eval
        super().__post_init__()
        if not self.do_train:  # the evaluation schedule belongs to training: evaluate only when asked to
            self.do_eval = do_eval

    def _align_save_and_eval_schedules(self) -> None:
        """Make the checkpoint and evaluation schedules agree, as reloading the best checkpoint at the end needs:
        when one of them is changed to `steps`, the other one (left at `epoch`) follows it. When their steps do not
        line up, the best checkpoint is not reloaded (with a warning) instead of stopping the run."""
        eval_strategy, save_strategy = IntervalStrategy(self.eval_strategy), SaveStrategy(self.save_strategy)
        if save_strategy == SaveStrategy.BEST:
            return
        if save_strategy == SaveStrategy.STEPS and eval_strategy == IntervalStrategy.EPOCH:
            self.eval_strategy, self.eval_steps = IntervalStrategy.STEPS.value, self.eval_steps or self.save_steps
            logger.warning(
                "--save_strategy steps: evaluating on the same schedule (--eval_strategy steps --eval_steps %s), so "
                "that the best checkpoint can be reloaded at the end",
                self.eval_steps,
            )
        elif eval_strategy == IntervalStrategy.STEPS and save_strategy == SaveStrategy.EPOCH:
            self.save_strategy, self.save_steps = SaveStrategy.STEPS.value, self.eval_steps or self.logging_steps
            logger.warning(
                "--eval_strategy steps: saving checkpoints on the same schedule (--save_strategy steps --save_steps "
                "%s), so that the best checkpoint can be reloaded at the end",
                self.save_steps,
            )
        if IntervalStrategy(self.eval_strategy) == IntervalStrategy.STEPS:
            eval_steps = self.eval_steps or self.logging_steps
            if (eval_steps < 1) != (self.save_steps < 1) or round(self.save_steps / eval_steps, 6) % 1 != 0:
                self._drop_best_model_reload(
                    f"--save_steps {self.save_steps:g} is not a multiple of --eval_steps {eval_steps:g}"
                )

    def _drop_best_model_reload(self, reason: str) -> None:
        """Turn off `load_best_model_at_end`, saying why."""
        logger.warning(
            "%s: checkpoints are not saved when the model is evaluated, so the best one cannot be reloaded at the "
            "end; the final model is the last one (--load_best_model_at_end false). Give both schedules the same "
            "value to keep the best model.",
            reason,
        )
        self.load_best_model_at_end = False


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
    parser = HfArgumentParser((ModelArguments, DataArguments, HierarchicalTrainingArguments), allow_abbrev=False)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        if not os.path.isfile(argv[0]):
            raise ValueError(f"options file {argv[0]!r} does not exist")
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        known = [option for action in parser._actions for option in action.option_strings if "-" not in option[2:]]
        hints = [
            f"{arg} (did you mean {' or '.join(close)}?)"
            if (close := difflib.get_close_matches(arg, known, n=1))
            else arg
            for arg in unknown
            if arg.startswith("-")
        ]
        raise ValueError(f"unknown options: {', '.join(hints or unknown)}; `--help` lists every option")
    return tuple(parsed)


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
    # datasets logs its cache internals at info level: shown from --log_level debug on, once (its own handler)
    datasets.utils.logging.set_verbosity(log_level if log_level < logging.INFO else max(log_level, logging.WARNING))
    datasets.utils.logging.disable_propagation()
    if training_args.disable_tqdm:  # no progress bars in a redirected log: their carriage returns garble it
        datasets.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
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
    if os.path.isdir(source):
        for name in sorted(os.listdir(source)):
            problem = safetensors_problem(os.path.join(source, name)) if name.endswith(".safetensors") else None
            if problem:
                raise ValueError(
                    f"--model_name_or_path {source!r}: {problem}; copy the model folder again or pass another one"
                )
    try:
        model, info = HierarchicalEfficientNetV2ForImageClassification.from_pretrained(
            source,
            cache_dir=cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, with the other differences
            **overrides,
        )
    except OSError as error:
        raise ValueError(
            f"could not load the model {source!r}: {str(error).splitlines()[0]} "
            "(offline? pass a local folder written by this script)"
        ) from error
    problems = [
        f"{len(info[kind])} {what} ({', '.join(sorted(map(str, info[kind]))[:5])}{', ...' if len(info[kind]) > 5 else ''})"
        for kind, what in (
            ("missing_keys", "tensors missing from the weights file"),
            ("unexpected_keys", "unexpected tensors in the weights file"),
            ("mismatched_keys", "tensors of another shape"),
        )
        if info.get(kind)
    ]
    if problems and not model_args.allow_missing_weights:
        raise ValueError(
            f"--model_name_or_path {source!r} does not match the model: {'; '.join(problems)}. Pass a complete "
            "model folder, or --allow_missing_weights to keep fresh weights for the missing tensors"
        )
    if problems:
        logger.warning("Loaded %s with --allow_missing_weights: %s", source, "; ".join(problems))
    return model


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


def _load_to(path: str, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file on `device` (safetensors itself refuses indexed CPU devices, `cpu:0`)."""
    return {name: value.to(device) for name, value in load_file(path).items()}


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
            self.shadow = _load_to(os.path.join(self.resume_from, EMA_FILE), args.device)
        else:
            self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        current = kwargs["model"].state_dict()
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in names], [current[k].float() for k in names], 1.0 - self.decay)

    def save(self, folder: str, step: int) -> None:
        """Write the average into checkpoint `folder` (once per step)."""
        save_file({k: v.contiguous().cpu() for k, v in self.shadow.items()}, os.path.join(folder, EMA_FILE))
        self.saved_step = step

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if args.should_save and getattr(self, "saved_step", None) != state.global_step:
            self.save(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"), state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Make the averaged weights the final model (those of the best checkpoint when it was reloaded)."""
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best and os.path.isfile(os.path.join(best, EMA_FILE)):
            self.shadow = _load_to(os.path.join(best, EMA_FILE), args.device)
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


class NonFiniteTrainingError(RuntimeError):
    """Training produced a NaN or infinite loss or weights: it stopped, and nothing was saved as its result."""


class ResumeCheckCallback(TrainerCallback):
    """Checks a resumed state against this run once the Trainer has loaded it: a `global_step` beyond the run's
    steps is refused (the run would end at once without training); one at the run's end marks a finished run; the
    best checkpoint is looked up in this `output_dir`, never in a folder named elsewhere."""

    def __init__(self):
        self.finished_at: int | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.finished_at = None
        if state.global_step == 0:
            return
        if state.global_step > state.max_steps:
            raise ValueError(
                f"the resumed checkpoint is at step {state.global_step}, beyond this run's {state.max_steps} steps: "
                "pass the options of the run that wrote it, --restart_from_scratch with another --output_dir, or "
                "--resume_from_checkpoint naming an earlier checkpoint"
            )
        if state.best_model_checkpoint is not None:
            local = os.path.join(args.output_dir, os.path.basename(os.path.normpath(state.best_model_checkpoint)))
            if os.path.abspath(local) != os.path.abspath(state.best_model_checkpoint):
                logger.warning("Best checkpoint %s taken from this output_dir: %s", state.best_model_checkpoint, local)
                state.best_model_checkpoint = local if os.path.isdir(local) else None
        if state.global_step == state.max_steps:
            self.finished_at = state.global_step


class HierarchicalTrainer(Trainer):
    """`Trainer` with separate learning rates for the backbone and the heads, evaluation of the weight average
    when `--ema_decay` is set, preprocessing on the device, and this project's model card. Training stops with
    [`NonFiniteTrainingError`] when the logged loss or the weights become NaN or infinite; a rerun of a finished
    training keeps its results.

    Batches come from `HierarchicalCollator` as 8-bit images at their source size with the drawn augmentation
    parameters; they are copied to the device without blocking the host, and `device_preprocessor` turns them into
    model inputs there (resize, normalisation, augmentation, mixing), for training and evaluation alike. A training
    step never waits for the device: only the steps that log read the loss and gradient norm back.

    Args:
        device_preprocessor (`DevicePreprocessor`, *optional*):
            Defaults to one built from the model's config. Every other argument is the `Trainer`'s.
    """

    def __init__(self, *args, device_preprocessor: DevicePreprocessor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        preprocessor = device_preprocessor or DevicePreprocessor(self.model.config)
        self.device_preprocessor = preprocessor.to(self.args.device)
        self._filter_loss_on_device = False
        self.resume_check = ResumeCheckCallback()
        self.add_callback(self.resume_check)

    def create_accelerator_and_postprocess(self) -> None:
        """As the Trainer's, with batches copied to the device without blocking the host (from pinned memory with
        `--dataloader_pin_memory`, the default): a blocking copy waits for every queued kernel first."""
        super().create_accelerator_and_postprocess()
        self.accelerator.dataloader_config.non_blocking = True

    def _prepare_inputs(self, inputs: dict) -> dict[str, torch.Tensor]:
        """The batch on the device (where the data loader already put it), preprocessed there."""
        return self.device_preprocessor(super()._prepare_inputs(inputs))

    def _train_filtering_on_device(self, *args, **kwargs) -> TrainOutput:
        """The Trainer's `train`. With `--logging_nan_inf_filter` (the default), non-finite losses are kept out of the
        logged loss on the device, in `training_step`, instead of by the Trainer's own filter, which reads every loss
        on the host and so makes it wait for the device at each step. The option reads as given everywhere else.
        (Versions of the Trainer that keep the running loss in a local variable keep their own filter.)"""
        if "_tr_loss" not in Trainer._inner_training_loop.__code__.co_names:
            return super().train(*args, **kwargs)
        self._filter_loss_on_device, self.args.logging_nan_inf_filter = self.args.logging_nan_inf_filter, False
        try:
            return super().train(*args, **kwargs)
        finally:
            self.args.logging_nan_inf_filter, self._filter_loss_on_device = self._filter_loss_on_device, False

    def training_step(
        self, model: nn.Module, inputs: dict, num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """One forward and backward pass; a non-finite loss counts as the mean of the losses since the last log,
        as with the Trainer's `logging_nan_inf_filter`, without reading it on the host."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._filter_loss_on_device:
            mean_so_far = self._tr_loss / (1 + self.state.global_step - self._globalstep_last_logged)
            loss = torch.where(torch.isfinite(loss), loss, mean_so_far)
        return loss

    @contextlib.contextmanager
    def _options_as_given(self) -> Iterator[None]:
        """Inside this context `self.args.logging_nan_inf_filter` is the user's (see `train`)."""
        if not self._filter_loss_on_device:
            yield
            return
        self.args.logging_nan_inf_filter = True
        try:
            yield
        finally:
            self.args.logging_nan_inf_filter = False

    def _save(self, *args, **kwargs) -> None:
        """Save the model, with the options as given (they are saved too)."""
        with self._options_as_given():
            super()._save(*args, **kwargs)

    def _push_from_checkpoint(self, *args, **kwargs) -> None:
        """Push a checkpoint, with the options as given (they are pushed too)."""
        with self._options_as_given():
            super()._push_from_checkpoint(*args, **kwargs)

    def _diverged(self, what: str) -> NonFiniteTrainingError:
        checkpoints = find_checkpoints(self.args.output_dir)
        kept = f"the last checkpoint, {checkpoints[-1]}, is kept" if checkpoints else "no checkpoint was written"
        return NonFiniteTrainingError(
            f"{what} at step {self.state.global_step}: training diverged and stopped. Nothing was saved as the "
            f"final model; {kept}. Lower --lr_conv/--lr_fc or set --max_grad_norm, then train again"
        )

    def check_finite_weights(self) -> None:
        """Raise [`NonFiniteTrainingError`] naming the first NaN or infinite weight or buffer (one pass, one sync;
        in multi-process runs every process learns whether any found one)."""
        values = {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}
        finite = torch.stack([torch.isfinite(v).all() for v in values.values()]).all().to(torch.int32)
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not finite.item():
            bad = next((k for k, v in values.items() if not torch.isfinite(v).all()), "another process's weights")
            raise self._diverged(f"the model holds NaN or infinite values ({bad})")

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Log as the Trainer does; a NaN or infinite training loss stops training (see `--logging_nan_inf_filter`)."""
        for key in ("loss", "train_loss"):
            if key in logs and not math.isfinite(logs[key]):
                raise self._diverged(f"the training loss is {logs[key]}")
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial=None) -> None:
        """Save a checkpoint, never one with NaN or infinite weights (the last good one stays the newest). The
        weight average is written first, so that `trainer_state.json`, written last, marks a complete checkpoint."""
        self.check_finite_weights()
        ema = next((c for c in self.callback_handler.callbacks if isinstance(c, EMACallback)), None)
        if ema is not None and ema.shadow is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            ema.save(folder, self.state.global_step)
        super()._save_checkpoint(model, trial)

    def train(self, *args, **kwargs) -> TrainOutput:
        """Train; the final weights are checked to be finite. Resumed from a checkpoint at the end of the run, there
        is nothing to train: the results of the run that finished are kept, not replaced by empty ones."""
        output = self._train_filtering_on_device(*args, **kwargs)
        if self.resume_check.finished_at is not None:
            step = self.resume_check.finished_at
            logger.warning("Training already finished at step %d: nothing to do; its results are kept", step)
            previous = os.path.join(self.args.output_dir, "train_results.json")
            metrics = json.loads(Path(previous).read_text()) if os.path.isfile(previous) else {}
            metrics = {k: v for k, v in metrics.items() if k != "train_samples"} or {"epoch": output.metrics["epoch"]}
            if self.state.log_history and "train_runtime" in self.state.log_history[-1]:
                self.state.log_history[-1] = {**metrics, "step": step}  # the finished run's summary, not this one's
            output = TrainOutput(output.global_step, metrics.get("train_loss", float("nan")), metrics)
        self.check_finite_weights()
        return output

    def evaluation_loop(self, *args, **kwargs):
        """The Trainer's loop; in multi-process runs every process first takes the main process's buffers (BatchNorm
        statistics drift apart per process during training), so each evaluates the model that is saved."""
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        return super().evaluation_loop(*args, **kwargs)

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
        """The Trainer's estimate (6 x input elements x parameters) at the model's input size (the batch holds the
        images at their source size), with the parameters counted once, not per step."""
        if not hasattr(self, "_num_parameters"):
            self._num_parameters = self.model.num_parameters(exclude_embeddings=True)
        config = self.model.config
        return 6 * len(inputs["labels"]) * config.num_channels * config.image_size**2 * self._num_parameters

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        """Evaluate; with `--ema_decay`, the averaged weights are evaluated (and so pick the best checkpoint)."""
        ema = next((c for c in self.callback_handler.callbacks if isinstance(c, EMACallback)), None)
        with self._options_as_given(), ema.applied(self.model) if ema is not None else contextlib.nullcontext():
            return super().evaluate(*args, **kwargs)

    def create_model_card(self, *args, **kwargs) -> None:
        """Write this project's model card (used by `push_to_hub` too)."""
        if self.is_world_process_zero():
            trained = self.state.epoch if self.state.global_step > 0 else None
            repo_id = (getattr(self, "hub_model_id", None) or self.args.hub_model_id) if self.args.push_to_hub else None
            write_model_card(
                self.args.output_dir, self.model, self.args, getattr(self, "dataset_name", None), trained, repo_id
            )


def compute_metrics(eval_prediction: EvalPrediction, fine_to_coarse: list[int]) -> dict[str, float]:
    """Hierarchy metrics from the Trainer's predictions `(logits, coarse_logits)` and labels."""
    logits, coarse_logits = eval_prediction.predictions
    labels, coarse_labels = eval_prediction.label_ids
    return compute_hierarchy_metrics(logits, coarse_logits, labels, coarse_labels, fine_to_coarse)


def safetensors_problem(path: str, shapes: dict[str, tuple[int, ...]] | None = None) -> str | None:
    """Why `path` is not a complete safetensors file, or (with `shapes`) why its tensors are not those names and
    shapes; None if it is fine. Only the header is read."""
    name = os.path.basename(path)
    try:  # safetensors checks that the header covers the whole file
        with safe_open(path, framework="pt") as file:
            found = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118
    except Exception as error:
        return f"{name} is missing, truncated or not a safetensors file ({str(error).splitlines()[0][:100]})"
    if shapes is None:
        return None
    for what, names in (
        ("lacks the model's tensors", sorted(set(shapes) - set(found))),
        ("holds tensors the model does not have", sorted(set(found) - set(shapes))),
        (
            "holds tensors of another shape than the model's",
            sorted(k for k in found if k in shapes and found[k] != shapes[k]),
        ),
    ):
        if names:
            return f"{name} {what}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''} ({len(names)})"
    return None


def _torch_file_problem(path: str, keys: tuple[str, ...]) -> str | None:
    """Why a `torch.save` file cannot be resumed from: missing, truncated, holding more than tensors and plain
    containers (it is never unpickled beyond those), or a dict without `keys`."""
    name = os.path.basename(path)
    try:
        with safe_globals():  # the numpy types of the RNG state, as the Trainer allows when it resumes
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        return f"{name} is missing, truncated or unsafe to load ({type(error).__name__}: {str(error).splitlines()[0][:80]})"
    absent = [key for key in keys if not isinstance(content, dict) or key not in content]
    return f"{name} lacks {', '.join(absent)}" if absent else None


def _best_metric_problem(state: dict, path: str, metric: str, greater_is_better: bool) -> str | None:
    """Why `state`'s best checkpoint and best metric disagree with its own evaluation log, or None."""
    best, best_step = state.get("best_metric"), state.get("best_global_step")
    if best is None:
        return None
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    logged = [
        (entry["step"], entry[metric])
        for entry in state.get("log_history") or []
        if isinstance(entry, dict) and metric in entry and entry.get("step") is not None
    ]
    if not logged:
        return f"trainer_state.json has best_metric {best} but its log holds no {metric}"
    pick = max if greater_is_better else min
    true_value = pick(value for _, value in logged)
    true_step = next(step for step, value in logged if value == true_value)  # the first one: later ties lose
    if best != true_value or (best_step is not None and best_step != true_step):
        return (
            f"trainer_state.json says the best {metric} is {best} (step {best_step}), but its log says "
            f"{true_value} at step {true_step}"
        )
    folder = state.get("best_model_checkpoint")
    if folder is not None and os.path.basename(os.path.normpath(folder)) != f"{PREFIX_CHECKPOINT_DIR}-{true_step}":
        return (
            f"trainer_state.json names {folder!r} as best checkpoint, but the best evaluation was at step {true_step}"
        )
    sibling = os.path.join(os.path.dirname(os.path.abspath(path)), f"{PREFIX_CHECKPOINT_DIR}-{true_step}")
    if os.path.abspath(sibling) != os.path.abspath(path) and os.path.isfile(os.path.join(sibling, TRAINER_STATE_NAME)):
        try:
            own = json.loads(Path(sibling, TRAINER_STATE_NAME).read_text())
            own_value = next(e[metric] for e in own["log_history"] if e.get("step") == true_step and metric in e)
        except (OSError, ValueError, TypeError, KeyError, StopIteration, AttributeError):
            own_value = None
        if own_value != true_value:
            return f"the best checkpoint {sibling} does not record {metric} {true_value} at step {true_step}"
    return None


def checkpoint_problem(
    path: str,
    needs_ema: bool = False,
    shapes: dict[str, tuple[int, ...]] | None = None,
    metric_for_best_model: str | None = None,
    greater_is_better: bool = True,
) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None if it is complete.

    Checked: `trainer_state.json` is a JSON object whose `global_step` matches the folder name and whose best
    checkpoint and metric agree with its evaluation log (with `metric_for_best_model`); `model.safetensors` (and,
    with `needs_ema`, `ema.safetensors`) complete, with the tensor names and shapes of `shapes` when given; the
    optimizer, scheduler and RNG states load as tensors and plain containers (nothing else is unpickled) and hold
    what resuming reads. Only files the Trainer writes are judged: anything else in the folder is ignored."""
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME)) as file:
            state = json.load(file)
    except (OSError, ValueError) as error:
        return f"trainer_state.json is missing or truncated ({type(error).__name__})"
    if not isinstance(state, dict):
        return f"trainer_state.json holds {type(state).__name__}, not a JSON object"
    float_shapes = None
    if shapes is not None:
        float_shapes = {k: v for k, v in shapes.items() if not k.endswith("num_batches_tracked")}
    for name, expected in [("model.safetensors", shapes)] + ([(EMA_FILE, float_shapes)] if needs_ema else []):
        problem = safetensors_problem(os.path.join(path, name), expected)
        if problem:
            return problem
    rng_files = [name for name in os.listdir(path) if RNG_FILE_RE.match(name)]
    for name, keys in [(OPTIMIZER_NAME, ("state", "param_groups")), (SCHEDULER_NAME, ("last_epoch",))] + [
        (name, RNG_KEYS) for name in rng_files
    ]:
        problem = _torch_file_problem(os.path.join(path, name), keys)
        if problem:
            return problem
    step = state.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"trainer_state.json has global_step {step!r}, not a step number"
    match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if match and int(match.group(1)) != step:
        return f"trainer_state.json has global_step {step} but the folder is {os.path.basename(path)}"
    if metric_for_best_model is not None:
        return _best_metric_problem(state, path, metric_for_best_model, greater_is_better)
    return None


def find_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_checkpoint(training_args: HierarchicalTrainingArguments, model: nn.Module | None = None) -> str | None:
    """The checkpoint to resume from: the one asked for (it must be complete) or, by default, the newest complete
    checkpoint in `output_dir` ([`checkpoint_problem`], with the tensor shapes of `model` when given). Incomplete
    ones are named in a warning and moved aside to `incomplete-<name>` (never deleted). With checkpoints present but
    none usable, stop unless `--restart_from_scratch`."""
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()} if model is not None else None
    metric = training_args.metric_for_best_model if training_args.load_best_model_at_end else None
    greater = training_args.greater_is_better if training_args.greater_is_better is not None else True
    problem_of = partial(
        checkpoint_problem,
        needs_ema=training_args.ema_decay > 0,
        shapes=shapes,
        metric_for_best_model=metric,
        greater_is_better=greater,
    )
    if training_args.resume_from_checkpoint is not None:
        problem = problem_of(training_args.resume_from_checkpoint)
        if problem:
            raise ValueError(f"cannot resume from {training_args.resume_from_checkpoint!r}: {problem}")
        logger.info("Resuming from %s", training_args.resume_from_checkpoint)
        return training_args.resume_from_checkpoint
    checkpoints = find_checkpoints(training_args.output_dir)
    for path in reversed(checkpoints):
        problem = problem_of(path)
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


@contextlib.contextmanager
def output_dir_lock(output_dir: str) -> Iterator[None]:
    """Hold `output_dir/.run.lock` for the duration: an exclusive `flock` that the system releases when the process
    ends in any way, so the lock of a killed run is never stale. The file names the holder (pid and host); a second
    run into the same folder stops with `ValueError` naming it. Creating the folder and the file also proves, before
    any work, that the folder is writable."""
    path = os.path.join(output_dir, LOCK_FILE)
    while True:
        try:
            os.makedirs(output_dir, exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise ValueError(f"--output_dir {output_dir!r} cannot be written: {error.strerror}") from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(path).read_text().strip() or "a process that is starting"
            os.close(descriptor)
            raise ValueError(
                f"--output_dir {output_dir!r} is in use by another run ({holder}): wait for it to end, or choose "
                "another --output_dir"
            ) from None
        with contextlib.suppress(FileNotFoundError):  # a holder that was ending may have removed the file
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                break
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)  # while still locked: a waiting run then sees the file is gone and opens a new one
        os.close(descriptor)


def check_batch_fits(batch_size: int, image_size: int) -> None:
    """Refuse a batch that cannot fit in memory: an evaluation batch needs about `EVAL_MEMORY_FACTOR` times its
    float32 input, training more. Compared with the machine's memory (and the accelerator's, when there is one)."""
    needed = EVAL_MEMORY_FACTOR * batch_size * 3 * image_size * image_size * 4
    memory = {"this machine": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")}
    if torch.cuda.is_available():
        memory["the GPU"] = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    for where, available in memory.items():
        if needed > available:
            raise ValueError(
                f"--batch_size {batch_size} cannot fit: one batch of {image_size}x{image_size} images needs at least "
                f"{needed / 2**30:.0f} GiB, {where} has {available / 2**30:.0f} GiB"
            )


def write_model_card(
    output_dir: str,
    model: nn.Module,
    training_args: TrainingArguments,
    dataset_name: str | None,
    trained_epochs: float | None = None,
    repo_id: str | None = None,
) -> None:
    """Write `README.md` in `output_dir`: what the model is, how to load it, its metrics and its training setup
    (see `model_card.build_model_card`). `trained_epochs` is None for a run that only evaluated the model."""
    source = getattr(model.config, "_name_or_path", None) or None
    model_card.write_model_card(output_dir, model.config, training_args, dataset_name, trained_epochs, source, repo_id)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse options, hold the output folder, then [`run`]; return all metrics."""
    model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args)
    image_size = model_args.image_size or HierarchicalEfficientNetV2Config().image_size
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        check_batch_fits(getattr(training_args, name), image_size)
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        raise ValueError("nothing to do: pass --do_train, --do_eval and/or --do_predict")
    if not training_args.do_train and model_args.model_name_or_path is None:
        raise ValueError("evaluating without --do_train needs --model_name_or_path (a trained model)")
    check_remote_resources(  # everything the run would download, named at once, before anything is written
        data_args.dataset_name,
        model_args.model_name_or_path,
        model_args.backbone_weights,
        cache_dir=data_args.cache_dir,
        revision=model_args.model_revision,
    )
    with output_dir_lock(training_args.output_dir) if training_args.should_save else contextlib.nullcontext():
        return run(model_args, data_args, training_args)


def run(
    model_args: ModelArguments, data_args: DataArguments, training_args: HierarchicalTrainingArguments
) -> dict[str, float]:
    """Load data and model, train, evaluate, predict, save; return all metrics."""
    if training_args.keep_freed_memory and keep_freed_memory():
        logger.debug("glibc allocator keeps freed memory for reuse (--keep_freed_memory)")
    set_seed(training_args.seed)
    with training_args.main_process_first(desc="dataset loading"):
        raw = load_raw_datasets(data_args)
    hierarchy = discover_hierarchy(raw, data_args)  # the classes of the data decide the heads
    if hierarchy is not None:
        logger.info("Classes of the data: %s", hierarchy.describe())
    with quiet_transformers():
        model = load_model(model_args, data_args.cache_dir, hierarchy)
    checkpoint = None
    if training_args.do_train:
        with training_args.main_process_first(desc="checkpoint scan"):
            checkpoint = resolve_checkpoint(training_args, model)
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
    if training_args.should_save:
        write_run_options(training_args.output_dir, model_args, data_args, training_args)
    sizes = {split: len(dataset) for split, dataset in splits.items()}
    logger.info(
        run_summary(model, model_args.model_name_or_path, data_args.dataset_name, sizes, training_args, checkpoint)
    )

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
        report = (prediction, splits["validation"], "validation")
        if model_args.calibrate:  # temperatures and selective threshold, stored in the saved config
            calibration = calibrate_and_select(config, prediction, model_args, training_args.seed)
            eval_metrics.update(calibration.metrics)
            if calibration.heldout_rows is not None:  # the report measures the images not used to calibrate
                rows = calibration.heldout_rows
                report = (
                    subset_prediction(prediction, rows),
                    splits["validation"].select(rows),
                    "validation, held out",
                )
            if trainer.is_world_process_zero():
                config.save_pretrained(training_args.output_dir)
        trainer.log(eval_metrics)  # as trainer.evaluate does: log history, integrations, "epoch"
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
        if trainer.is_world_process_zero():
            write_prediction_report(training_args.output_dir, report[0], config, report[1], report[2])
    if training_args.do_predict:
        prediction = trainer.predict(splits["test"], metric_key_prefix="test")
        test_metrics = prediction.metrics
        logits, labels = prediction.predictions, prediction.label_ids
        test_metrics.update(
            {f"test_{name}": value for name, value in evaluate_calibration(*logits, *labels, config).items()}
        )
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
