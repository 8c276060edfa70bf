"""The command line of run_classification.py as a new user meets it: evaluation-only runs, schedules changed one at
a time, typos, and what the log and the output folder say about the run."""

import json
import logging
import os
import subprocess
import sys

import pytest
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from conftest import HANG_TIMEOUT_S, PROJECT_DIR, make_parquet_dataset, small_config, tiny_args
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification, build_image_processor
from run_classification import main, parse_args


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A freshly initialised 32 px model saved as a model folder (weights, config, image processor)."""
    folder = tmp_path_factory.mktemp("saved") / "model"
    config = small_config()
    HierarchicalEfficientNetV2ForImageClassification(config).save_pretrained(folder)
    build_image_processor(config).save_pretrained(folder)
    return folder


def test_evaluation_only_options_need_no_training_settings(tmp_path):
    _, _, args = parse_args(["--output_dir", str(tmp_path), "--model_name_or_path", "x", "--do_predict"])
    assert not args.do_eval, "the default evaluation schedule must not turn on --do_eval without training"
    assert args.eval_strategy == IntervalStrategy.NO and args.save_strategy == SaveStrategy.NO
    assert not args.load_best_model_at_end
    _, _, args = parse_args(["--output_dir", str(tmp_path), "--do_train"])
    assert args.eval_strategy == IntervalStrategy.EPOCH and args.do_eval  # training keeps its schedule


def test_evaluating_a_saved_model_on_a_folder_with_only_a_test_split(saved_model, tmp_path):
    make_parquet_dataset(tmp_path / "data", rows_per_class=1, split="test")
    output_dir = tmp_path / "eval"
    argv = ["--model_name_or_path", str(saved_model), "--do_predict", "--output_dir", str(output_dir)]
    metrics = main(argv + ["--dataset_name", str(tmp_path / "data"), "--report_to", "none"])
    assert metrics["test_num_samples"] == 100 and "eval_num_samples" not in metrics
    assert (output_dir / "test_results.json").is_file() and not list(output_dir.glob("checkpoint-*"))
    card = (output_dir / "README.md").read_text()
    assert "did not train the model" in card


@pytest.mark.parametrize(
    ("extra", "expected", "warning"),
    [
        (["--save_strategy", "steps", "--save_steps", "500"], ("steps", 500, "steps", 500, True), "evaluating on"),
        (["--eval_strategy", "steps", "--eval_steps", "100"], ("steps", 100, "steps", 100, True), "saving checkpoints"),
        (["--eval_strategy", "steps"], ("steps", 50, "steps", 50, True), "saving checkpoints"),  # logging_steps 50
        (["--save_strategy", "no"], ("epoch", None, "no", 500, False), None),
        (
            ["--eval_strategy", "steps", "--eval_steps", "100", "--save_strategy", "steps", "--save_steps", "250"],
            ("steps", 100, "steps", 250, False),
            "--save_steps 250 is not a multiple of --eval_steps 100",
        ),
        (["--save_strategy", "best"], ("epoch", None, "best", 500, True), None),
    ],
)
def test_changing_one_schedule_keeps_the_run_valid(tmp_path, caplog, extra, expected, warning):
    with caplog.at_level(logging.WARNING):
        _, _, args = parse_args(["--output_dir", str(tmp_path), "--do_train", *extra])
    got = (args.eval_strategy.value, args.eval_steps, args.save_strategy.value, args.save_steps)
    assert got + (args.load_best_model_at_end,) == expected
    if warning is not None:
        assert warning in caplog.text


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        (["--epoch", "3"], "--epoch (did you mean --epochs"),
        (["--max_train_sample", "10"], "--max_train_sample (did you mean --max_train_samples"),
        (["--no_such_option"], "unknown options: --no_such_option"),
    ],
)
def test_unknown_or_abbreviated_options_are_errors(tmp_path, typo, suggestion):
    with pytest.raises(ValueError, match="unknown options") as raised:
        parse_args(["--output_dir", str(tmp_path), "--do_train", *typo])
    assert suggestion in str(raised.value)


@pytest.mark.slow
def test_log_opens_with_a_summary_and_the_options_go_to_a_file(tiny_parquet_dir, tmp_path):
    """A run with its output redirected (not a terminal), progress bars left at their default."""
    output_dir = tmp_path / "out"
    argv = [a for a in tiny_args(tiny_parquet_dir, output_dir, "--do_train", "--do_eval") if a != "--disable_tqdm"]
    argv.remove("true")  # the value of --disable_tqdm
    command = [sys.executable, str(PROJECT_DIR / "run_classification.py"), *argv, "--lr_conv", "0.0002"]
    command += ["--max_train_samples", "32"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]

    assert "\x1b[A" not in log and "\r" not in log, "no cursor movements or progress redraws in a redirected log"
    assert "Training options {" not in log and '"adam_beta1"' not in log, "the options go to a file, not the log"
    summary = log[log.index("Run summary") :].splitlines()[1:12]
    fields = [line.split(":")[0].strip() for line in summary]
    for field in ("model", "data", "image size", "batch", "learning rates", "epochs", "devices", "output folder"):
        assert field in fields, (field, summary)
    text = "\n".join(summary)
    assert "train 32, validation 20, test 30 images" in text and "32 px" in text and "backbone 0.0002" in text
    assert f"output folder:  {output_dir}" in text and "resume from:    nothing" in text
    assert log.index("Run summary") < log.index("Running training")
    repeated = [line for line in log.splitlines() if "datasets" in line and log.count(line) > 1]
    assert not repeated, repeated

    options = json.loads((output_dir / "run_options.json").read_text())
    assert options["lr_conv"] == 0.0002 and options["dataset_name"] == str(tiny_parquet_dir)
    assert options["lr_scheduler_type"] == "cosine" and options["image_size"] == 32


def test_predicting_only_reads_no_training_split_and_copies_no_weights(saved_model, tmp_path):
    data = tmp_path / "data"
    make_parquet_dataset(data, rows_per_class=1, split="test")
    (data / "train-00000-of-00001.parquet").write_bytes(b"not a parquet file")  # read, it would fail the run
    output_dir = tmp_path / "eval"
    argv = ["--model_name_or_path", str(saved_model), "--do_predict", "--output_dir", str(output_dir)]
    metrics = main(argv + ["--dataset_name", str(data), "--max_predict_samples", "20", "--report_to", "none"])
    assert metrics["test_num_samples"] == 20
    assert not list(output_dir.glob("*.safetensors")) and not (output_dir / "config.json").exists()
    assert (output_dir / "reports" / "test" / "eval_report.md").is_file()
