"""Options of the training script: `ModelArguments`, `HierarchicalTrainingArguments` and their checks."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, fields

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType
from transformers.utils.import_utils import is_in_notebook

from configuration_hierarchical import HierarchicalEfficientNetV2Config, check_unit_interval
from hierarchical.evaluation.calibration import CalibrationArguments
from hierarchical.options import check_finite_options, option

logger = logging.getLogger(__name__)

# Options that set the same thing: the original tool's name first, then the Trainer's.
OPTION_ALIASES = (
    ("epochs", "num_train_epochs"),
    ("batch_size", "per_device_train_batch_size", "per_device_eval_batch_size"),
    ("checkpoint_path", "resume_from_checkpoint"),
)
EVAL_MEMORY_FACTOR = 10  # peak memory of an evaluation batch, measured at 32 and 64 px: 11 to 22 times its input


@dataclass
class ModelArguments(CalibrationArguments):
    """Where the model comes from: a saved model / Hub id, or a fresh model built from these options; and how it is
    calibrated after evaluation ([`CalibrationArguments`]: temperatures and selective threshold, saved with it)."""

    model_name_or_path: str | None = option(
        None, "A saved model folder or Hub id to start from. Unset: build a fresh model."
    )
    backbone_weights: str = option(
        "imagenet",
        "Fresh models only: 'imagenet' (torchvision IMAGENET1K_V1), 'none' (random) or a local "
        "torchvision state dict (.pth/.safetensors).",
    )
    image_size: int | None = option(None, "Input resolution (default 224).")
    num_frozen_stages: int | None = option(None, "Backbone stages frozen from the input, of 8 (default 4).")
    dropout: float | None = option(None, "Dropout before the heads (default 0.2).")
    drop_path_rate: float | None = option(None, "Stochastic depth rate (default 0.2).")
    fine_head_uses_coarse_logits: bool | None = option(None, "Feed the coarse logits to the fine head (default true).")
    coarse_loss_weight: float | None = option(None, "Weight of the coarse loss (default 1).")
    label_smoothing: float | None = option(
        None,
        "Label smoothing inside both losses (default 0). Use this, not --label_smoothing_factor, which would drop "
        "the coarse loss.",
    )
    channels_last: bool | None = option(None, "Channels-last memory format.")
    reinitialize_heads: bool = option(
        False,
        "With --model_name_or_path: keep its backbone and start both heads afresh for the classes of the "
        "data (transfer to a new task). Without it, a model whose classes or superclasses differ from the data's "
        "is refused.",
    )
    class_weights: str = option(
        "none",
        "'balanced': weigh both cross-entropies by inverse class frequency in the training split (saved "
        "in the config); 'none': all classes alike.",
        choices=("none", "balanced"),
    )
    model_revision: str = option("main", "Hub revision (branch, tag or commit).")
    token: str | None = option(None, "Hub token for private models.")
    allow_missing_weights: bool = option(
        False,
        "Load a --model_name_or_path whose weights file lacks some of the model's tensors or holds "
        "others (they keep their fresh initialisation). Off: such a folder is an error naming the tensors.",
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

    output_dir: str | None = option(
        "outputs/hierarchical-efficientnetv2-cifar100",
        "Where checkpoints, metrics, the final model and its card are written.",
    )
    lr_conv: float = option(5e-4, "Peak learning rate of the convolutional backbone.")
    lr_fc: float = option(1e-3, "Peak learning rate of the linear heads.")
    layer_decay: float = option(
        1.0, "Layer-wise LR decay: backbone stage s trains at lr_conv * layer_decay**(7 - s). 1 = off."
    )
    learning_rate: float | None = option(None, "Refused: set --lr_conv and --lr_fc.")
    epochs: float | None = option(None, "Alias of --num_train_epochs.")
    batch_size: int | None = option(None, "Alias: per-device train and eval batch size.")
    checkpoint_path: str | None = option(None, "Alias of --resume_from_checkpoint.")
    restart_from_scratch: bool = option(
        False, "Start over although output_dir holds checkpoints, none of them usable (they are kept)."
    )
    sync_batchnorm: bool = option(False, "Use SyncBatchNorm in multi-process runs.")
    max_train_minutes: float | None = option(
        None, "Stop training (then evaluate and save as usual) after this many minutes of training."
    )
    keep_freed_memory: bool = option(
        True,
        "On Linux with glibc, keep freed memory in the process (mmap threshold 32 MiB, trim threshold "
        "1 GiB) instead of handing it back to the system and faulting it in again at every step.",
    )
    schedule_by_time: bool = option(
        False,
        "With --max_train_minutes: warm up and cosine-decay the learning rates over that time budget "
        "instead of over the steps, so the schedule ends when the time does, on any machine. Set "
        "--num_train_epochs above what fits in the budget.",
    )
    ema_decay: float = option(0.0, "Exponential moving average of the weights (e.g. 0.9998); 0 = off.")
    num_train_epochs: float = option(10.0, "Total number of training epochs.")
    per_device_train_batch_size: int = option(128, "Batch size per device for training.")
    per_device_eval_batch_size: int = option(128, "Batch size per device for evaluation.")
    weight_decay: float = option(1e-4, "AdamW weight decay (not on biases and norms).")
    lr_scheduler_type: str = option("cosine", "Scheduler of both learning rates.")
    warmup_steps: float = option(0.05, "Warmup steps, or a ratio of all steps if < 1.")
    max_grad_norm: float = option(0.0, "Clip gradients to this global norm; 0 (the default) does not clip.")
    eval_strategy: str = option("epoch", "When to evaluate on the validation split.")
    save_strategy: str = option("epoch", "When to save a checkpoint.")
    logging_steps: float = option(50, "Log every N steps.")
    load_best_model_at_end: bool = option(True, "Keep the best checkpoint as final model.")
    metric_for_best_model: str | None = option("fine_accuracy", "Metric of the best model.")
    save_total_limit: int | None = option(3, "Checkpoints kept (the best one always).")
    remove_unused_columns: bool = option(False, "Keep image columns for the transforms.")
    label_names: list[str] | None = option(
        help="Label inputs of the model.", default_factory=lambda: ["labels", "coarse_labels"]
    )
    logging_nan_inf_filter: bool = option(
        False,
        "Replace NaN/inf step losses by the average in the logs. Off (the default): a non-finite loss "
        "shows in the log and stops training with an error.",
    )
    report_to: None | str | list[str] = option(
        None, "Integrations to log to; default: TensorBoard when installed, else none."
    )

    def __post_init__(self) -> None:
        check_finite_options(self)
        self._apply_aliases()
        self._check_ranges()
        self._check_time_schedule()
        self._settle_schedules()
        self._fit_this_machine()
        do_eval = self.do_eval
        super().__post_init__()
        if not self.do_train:  # the evaluation schedule belongs to training: evaluate only when asked to
            self.do_eval = do_eval

    def _apply_aliases(self) -> None:
        """Copy the original tool's options (`--epochs`, `--batch_size`, `--checkpoint_path`) to the Trainer's, and
        `--lr_fc` to `learning_rate` (which is not used otherwise)."""
        self._check_alias_agreement()
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
        if self.learning_rate is not None:
            raise ValueError(
                f"--learning_rate {self.learning_rate} is not used: set --lr_conv (backbone) and --lr_fc (heads)"
            )
        self.learning_rate = self.lr_fc

    def _check_alias_agreement(self) -> None:
        """`ValueError` when an alias and the option it stands for are both set to different values (`--epochs 3
        --num_train_epochs 5`): one of the two would be dropped silently. An option left at its default agrees."""
        defaults = {field.name: field.default for field in fields(self)}
        for alias, *names in OPTION_ALIASES[:2]:
            value = getattr(self, alias)
            for name in names:
                if value is not None and getattr(self, name) not in (defaults[name], value):
                    raise ValueError(f"--{alias} {value} and --{name} {getattr(self, name)} disagree; give one of them")

    def _check_ranges(self) -> None:
        """`ValueError` naming the first option out of its range (schedules, batch sizes, learning rates, decays,
        length, resume folder)."""
        for name, choices in (
            ("lr_scheduler_type", SchedulerType),
            ("eval_strategy", IntervalStrategy),
            ("save_strategy", SaveStrategy),
        ):
            if getattr(self, name) not in {choice.value for choice in choices}:
                raise ValueError(
                    f"--{name} must be one of {[choice.value for choice in choices]}, got {getattr(self, name)!r}"
                )
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_conv", "lr_fc", "weight_decay"):
            if getattr(self, name) < 0:  # NaN and infinity are refused by check_finite_options
                raise ValueError(f"--{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.lr_fc == 0:
            raise ValueError("--lr_fc must be > 0, got 0")
        for name in ("max_grad_norm", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        check_unit_interval("--layer_decay", self.layer_decay, "(0, 1]")
        check_unit_interval("--ema_decay", self.ema_decay, "[0, 1)")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ValueError(f"--num_train_epochs must be > 0, got {self.num_train_epochs}")
        if self.resume_from_checkpoint is not None and not os.path.isdir(self.resume_from_checkpoint):
            raise ValueError(f"--resume_from_checkpoint {self.resume_from_checkpoint!r} is not a folder")

    def _check_time_schedule(self) -> None:
        """`--max_train_minutes` must be positive; `--schedule_by_time` needs it, a cosine and a warm-up share."""
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"--max_train_minutes must be > 0, got {self.max_train_minutes}")
        if not self.schedule_by_time:
            return
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

    def _settle_schedules(self) -> None:
        """No evaluation or checkpoint schedule for an evaluation-only run, and a best model to reload at the end
        only when both schedules exist and agree."""
        if not self.do_train and (self.do_eval or self.do_predict):  # evaluation only: no training-time schedules
            self.eval_strategy, self.save_strategy = IntervalStrategy.NO.value, SaveStrategy.NO.value
        if IntervalStrategy.NO in (IntervalStrategy(self.eval_strategy), SaveStrategy(self.save_strategy)):
            self.load_best_model_at_end = False  # no evaluation or no checkpoints: no best checkpoint to reload
        if self.load_best_model_at_end:
            self._align_save_and_eval_schedules()

    def _fit_this_machine(self) -> None:
        """Defaults that depend on the machine: TensorBoard when installed, the CPU without an accelerator, no
        progress bars in a redirected log; and no search for unused parameters in multi-process runs."""
        if self.report_to is None:
            # imported here, not with the module: `transformers.integrations` loads the model code (2 s), which
            # `--help` does not need (building the TrainingArguments loads it anyway)
            from transformers.integrations import is_tensorboard_available

            self.report_to = ["tensorboard"] if is_tensorboard_available() else "none"
        if not self.use_cpu and not torch.accelerator.is_available():
            self.use_cpu = True  # lets `accelerate launch --multi_gpu` start gloo processes on a CPU-only machine
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False  # every trainable parameter takes part in every step
        if self.disable_tqdm is None and not (sys.stderr.isatty() or is_in_notebook()):
            self.disable_tqdm = True  # a redirected log gets the log lines, not progress bars drawn with "\r"

    def _align_save_and_eval_schedules(self) -> None:
        """Make the checkpoint and evaluation schedules agree, as reloading the best checkpoint at the end needs:
        when one of them is changed to `steps`, the other one (left at `epoch`) follows it. When their steps do not
        line up, the best checkpoint is not reloaded (with a warning) instead of stopping the run."""
        eval_strategy, save_strategy = IntervalStrategy(self.eval_strategy), SaveStrategy(self.save_strategy)
        if save_strategy == SaveStrategy.BEST:
            return
        followed = None  # (the schedule changed to steps, how the other one follows it)
        if save_strategy == SaveStrategy.STEPS and eval_strategy == IntervalStrategy.EPOCH:
            self.eval_strategy, self.eval_steps = IntervalStrategy.STEPS.value, self.eval_steps or self.save_steps
            followed = (
                "--save_strategy",
                f"evaluating on the same schedule (--eval_strategy steps --eval_steps {self.eval_steps})",
            )
        elif eval_strategy == IntervalStrategy.STEPS and save_strategy == SaveStrategy.EPOCH:
            self.save_strategy, self.save_steps = SaveStrategy.STEPS.value, self.eval_steps or self.logging_steps
            followed = (
                "--eval_strategy",
                f"saving checkpoints on the same schedule (--save_strategy steps --save_steps {self.save_steps})",
            )
        if followed:
            logger.warning("%s steps: %s, so that the best checkpoint can be reloaded at the end", *followed)
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
