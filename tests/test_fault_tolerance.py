"""Crash-safe resume, broken checkpoints and multi-process training of run_classification.py."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import HANG_TIMEOUT_S, METRIC_NAMES, PROJECT_DIR, tiny_args
from hierarchical.training.callbacks import EMA_FILE
from run_classification import main

SCRIPT = str(PROJECT_DIR / "run_classification.py")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def checkpoint_args(data: Path, output_dir: Path, epochs: int = 3) -> list[str]:
    """12 steps in 3 epochs of 4, a checkpoint (and evaluation) every 3 steps, so most fall inside an epoch;
    the weight average is on, so resuming must restore it too."""
    return tiny_args(data, output_dir, "--do_train", "--do_eval", "--seed", "7", "--ema_decay", "0.9") + [
        "--epochs", str(epochs), "--save_strategy", "steps", "--save_steps", "3", "--eval_strategy", "steps",
        "--eval_steps", "3", "--save_total_limit", "2",
    ]  # fmt: skip


PAUSE_SITECUSTOMIZE = """
import os
if os.environ.get("PAUSE_BEFORE"):
    import time
    from transformers.trainer_callback import TrainerState

    _save_to_json = TrainerState.save_to_json

    def save_to_json(self, json_path):
        if json_path.endswith(os.environ["PAUSE_BEFORE"]):
            open(os.environ["PAUSE_MARKER"], "w").close()
            time.sleep(600)  # until killed
        _save_to_json(self, json_path)

    TrainerState.save_to_json = save_to_json
"""


def final_state(output_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(output_dir / "model.safetensors"), json.loads((output_dir / "eval_results.json").read_text())


@pytest.mark.slow
def test_sigkill_then_same_command_matches_an_uninterrupted_run(tiny_parquet_dir, tmp_path):
    env = {**os.environ, **OFFLINE}
    reference = tmp_path / "reference"
    done = subprocess.run(
        [sys.executable, SCRIPT, *checkpoint_args(tiny_parquet_dir, reference)],
        env=env,
        cwd=tmp_path,
        timeout=HANG_TIMEOUT_S,
    )
    assert done.returncode == 0

    # Killed inside the save of checkpoint-6, after every file but trainer_state.json (written last): an event, not a
    # moment, so the test means the same on a quiet and on a loaded machine.
    crashed = tmp_path / "crashed"
    (tmp_path / "pause").mkdir()
    (tmp_path / "pause" / "sitecustomize.py").write_text(PAUSE_SITECUSTOMIZE)
    marker = tmp_path / "paused"
    paused_env = {
        **env,
        "PYTHONPATH": str(tmp_path / "pause"),
        "PAUSE_BEFORE": os.path.join("checkpoint-6", "trainer_state.json"),
        "PAUSE_MARKER": str(marker),
    }
    command = [sys.executable, SCRIPT, *checkpoint_args(tiny_parquet_dir, crashed)]
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command, env=paused_env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + HANG_TIMEOUT_S  # only stops a hung run
        while not marker.exists():
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run neither reached checkpoint-6 nor ended"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert (crashed / "checkpoint-6" / "model.safetensors").is_file()
    assert (crashed / "checkpoint-6" / EMA_FILE).is_file(), "the weight average is written before the state"

    rerun = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Checkpoint {crashed / 'checkpoint-6'} is incomplete" in rerun.stdout + rerun.stderr
    assert f"continuing from the last complete one, {crashed / 'checkpoint-3'}" in rerun.stdout + rerun.stderr

    weights, metrics = final_state(crashed)
    reference_weights, reference_metrics = final_state(reference)
    assert weights.keys() == reference_weights.keys()
    for name, value in reference_weights.items():
        assert torch.equal(weights[name], value), f"{name} differs after the resumed run"
    for name in METRIC_NAMES:
        assert metrics[f"eval_{name}"] == reference_metrics[f"eval_{name}"], name
    state = json.loads((crashed / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    assert state["best_model_checkpoint"] == json.loads((reference / "trainer_state.json").read_text())[
        "best_model_checkpoint"
    ].replace(str(reference), str(crashed))
    assert len(list(crashed.glob("checkpoint-*"))) <= 3  # save_total_limit 2, plus the best one


@pytest.mark.slow
def test_broken_checkpoints_are_skipped_and_kept(tiny_parquet_dir, tmp_path, caplog):
    output_dir = tmp_path / "out"
    main(checkpoint_args(tiny_parquet_dir, output_dir, epochs=2))  # checkpoints 6 and 8 remain (limit 2 + best)
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    newest = checkpoints[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated by a crash

    main(checkpoint_args(tiny_parquet_dir, output_dir, epochs=3))
    assert f"Checkpoint {newest} is incomplete" in caplog.text
    assert f"continuing from the last complete one, {checkpoints[-2]}" in caplog.text
    aside = list(output_dir.glob(f"incomplete-{newest.name}-*"))
    assert len(aside) == 1 and (aside[0] / "model.safetensors").stat().st_size == 1000, "the broken one is kept"
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 12

    for checkpoint in output_dir.glob("checkpoint-*"):
        (checkpoint / "optimizer.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="holds checkpoints but none is complete.*--restart_from_scratch"):
        main(checkpoint_args(tiny_parquet_dir, output_dir, epochs=4))  # more epochs: not the finished run
    assert len(list(output_dir.glob("incomplete-*"))) >= 3, "nothing deleted"


def test_explicit_resume_from_a_broken_checkpoint_is_refused(tiny_parquet_dir, tmp_path):
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text('{"global_step": 5')
    with pytest.raises(ValueError, match="cannot resume from .*trainer_state.json is missing or truncated"):
        main(tiny_args(tiny_parquet_dir, tmp_path / "out", "--do_train", "--checkpoint_path", str(checkpoint)))


SITECUSTOMIZE = """
import os, sys
_out, _log = os.environ.get("AUDIT_OUTPUT_DIR"), os.environ.get("AUDIT_LOG")
if _out and _log:
    _log = f"{_log}.rank{os.environ.get('RANK', '0')}"
    _write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _record(event, path):
        path = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        if os.path.abspath(path).startswith(_out):
            with open(_log, "a") as log:
                log.write(f"{event} {path}\\n")

    def _hook(event, args):
        if event == "open" and args:
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & _write_flags
            ):
                _record(event, args[0])
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.move"):
            _record(event, args[0])

    sys.addaudithook(_hook)
