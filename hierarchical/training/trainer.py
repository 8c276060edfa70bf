"""`HierarchicalTrainer`: the Trainer with per-group learning rates, the time-based schedule and hierarchy metrics."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from transformers import EvalPrediction, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy, TrainOutput

from configuration_hierarchical import NUM_BACKBONE_STAGES
from hierarchical.data.device_preprocess import DevicePreprocessor
from hierarchical.data.hierarchy import HEAD_PREFIXES
from hierarchical.data.provenance import DataRecord, write_record
from hierarchical.evaluation.metrics import compute_hierarchy_metrics
from hierarchical.training import model_card
from hierarchical.training.callbacks import (
    EMACallback,
    NonFiniteTrainingError,
    ResumeCheckCallback,
    TimeBudgetCallback,
    time_schedule_factor,
)
from hierarchical.training.checkpoints import find_checkpoints

logger = logging.getLogger(__name__)
CallbackType = TypeVar("CallbackType", bound=TrainerCallback)


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
            Defaults to one built from the model's config.
        data_record (`DataRecord`, *optional*):
            The data the model is trained on, written as `provenance.json` with every checkpoint and saved model.
            Every other argument is the `Trainer`'s.
    """

    def __init__(
        self,
        *args,
        device_preprocessor: DevicePreprocessor | None = None,
        data_record: DataRecord | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.data_record = data_record
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

    # Private: no public hook sees every batch, of training and of evaluation, once on the device before the model.
    def _prepare_inputs(self, inputs: dict) -> dict[str, torch.Tensor]:
        """The batch on the device (where the data loader already put it), preprocessed there."""
        return self.device_preprocessor(super()._prepare_inputs(inputs))

    def _train_filtering_on_device(self, *args, **kwargs) -> TrainOutput:
        """The Trainer's `train`. With `--logging_nan_inf_filter true` (off by default), non-finite losses are kept out of
        the logged loss on the device, in `training_step`, instead of by the Trainer's own filter, which reads every loss
        on the host and so makes it wait for the device at each step. The option reads as given everywhere else.
        `training_step` reads the Trainer's running loss `self._tr_loss` and `self._globalstep_last_logged`: no public
        hook filters the logged loss (tests/test_training.py pins both attributes)."""
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
        """Inside this context `self.args.logging_nan_inf_filter` is the user's (see `_train_filtering_on_device`)."""
        if not self._filter_loss_on_device:
            yield
            return
        self.args.logging_nan_inf_filter = True
        try:
            yield
        finally:
            self.args.logging_nan_inf_filter = False

    # Private: no public hook runs around the saving of the training arguments.
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the model, with the options as given (they are saved too) and the record of its data."""
        with self._options_as_given():
            super()._save(output_dir, state_dict)
        if self.data_record is not None and self.args.should_save:
            write_record(output_dir or self.args.output_dir, self.data_record)

    # Private: no public hook runs around the pushing of the training arguments.
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

    def _callback(self, kind: type[CallbackType]) -> CallbackType | None:
        """This trainer's callback of class `kind`, if it has one."""
        return next((callback for callback in self.callback_handler.callbacks if isinstance(callback, kind)), None)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Log as the Trainer does; a NaN or infinite training loss stops training (see `--logging_nan_inf_filter`)."""
        for key in ("loss", "train_loss"):
            if key in logs and not math.isfinite(logs[key]):
                raise self._diverged(f"the training loss is {logs[key]}")
        super().log(logs, *args, **kwargs)

    # Private: `on_save` runs after the checkpoint is written; no public hook runs before it, to refuse a
    # non-finite one or to write a file that `trainer_state.json` must follow.
    def _save_checkpoint(self, model: nn.Module, trial=None) -> None:
        """Save a checkpoint, never one with NaN or infinite weights (the last good one stays the newest). The
        weight average is written first, so that `trainer_state.json`, written last, marks a complete checkpoint."""
        self.check_finite_weights()
        ema = self._callback(EMACallback)
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
        budget = self._callback(TimeBudgetCallback)
        if budget is None:  # a Trainer built without main(): the budget callback is part of the schedule
            budget = TimeBudgetCallback(self.args.max_train_minutes)
            self.add_callback(budget)
        warmup = self.args.warmup_steps

        def factor(step: int) -> float:  # a function, so the scheduler's saved state holds no reference to it
            return time_schedule_factor(budget.progress(), warmup)

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # Private: no public option skips the gradient norm the Trainer computes after every step.
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
        ema = self._callback(EMACallback)
        with self._options_as_given(), ema.applied(self.model) if ema is not None else contextlib.nullcontext():
            return super().evaluate(*args, **kwargs)

    def create_model_card(self, *args, **kwargs) -> None:
        """Write this project's model card (used by `push_to_hub` too)."""
        if self.is_world_process_zero():
            trained = self.state.epoch if self.state.global_step > 0 else None
            repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id  # None: the card's placeholder
            source = getattr(self.model.config, "_name_or_path", None) or None  # the model the run started from
            model_card.write_model_card(
                self.args.output_dir,
                self.model.config,
                self.args,
                getattr(self, "dataset_name", None),
                trained,
                source,
                repo_id,
            )


def compute_metrics(eval_prediction: EvalPrediction, fine_to_coarse: list[int]) -> dict[str, float]:
    """Hierarchy metrics from the Trainer's predictions `(logits, coarse_logits)` and labels."""
    logits, coarse_logits = eval_prediction.predictions
    labels, coarse_labels = eval_prediction.label_ids
    return compute_hierarchy_metrics(logits, coarse_logits, labels, coarse_labels, fine_to_coarse)
