"""Checkpoint safety: judge a checkpoint's files before resuming from it, find and pick checkpoints, and hold
the output folder against a second run."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from configuration_hierarchical import is_number
from hierarchical.data.hierarchy import Hierarchy
from hierarchical.data.provenance import folder_tables, tables_difference
from hierarchical.training.arguments import HierarchicalTrainingArguments
from hierarchical.training.callbacks import EMA_FILE
from modeling_hierarchical import nonfinite_summary, nonfinite_tensors

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
RNG_FILE_RE = re.compile(r"^rng_state(_\d+)?\.pth$")
RNG_KEYS = ("python", "numpy", "cpu")
LOCK_FILE = ".run.lock"


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


def nonfinite_problem(path: str) -> str | None:
    """Why the weights in the safetensors file `path` cannot be used: the tensors that hold NaN or infinite values
    ([`nonfinite_tensors`], as the model's own loading finds them); None if all finite."""
    with safe_open(path, framework="pt") as file:
        bad = nonfinite_tensors((key, file.get_tensor(key)) for key in file.keys())  # noqa: SIM118
    return None if not bad else f"{os.path.basename(path)} holds {nonfinite_summary(bad)}"


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
    if not is_number(best):  # a boolean is not a metric: `true == 1.0` would pass below
        return f"trainer_state.json has best_metric {best!r}, not a number"
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    logged = [
        (entry["step"], entry[metric])
        for entry in state.get("log_history") or []
        if isinstance(entry, dict) and is_number(entry.get(metric)) and entry.get("step") is not None
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
    checkpoint and metric agree with its evaluation log (with `metric_for_best_model`); `config.json` loads as this
    model's config (its label tables are what a resume is compared by); `model.safetensors` (and,
    with `needs_ema`, `ema.safetensors`) complete, with the tensor names and shapes of `shapes` when given; the
    optimizer, scheduler and RNG states load as tensors and plain containers (nothing else is unpickled) and hold
    what resuming reads; every weight finite. Only files the Trainer writes are judged: anything else in the folder is ignored."""
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
        problem = safetensors_problem(os.path.join(path, name), expected) or nonfinite_problem(os.path.join(path, name))
        if problem:
            return problem
    try:  # the label tables a resume is judged by: a checkpoint without them cannot be told apart from another run's
        if folder_tables(path) is None:
            return "config.json is missing"
    except (OSError, ValueError, TypeError) as error:
        return f"config.json is not a valid config of this model ({str(error).splitlines()[0][:200]})"
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


def _optimizer_group_count(path: str) -> int | None:
    """The number of parameter groups in the optimizer state of checkpoint `path`, or None when it has none."""
    try:
        content = torch.load(os.path.join(path, OPTIMIZER_NAME), map_location="cpu", weights_only=True, mmap=True)
        return len(content["param_groups"])
    except Exception:  # a missing or broken file is judged by checkpoint_problem
        return None


def other_run_problem(path: str, tables: Hierarchy | None = None, num_param_groups: int | None = None) -> str | None:
    """Why checkpoint `path` belongs to another run than the one resuming it, or None: label tables (classes,
    their order, superclasses, mapping) other than `tables` ([`tables_difference`]), or an optimizer state with
    another number of parameter groups than `num_param_groups`."""
    if tables is not None:
        try:
            recorded = folder_tables(path)
        except (OSError, ValueError):  # an unreadable config.json: the Trainer's loading names it
            recorded = None
        if recorded is not None and (difference := tables_difference(recorded, tables, "the checkpoint", "this run")):
            return f"it was trained for other label tables: {difference}"
    if num_param_groups is not None:
        groups = _optimizer_group_count(path)
        if groups is not None and groups != num_param_groups:
            return (
                f"its optimizer state ({OPTIMIZER_NAME}) holds {groups} parameter groups, this run's optimizer "
                f"{num_param_groups} (--layer_decay, --weight_decay and the frozen stages decide the groups)"
            )
    return None


# Not transformers' get_last_checkpoint: it gives only the newest, and resuming falls back past incomplete ones.
def find_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_checkpoint(
    training_args: HierarchicalTrainingArguments, model: nn.Module | None = None, num_param_groups: int | None = None
) -> str | None:
    """The checkpoint to resume from: the one asked for (it must be complete) or, by default, the newest complete
    checkpoint in `output_dir` ([`checkpoint_problem`], with the tensor shapes of `model` when given). Incomplete
    ones are named in a warning and moved aside to `incomplete-<name>` (never deleted). With checkpoints present but
    none usable, stop unless `--restart_from_scratch`. A checkpoint of another run (other label tables than
    `model`'s config, another number of optimizer parameter groups than `num_param_groups`: [`other_run_problem`])
    stops the run with `ValueError` naming the difference, before any training."""
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()} if model is not None else None
    tables = Hierarchy.from_config(model.config) if model is not None and hasattr(model, "config") else None

    def refuse_other_run(path: str) -> None:
        if problem := other_run_problem(path, tables, num_param_groups):
            raise ValueError(
                f"cannot resume from {path!r}: {problem}. Resume with the data and options of the run that wrote "
                "it, or pass another --output_dir"
            )

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
        refuse_other_run(training_args.resume_from_checkpoint)
        problem = problem_of(training_args.resume_from_checkpoint)
        if problem:
            raise ValueError(f"cannot resume from {training_args.resume_from_checkpoint!r}: {problem}")
        logger.info("Resuming from %s", training_args.resume_from_checkpoint)
        return training_args.resume_from_checkpoint
    checkpoints = find_checkpoints(training_args.output_dir)
    for path in reversed(checkpoints):
        refuse_other_run(path)
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
