"""Trainer callbacks of the training script: the weight average (EMA), the time budget, the resume check and the
progress lines of a log file."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"
PROGRESS_INTERVAL_S = 30.0  # a progress line in a log file at most this often, whatever --logging_steps says


def _load_to(path: str, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file on `device` (safetensors itself refuses indexed CPU devices, `cpu:0`)."""
    return {name: value.to(device) for name, value in load_file(path).items()}


# Not torch.optim.swa_utils.AveragedModel: it wraps a second module with no place in the Trainer's checkpoints;
# this keeps one state dict, saved as ema.safetensors and restored on resume.
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
        self.update = get_ema_multi_avg_fn(decay)  # shadow <- decay * shadow + (1 - decay) * current, in place

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
        self.update([self.shadow[k] for k in names], [current[k].to(self.shadow[k].dtype) for k in names], None)

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


class TimedProgressCallback(TrainerCallback):
    """Logs a progress line every `interval` seconds of training (step, share done, steps per second, time left),
    for a log file where no progress bar is drawn. `clock` gives seconds (`time.monotonic`; a test passes its own).
    The rate counts only the steps of this process's run (a resumed run starts its own count). With `budget` (the
    run's `--max_train_minutes`), the time left is the budget's when it ends training first."""

    def __init__(
        self,
        interval: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        budget: TimeBudgetCallback | None = None,
    ):
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.interval, self.clock, self.budget = interval, clock, budget
        self.start: tuple[float, int] | None = None  # (time, step) when training began
        self.last_line = 0.0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.start = (self.clock(), state.global_step)
        self.last_line = self.start[0]

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        now = self.clock()
        if self.start is None or now - self.last_line < self.interval:
            return
        self.last_line = now
        started, first_step = self.start
        budget_left = None if self.budget is None else max(self.budget.seconds - self.budget.elapsed(), 0.0)
        logger.info(
            progress_line(
                state.global_step, state.max_steps, now - started, state.global_step - first_step, budget_left
            )
        )


def progress_line(step: int, max_steps: int, elapsed: float, steps_done: int, budget_left: float | None = None) -> str:
    """`step 40/120 (33%), 0.52 steps/s, 2m34s left` from the steps this run made in `elapsed` seconds; with
    `budget_left` (seconds of a time budget) the time left is the sooner of the two ends, and says so when it is the
    budget's."""
    rate = steps_done / elapsed if elapsed > 0 else 0.0
    share = f" ({100 * step / max_steps:.0f}%)" if max_steps > 0 else ""
    line = f"step {step}/{max_steps}{share}, {rate:.2f} steps/s"
    left = (max_steps - step) / rate if rate > 0 and max_steps > step else None
    by_budget = budget_left is not None and (left is None or budget_left < left)
    if by_budget:
        left = budget_left
    if left is not None:
        left = round(left)
        hours, minutes, seconds = left // 3600, left // 60 % 60, left % 60
        line += f", {hours}h{minutes:02d}m left" if hours else f", {minutes}m{seconds:02d}s left"
        line += " (--max_train_minutes)" if by_budget else ""
    return line


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
