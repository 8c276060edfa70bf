"""No silent wrong results from run_classification.py: bad options, diverging training, incomplete model folders,
checkpoint state that lies, concurrent and repeated runs, multi-process evaluation, late failures."""

import functools
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerControl, TrainerState

from configuration_hierarchical import HierarchicalEfficientNetV2Config
from conftest import HANG_TIMEOUT_S, METRIC_NAMES, PROJECT_DIR, small_config, tiny_args
from hierarchical.training.arguments import ModelArguments
from hierarchical.training.callbacks import NonFiniteTrainingError, ResumeCheckCallback
from hierarchical.training.checkpoints import LOCK_FILE, checkpoint_problem, output_dir_lock, resolve_checkpoint
from hierarchical.training.model_loading import load_model
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification
from run_classification import main, parse_args

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def fresh_model() -> HierarchicalEfficientNetV2ForImageClassification:
    return HierarchicalEfficientNetV2ForImageClassification(small_config())


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def stepped_args(data: Path, output_dir: Path, *extra: str) -> list[str]:
    """4 steps in one epoch; evaluation and a checkpoint every 2 steps."""
    return tiny_args(data, output_dir, "--do_train", "--do_eval", *extra) + [
        "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tiny_parquet_dir, tmp_path_factory) -> Path:
    """A finished run with checkpoints 2 and 4."""
    output_dir = tmp_path_factory.mktemp("finished") / "out"
    main(stepped_args(tiny_parquet_dir, output_dir))
    return output_dir


# 3. NaN and infinity in options; a diverging run
@pytest.mark.parametrize(
    "option",
    ["epochs", "coarse_loss_weight", "lr_conv", "lr_fc", "max_train_minutes", "ema_decay", "layer_decay",
     "warmup_steps", "max_grad_norm", "weight_decay", "dropout", "drop_path_rate", "label_smoothing", "adam_beta1"],
)  # fmt: skip
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_options_are_refused_naming_the_option(option, value):
    with pytest.raises(ValueError, match=f"{option}.*{value}"):
        parse_args(["--output_dir", "x", "--do_train", f"--{option}", value])


@pytest.mark.parametrize("field", ["coarse_loss_weight", "dropout", "drop_path_rate", "label_smoothing"])
def test_config_refuses_non_finite_values(field):
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=field):
            HierarchicalEfficientNetV2Config(backbone_weights=None, **{field: value})


@pytest.mark.parametrize("extra", [[], ["--logging_nan_inf_filter", "true"]], ids=["loss", "weights"])
def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tiny_parquet_dir, tmp_path, monkeypatch, extra):
    """From the third training step on the loss is NaN: the run stops with an error naming the step (from the logged
    loss, or, with the loss filtered out of the logs, from the weights at the next checkpoint), saves no model and
    no results, and checkpoint-2 stays the newest."""
    original = HierarchicalEfficientNetV2ForImageClassification.forward
    calls = []

    @functools.wraps(original)  # the Trainer reads the signature
    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) >= 3:
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(HierarchicalEfficientNetV2ForImageClassification, "forward", forward)
    output_dir = tmp_path / "out"
    args = tiny_args(tiny_parquet_dir, output_dir, "--do_train", "--eval_strategy", "no", *extra)
    with pytest.raises(NonFiniteTrainingError, match="at step (3|4).*checkpoint-2, is kept") as error:
        main(args + ["--save_strategy", "steps", "--save_steps", "2"])
    print(error.value)
    assert (output_dir / "checkpoint-2").is_dir() and not (output_dir / "checkpoint-4").exists()
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / "train_results.json").exists()
    assert checkpoint_problem(str(output_dir / "checkpoint-2")) is None


