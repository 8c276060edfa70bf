"""End-to-end tests of run_classification.py: metrics, saved model, optimizer groups, resume, bad options."""

import inspect
import itertools
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments, pipeline
from transformers.trainer_utils import PredictionOutput

from conftest import (
    HANG_TIMEOUT_S,
    METRIC_NAMES,
    PROJECT_DIR,
    data_args,
    make_parquet_dataset,
    small_config,
    tiny_args,
)
from data_utils import prepare_datasets
from hierarchical.evaluation.calibration import CalibrationArguments, calibrate_and_select
from hierarchical.options import PROJECT_LOGGER
from hierarchical.training import callbacks
from hierarchical.training import run as training_run
from hierarchical.training.callbacks import TimeBudgetCallback, time_schedule_factor
from hierarchical.training.checkpoints import checkpoint_problem
from hierarchical.training.model_card import MODEL_ID_PLACEHOLDER
from hierarchical.training.trainer import HierarchicalTrainer, parameter_groups
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification
from run_classification import main, parse_args


@pytest.fixture(scope="module")
def trained_run(tiny_parquet_dir, tmp_path_factory) -> tuple[Path, dict]:
    output_dir = tmp_path_factory.mktemp("run") / "out"
    metrics = main(tiny_args(tiny_parquet_dir, output_dir, "--do_train", "--do_eval", "--do_predict"))
    return output_dir, metrics


@pytest.mark.slow
def test_training_writes_metrics_model_and_card(trained_run):
    output_dir, metrics = trained_run
    for name, prefix in (("eval_results.json", "eval"), ("test_results.json", "test")):
        results = json.loads((output_dir / name).read_text())
        assert {f"{prefix}_{metric}" for metric in METRIC_NAMES} <= set(results), name
        assert all(0.0 <= results[f"{prefix}_{m}"] <= 1.0 for m in METRIC_NAMES - {"mistake_severity"})
        assert results[f"{prefix}_mistake_severity"] in (0.0,) or 1.0 <= results[f"{prefix}_mistake_severity"] <= 2.0
    assert json.loads((output_dir / "eval_results.json").read_text())["eval_num_samples"] == 20
    assert json.loads((output_dir / "test_results.json").read_text())["test_num_samples"] == 30
    all_results = json.loads((output_dir / "all_results.json").read_text())
    assert {"train_loss", "eval_fine_accuracy", "test_fine_accuracy"} <= set(all_results)
    assert metrics["test_fine_accuracy"] == all_results["test_fine_accuracy"]
    card = (output_dir / "README.md").read_text()
    assert "trust_remote_code=True" in card and "| fine_accuracy |" in card and "lr_conv / lr_fc" in card
    assert f"{all_results['test_coarse_accuracy']:.4f}" in card


@pytest.mark.slow
def test_card_usage_snippet_runs_as_written(trained_run, tmp_path):
    """The card's snippet, run in a folder without this project: the model loads from the output folder's code."""
    output_dir, _ = trained_run
    snippet = (output_dir / "README.md").read_text().split("```python\n")[1].split("```")[0]
    assert f'model_id = "{MODEL_ID_PLACEHOLDER}"' in snippet, "no Hub id given: the placeholder the text names"
    snippet = snippet.replace(MODEL_ID_PLACEHOLDER, str(output_dir))  # as a user does after reading the card
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    completed = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "'score'" in completed.stdout and "[" in completed.stdout.splitlines()[-1]


@pytest.mark.slow
def test_output_folder_reloads_and_predicts(trained_run):
    output_dir, _ = trained_run
    model = HierarchicalEfficientNetV2ForImageClassification.from_pretrained(output_dir).eval()
    assert model.config.image_size == 32
    classifier = pipeline("image-classification", model=str(output_dir), trust_remote_code=True)
    from PIL import Image

    result = classifier(Image.new("RGB", (32, 32), (200, 30, 30)), top_k=2)
    assert len(result) == 2 and result[0]["label"] in model.config.label2id


@pytest.mark.slow
def test_evaluating_a_saved_model_needs_no_training(trained_run, tiny_parquet_dir, tmp_path):
    output_dir, _ = trained_run
    metrics = main(
        tiny_args(tiny_parquet_dir, tmp_path / "eval", "--model_name_or_path", str(output_dir), "--do_predict")
    )
    trained = json.loads((output_dir / "test_results.json").read_text())
    for name in METRIC_NAMES:
        assert metrics[f"test_{name}"] == pytest.approx(trained[f"test_{name}"]), name
    assert (tmp_path / "eval" / "test_results.json").is_file()
    assert not list((tmp_path / "eval").glob("checkpoint-*"))