"""


@pytest.mark.slow
def test_two_process_training_on_cpu(tiny_parquet_dir, tmp_path):
    """DDP with gloo: trains, only rank 0 writes the output folder, evaluation counts every example once and
    matches a single-process evaluation of the saved model."""
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    output_dir = tmp_path / "out"
    env = {
        **os.environ,
        **OFFLINE,
        "PYTHONPATH": f"{tmp_path / 'audit'}{os.pathsep}{PROJECT_DIR}",
        "AUDIT_OUTPUT_DIR": str(output_dir),
        "AUDIT_LOG": str(tmp_path / "writes"),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    command += [SCRIPT, *tiny_args(tiny_parquet_dir, output_dir, "--do_train", "--do_eval", "--max_eval_samples", "19")]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    rank0 = (tmp_path / "writes.rank0").read_text()
    assert "config.json" in rank0 and "eval_results.json" in rank0 and "checkpoint-2" in rank0
    # rank 1 writes nothing but its own RNG state into each checkpoint (rng_state_1.pth, needed for exact resume)
    rank1 = (tmp_path / "writes.rank1").read_text().splitlines() if (tmp_path / "writes.rank1").exists() else []
    assert all(re.fullmatch(rf"os.mkdir {re.escape(str(output_dir))}(/checkpoint-\d+)?", line) for line in rank1), rank1
    assert (output_dir / "checkpoint-2" / "rng_state_1.pth").is_file()

    distributed = json.loads((output_dir / "eval_results.json").read_text())
    assert distributed["eval_num_samples"] == 19, "padded duplicates from the distributed sampler were counted"
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2, "64 images, 16 per device on 2 processes: 2 steps"

    single = main(
        tiny_args(tiny_parquet_dir, tmp_path / "single", "--do_eval", "--max_eval_samples", "19")
        + ["--model_name_or_path", str(output_dir)]
    )
    for name in METRIC_NAMES | {"num_samples"}:
        assert single[f"eval_{name}"] == pytest.approx(distributed[f"eval_{name}"], abs=1e-6), name