# 4 and 12. A model folder that lacks tensors, holds others, or is truncated
@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "truncated"])
def test_incomplete_model_folders_are_refused(tmp_path, case):
    folder = tmp_path / "model"
    fresh_model().save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    if case == "missing":
        weights = {k: v for k, v in weights.items() if not k.startswith("features.7.")}
    elif case == "unexpected":
        weights["extra_head.weight"] = torch.zeros(3)
    elif case == "shape":
        weights["fine_classifier.bias"] = torch.zeros(50)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    if case == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    message = {
        "missing": "missing from the weights file.*features.7.0.weight.*--allow_missing_weights",
        "unexpected": "unexpected tensors.*extra_head.weight",
        "shape": "fine_classifier.bias",
        "truncated": "model.safetensors is missing, truncated.*copy the model folder again",
    }[case]
    model_args = ModelArguments(model_name_or_path=str(folder), backbone_weights="none")
    with pytest.raises(ValueError, match=message) as error:
        load_model(model_args)
    print(error.value)
    if case in ("missing", "unexpected"):
        model_args.allow_missing_weights = True
        model = load_model(model_args)
        state = model.state_dict()
        assert all(value.isfinite().all() for value in state.values() if value.is_floating_point())
        if case == "missing":  # the tensors the file lacks are freshly initialised, not left as memory held them
            fresh = fresh_model().state_dict()
            weight = state["features.7.0.weight"]
            assert weight.std() > 0 and weight.std() == pytest.approx(fresh["features.7.0.weight"].std(), rel=0.5)


# 6, 12 and 14. Checkpoint state that lies, files that are not what they claim, leftovers
def break_checkpoint(folder: Path, case: str) -> None:
    state_file = folder / "trainer_state.json"
    state = json.loads(state_file.read_text())
    if case == "null_state":
        state_file.write_text("null")
    elif case == "global_step":
        state_file.write_text(json.dumps({**state, "global_step": 99}))
    elif case == "best_metric":
        state_file.write_text(json.dumps({**state, "best_metric": 1.0}))
    elif case == "rng_keys":
        torch.save({"python": 1}, folder / "rng_state.pth")
    elif case == "scheduler_keys":
        torch.save({"something": torch.zeros(1)}, folder / "scheduler.pt")
    elif case == "malicious_optimizer":
        with zipfile.ZipFile(folder / "optimizer.pt", "w") as archive:  # torch.save's layout, a pickle calling eval
            archive.writestr("archive/data.pkl", pickle.dumps(eval_payload()))
    elif case == "weights_shape":
        weights = load_file(folder / "model.safetensors")
        weights["fine_classifier.weight"] = weights["fine_classifier.weight"][:, :10].contiguous()
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


class eval_payload:  # noqa: N801  (pickles as a call of eval)
    def __reduce__(self):
        return (eval, ("1 + 1",))


BROKEN = {
    "null_state": "not a JSON object",
    "global_step": "global_step 99 but the folder is checkpoint-4",
    "best_metric": "best eval_fine_accuracy is 1.0",
    "rng_keys": "rng_state.pth lacks numpy, cpu",
    "scheduler_keys": "scheduler.pt lacks last_epoch",
    "malicious_optimizer": "optimizer.pt is missing, truncated or unsafe to load",
    "weights_shape": "model.safetensors holds tensors of another shape",
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_lying_checkpoints_are_moved_aside_and_the_previous_one_used(
    finished_run, tiny_parquet_dir, tmp_path, case, caplog
):
    output_dir = tmp_path / "out"
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(finished_run / name, output_dir / name)
    assert checkpoint_problem(str(output_dir / "checkpoint-4"), False, None, "fine_accuracy") is None
    break_checkpoint(output_dir / "checkpoint-4", case)
    training_args = parse_args(stepped_args(tiny_parquet_dir, output_dir))[2]
    assert resolve_checkpoint(training_args, fresh_model()) == str(output_dir / "checkpoint-2")
    assert f"Checkpoint {output_dir / 'checkpoint-4'} is incomplete" in caplog.text
    assert BROKEN[case] in caplog.text, caplog.text
    assert len(list(output_dir.glob("incomplete-checkpoint-4-*"))) == 1, "moved aside, not deleted"


def test_leftover_files_do_not_make_a_checkpoint_incomplete(finished_run, tmp_path):
    folder = tmp_path / "checkpoint-4"
    shutil.copytree(finished_run / "checkpoint-4", folder)
    for name in ("rng_state.pth.tmp", "model.safetensors.partial", ".nfs000123"):
        (folder / name).write_bytes(b"\0" * 10)
    assert checkpoint_problem(str(folder), False, shapes_of(fresh_model()), "fine_accuracy") is None


def test_a_resumed_state_beyond_the_run_is_refused_and_one_at_its_end_is_finished():
    callback = ResumeCheckCallback()
    with pytest.raises(ValueError, match="step 99, beyond this run's 8 steps"):
        callback.on_train_begin(None, TrainerState(global_step=99, max_steps=8), TrainerControl())
    callback.on_train_begin(None, TrainerState(global_step=8, max_steps=8), TrainerControl())
    assert callback.finished_at == 8
    callback.on_train_begin(None, TrainerState(global_step=0, max_steps=8), TrainerControl())
    assert callback.finished_at is None


# 8. A finished run re-run
def test_rerunning_a_finished_run_keeps_its_results(finished_run, tiny_parquet_dir, tmp_path, caplog):
    output_dir = tmp_path / "out"
    shutil.copytree(finished_run, output_dir)
    before = json.loads((output_dir / "train_results.json").read_text())
    assert before["train_loss"] > 0
    main(stepped_args(tiny_parquet_dir, output_dir))
    assert "Training already finished at step 4: nothing to do" in caplog.text
    assert json.loads((output_dir / "train_results.json").read_text()) == before
    assert json.loads((output_dir / "all_results.json").read_text())["train_loss"] == before["train_loss"]
    summaries = [
        e for e in json.loads((output_dir / "trainer_state.json").read_text())["log_history"] if "train_loss" in e
    ]
    assert [e["train_loss"] for e in summaries] == [before["train_loss"]]


# 7. Two runs into one output folder
def test_a_second_run_into_a_busy_output_dir_is_refused(tiny_parquet_dir, tmp_path):
    output_dir = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hierarchical.training.checkpoints import output_dir_lock\n"
         f"with output_dir_lock({str(output_dir)!r}):\n    print('held', flush=True); time.sleep(600)"],
        cwd=PROJECT_DIR, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {holder.pid} on "):
            main(tiny_args(tiny_parquet_dir, output_dir, "--do_train"))
    finally:
        holder.kill()  # SIGKILL: the system releases the lock, the file stays behind
        holder.wait()
    assert (output_dir / LOCK_FILE).is_file()
    with output_dir_lock(str(output_dir)):  # the stale file of a dead run does not block
        assert f"pid {os.getpid()}" in (output_dir / LOCK_FILE).read_text()