def test_optimizer_groups_hold_the_expected_parameters(tiny_parquet_dir, tmp_path):
    extra = ["--lr_conv", "2e-4", "--lr_fc", "3e-3", "--eval_strategy", "no", "--load_best_model_at_end", "false"]
    _, _, args = parse_args(tiny_args(tiny_parquet_dir, tmp_path, *extra))
    model = HierarchicalEfficientNetV2ForImageClassification(small_config())
    trainer = HierarchicalTrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        group_names = [names[id(p)] for p in group["params"]]
        seen.update(group_names)
        heads = {n.startswith(("coarse_classifier.", "fine_classifier.")) for n in group_names}
        assert len(heads) == 1, "a group mixes backbone and head parameters"
        assert group["lr"] == (3e-3 if heads == {True} else 2e-4)
        for name in group_names:
            is_matrix = model.get_parameter(name).ndim > 1
            assert group["weight_decay"] == (1e-4 if is_matrix else 0.0), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert seen == trainable, "frozen parameters must be in no group, trainable ones in exactly one"
    assert "features.3.0.block.0.1.weight" not in seen  # frozen BatchNorm
    assert "features.6.0.block.0.1.weight" in seen  # trained BatchNorm weight, no decay
    assert isinstance(optimizer, torch.optim.AdamW)
    scheduler = trainer.create_scheduler(num_training_steps=10, optimizer=optimizer)
    assert len(scheduler.base_lrs) == len(optimizer.param_groups)


def test_layer_decay_scales_the_backbone_stages():
    model = HierarchicalEfficientNetV2ForImageClassification(small_config())
    groups = parameter_groups(model, lr_conv=1.0, lr_fc=10.0, weight_decay=0.1, layer_decay=0.5)
    lr_of = {group["name"]: group["lr"] for group in groups}
    assert lr_of == {"stage4": 0.125, "stage5": 0.25, "stage6": 0.5, "stage7": 1.0, "head": 10.0}


@pytest.mark.slow
def test_script_runs_as_a_subprocess_and_resumes(tiny_parquet_dir, tmp_path):
    """One epoch in a subprocess; the same command with more epochs continues the global step."""
    output_dir = tmp_path / "out"
    command = [sys.executable, str(PROJECT_DIR / "run_classification.py"), "--do_train", "--do_eval"]
    command += tiny_args(tiny_parquet_dir, output_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert (output_dir / "checkpoint-4").is_dir()

    second = subprocess.run(
        command + ["--epochs", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "continuing from the last complete one" in second.stdout + second.stderr
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == list(range(1, 9)), "the resumed run repeats no step and skips none"


def test_cifar_python_folder_trains(tiny_cifar_python_dir, tmp_path):
    metrics = main(
        tiny_args(tiny_cifar_python_dir, tmp_path, "--do_train", "--do_predict", "--train_val_split", "0")
        + ["--eval_strategy", "no", "--load_best_model_at_end", "false"]
    )
    assert metrics["test_num_samples"] == 30


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch_size", "0"], "per_device_train_batch_size must be >= 1"),
        (["--lr_conv=-1e-3"], "lr_conv must be a finite number >= 0"),
        (["--lr_fc=-1"], "lr_fc must be a finite number >= 0"),
        (["--learning_rate", "0.1"], "--learning_rate 0.1 is not used"),
        (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], "is not a folder"),
        (["--checkpoint_path", "/nonexistent/checkpoint-3"], "is not a folder"),
        (["--ema_decay", "1.5"], "ema_decay must be in"),
        (["--train_val_split", "1.5"], "train_val_split"),
        (["--image_size", "8"], "image_size must be"),
        (["--model_name_or_path", "/nonexistent/model"], "neither a folder nor a Hub id"),
        (["--eval_strategy", "no"], "nothing to do"),
        (["--max_train_minutes", "0"], "max_train_minutes must be > 0"),
        (["--schedule_by_time"], "schedule_by_time needs --max_train_minutes"),
        (["--schedule_by_time", "--max_train_minutes", "1", "--lr_scheduler_type", "linear"], "decays with a cosine"),
        (["--schedule_by_time", "--max_train_minutes", "1", "--warmup_steps", "10"], "share of the time"),
        (["--do_eval"], "evaluating without --do_train needs --model_name_or_path"),
    ],
)
def test_contradictory_options_are_rejected_before_any_work(tiny_parquet_dir, tmp_path, extra, message):
    output_dir = tmp_path / "out"
    action = [] if extra in (["--eval_strategy", "no"], ["--do_eval"]) else ["--do_train"]
    with pytest.raises(ValueError, match=message):
        main(tiny_args(tiny_parquet_dir, output_dir, *action, *extra))
    assert not output_dir.exists() or not any(output_dir.iterdir())


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_saved_model_folder_missing_files(tmp_path, tiny_parquet_dir, missing):
    folder = tmp_path / "model"
    HierarchicalEfficientNetV2ForImageClassification(small_config()).save_pretrained(folder)
    (folder / missing).unlink()
    with pytest.raises(ValueError, match=f"is not a saved model: it has no {missing}"):
        main(tiny_args(tiny_parquet_dir, tmp_path / "out", "--model_name_or_path", str(folder), "--do_eval"))


def test_bad_labels_fail_with_the_documented_error(tmp_path):
    labels = list(range(100))
    labels[7] = 130
    make_parquet_dataset(tmp_path / "data", fine_labels=labels)
    with pytest.raises(ValueError, match="fine_label"):
        main(tiny_args(tmp_path / "data", tmp_path / "out", "--do_train"))


def test_checkpoint_problems_are_detected(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    assert "trainer_state.json" in checkpoint_problem(str(folder))
    (folder / "trainer_state.json").write_text("{}")
    assert "model.safetensors" in checkpoint_problem(str(folder))


def test_time_schedule_factor():
    assert time_schedule_factor(0.0, 0.1) == 0.0 and time_schedule_factor(0.05, 0.1) == pytest.approx(0.5)
    assert time_schedule_factor(0.1, 0.1) == pytest.approx(1.0) and time_schedule_factor(0.55, 0.1) == pytest.approx(
        0.5
    )
    assert time_schedule_factor(1.0, 0.1) == pytest.approx(0.0) and time_schedule_factor(0.5, 0.0) == pytest.approx(0.5)


def test_time_budget_continues_from_the_checkpoint(monkeypatch):
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(monotonic=lambda: 1000.0, time=time.time))  # a still clock
    saved = {"TimeBudgetCallback": {"args": {"minutes": 2.0, "elapsed_seconds": 90.0}, "attributes": {}}}
    resumed = TimeBudgetCallback(2.0)
    resumed.on_train_begin(None, TrainerState(global_step=7, stateful_callbacks=saved), TrainerControl())
    assert 0.75 <= resumed.progress() < 0.8 and resumed.state()["args"]["elapsed_seconds"] >= 90.0
    fresh = TimeBudgetCallback(2.0)
    fresh.on_train_begin(None, TrainerState(global_step=0, stateful_callbacks=saved), TrainerControl())
    assert fresh.progress() < 0.05


def test_schedule_by_time_anneals_by_the_end_of_the_budget(tiny_parquet_dir, tmp_path, monkeypatch):
    """The budget's clock advances 0.1 s each time it is read (about twice a step), so the schedule is the same
    on a quiet and on a loaded machine: about 30 steps in the 6-second budget."""
    clock = iter(0.1 * tick for tick in itertools.count())
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(monotonic=lambda: next(clock), time=time.time))
    output_dir = tmp_path / "out"
    extra = ["--do_train", "--epochs", "1000", "--max_train_minutes", "0.1", "--schedule_by_time"]
    extra += ["--warmup_steps", "0.2", "--eval_strategy", "no", "--save_strategy", "no"]
    extra += ["--lr_fc", "1e-3", "--lr_conv", "1e-3"]
    metrics = main(tiny_args(tiny_parquet_dir, output_dir, *extra))
    state = json.loads((output_dir / "trainer_state.json").read_text())
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert metrics["epoch"] < 1000 and len(rates) > 10  # stopped by the clock, not by the epochs
    assert max(rates) > 0.8e-3 and rates[-1] < 0.25 * max(rates)  # warmed up, then annealed towards 0
    assert rates.index(max(rates)) < len(rates) - 2