def test_the_lock_is_released_when_the_run_fails(tiny_parquet_dir, tmp_path):
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match="nothing to do"):
        main(tiny_args(tiny_parquet_dir, output_dir, "--eval_strategy", "no"))
    assert not (output_dir / LOCK_FILE).exists()
    with output_dir_lock(str(output_dir)):
        pass


# 13. Late failures checked first
def test_unwritable_output_dir_fails_before_any_work(tiny_parquet_dir, tmp_path):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    with pytest.raises(ValueError, match="file.txt/sub' cannot be written"):
        main(tiny_args(tiny_parquet_dir, tmp_path / "file.txt" / "sub", "--do_train"))


def test_an_impossible_batch_size_is_refused_before_any_work(tiny_parquet_dir, tmp_path):
    with pytest.raises(ValueError, match="--batch_size 100000000 cannot fit"):
        main(tiny_args(tiny_parquet_dir, tmp_path / "out", "--do_train", "--batch_size", "100000000"))
    assert not (tmp_path / "out").exists()


# 9. Two-process evaluation agrees with itself
@pytest.mark.slow
def test_two_process_epoch_end_and_final_evaluations_agree(tiny_parquet_dir, tmp_path):
    """19 validation images (odd: the sampler pads), weight averaging on: the evaluation at the end of the epoch and
    the final one evaluate the same weights and must give the same metrics."""
    output_dir = tmp_path / "out"
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(PROJECT_DIR), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    command += [str(PROJECT_DIR / "run_classification.py")]
    command += tiny_args(tiny_parquet_dir, output_dir, "--do_train", "--do_eval", "--max_eval_samples", "19")
    command += ["--ema_decay", "0.5", "--save_total_limit", "1"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    final = json.loads((output_dir / "eval_results.json").read_text())
    state = json.loads((output_dir / "trainer_state.json").read_text())
    epoch_end = [entry for entry in state["log_history"] if "eval_fine_accuracy" in entry][-1]
    assert epoch_end["step"] == state["global_step"] == 2
    for name in sorted(METRIC_NAMES | {"loss", "num_samples"}):
        assert final[f"eval_{name}"] == pytest.approx(epoch_end[f"eval_{name}"], abs=1e-6), name