# In a fresh process: the bytes glibc maps for one 31 MiB allocation, before and after keep_freed_memory
# (mallinfo2's hblkhd: bytes in mmapped blocks).
MALLOC_PROBE = """
import ctypes, json
from hierarchical.training import run as training_run
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
def mapped_by_malloc():
    before = libc.mallinfo2().hblkhd
    libc.malloc(31 * 2**20)  # kept: freeing a mapped block would raise glibc's threshold by itself
    return libc.mallinfo2().hblkhd - before
default = mapped_by_malloc()
applied = training_run.keep_freed_memory()
print(json.dumps([default, applied, mapped_by_malloc()]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and mallinfo2 are glibc's")
def test_keep_freed_memory_puts_large_blocks_on_the_reused_heap():
    # By default glibc maps a 31 MiB block of its own (given back to the system when freed); after
    # keep_freed_memory the block comes from the heap, which keeps freed memory for reuse.
    completed = subprocess.run(
        [sys.executable, "-c", MALLOC_PROBE], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=HANG_TIMEOUT_S
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    default, applied, kept = json.loads(completed.stdout.splitlines()[-1])
    assert default >= 31 * 2**20 and applied is True and kept == 0
    assert parse_args(["--output_dir", "x"])[2].keep_freed_memory  # on by default


def test_the_training_log_shows_the_data_and_evaluation_info_lines(tiny_parquet_dir, tmp_path, caplog):
    # After the script's logging setup, the INFO lines of the data and evaluation parts reach its log.
    project_logger = logging.getLogger(PROJECT_LOGGER)
    level, verbosity = project_logger.level, transformers.utils.logging.get_verbosity()
    config = small_config()
    labels = np.arange(100) % 100
    fine_to_coarse = np.asarray(config.fine_to_coarse)
    prediction = PredictionOutput(
        predictions=(np.eye(100)[labels] * 3.0, np.eye(20)[fine_to_coarse[labels]] * 3.0),
        label_ids=(labels, fine_to_coarse[labels]),
        metrics={},
    )
    try:
        training_run.setup_logging(TrainingArguments(output_dir=str(tmp_path), report_to=[]))
        prepare_datasets(data_args(tmp_path, tiny_parquet_dir), config, seed=0)
        calibrate_and_select(config, prediction, CalibrationArguments(selective_target_accuracy=0), seed=0)
    finally:
        project_logger.setLevel(level)
        transformers.utils.logging.set_verbosity(verbosity)
    assert "Prepared splits: {'train': " in caplog.text and "Duplicate-image check" in caplog.text
    assert "Calibrated on 100 validation images" in caplog.text


# What HierarchicalTrainer relies on in the Trainer's private parts (see the comments in hierarchical/training/trainer.py): a transformers
# upgrade that changes it fails here, not silently in a run.
PRIVATE_SIGNATURES = {
    "_prepare_inputs": ["self", "inputs"],
    "_save": ["self", "output_dir", "state_dict"],
    "_push_from_checkpoint": ["self", "checkpoint_folder"],
    "_save_checkpoint": ["self", "model", "trial"],
    "_get_grad_norm": ["self", "model", "grad_norm"],
    "_get_output_dir": ["self", "trial"],
}


@pytest.mark.parametrize("name", sorted(PRIVATE_SIGNATURES))
def test_the_trainer_private_methods_overridden_keep_their_signatures(name):
    assert list(inspect.signature(getattr(Trainer, name)).parameters) == PRIVATE_SIGNATURES[name]


class LossOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))

    def forward(self, x, labels=None):
        return {"loss": ((x * self.weight).sum(1) - labels).pow(2).mean()}


def test_the_trainer_keeps_its_running_loss_where_training_step_reads_it(tmp_path):
    # The Trainer sums the step losses in `self._tr_loss` (a tensor, reset at each log) since
    # `self._globalstep_last_logged`, and reads `args.logging_nan_inf_filter` during the loop.
    seen = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append((trainer._tr_loss.detach().clone(), trainer._globalstep_last_logged, state.global_step))

    data = [{"x": torch.tensor([1.0, 2.0]), "labels": torch.tensor(1.0)} for _ in range(8)]
    arguments = TrainingArguments(
        str(tmp_path), max_steps=3, per_device_train_batch_size=2, logging_steps=2, learning_rate=0.0,
        report_to=[], save_strategy="no", use_cpu=True,
    )  # fmt: skip
    trainer = Trainer(LossOnly(), arguments, train_dataset=data, callbacks=[Spy()])
    trainer.train()
    # loss (1 + 2 - 1)^2 = 4 each step (learning rate 0): 4 after step 1, 8 after step 2 (read and reset by the log
    # at step 2, after the callbacks), then 4 again after step 3 (last logged at step 2)
    assert [(float(loss), last, step) for loss, last, step in seen] == [(4.0, 0, 1), (8.0, 0, 2), (4.0, 2, 3)]
    assert "logging_nan_inf_filter" in inspect.getsource(Trainer)
