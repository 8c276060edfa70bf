"""The commands as a user types them: recipes adjusted on the command line, errors that end in one line, Ctrl-C,
a finished run started again."""

import json
import logging
import shlex
from functools import partial
from pathlib import Path

import pytest
from transformers import TrainerCallback, TrainerControl, TrainerState

import eval_report
import run_classification
from conftest import PROJECT_DIR, make_parquet_dataset, run_script, small_config, tiny_args
from hierarchical.options import DEBUG_ENVIRONMENT_VARIABLE, PROJECT_LOGGER, run_command
from hierarchical.training import remote_resources
from hierarchical.training import run as training_run
from hierarchical.training.callbacks import PROGRESS_INTERVAL_S, TimedProgressCallback, progress_line
from hierarchical.training.remote_resources import needed_resources
from hierarchical.training.run_summary import run_summary, write_run_options
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification
from run_classification import build_parser, cli, parse_args

RECIPE = PROJECT_DIR / "recipes" / "cpu_32px_30min.json"


def test_options_after_a_recipe_override_it():
    recipe = json.loads(RECIPE.read_text())
    model_args, data_args, training_args = parse_args(
        [str(RECIPE), "--dataset_name", "mine", "--output_dir", "outputs/mine", "--do_predict", "false"]
    )
    assert data_args.dataset_name == "mine" and training_args.output_dir == "outputs/mine"
    assert not training_args.do_predict
    # everything else comes from the recipe
    assert model_args.image_size == recipe["image_size"] and training_args.lr_fc == recipe["lr_fc"]
    assert training_args.num_train_epochs == recipe["epochs"] and training_args.schedule_by_time


@pytest.mark.parametrize(
    "override, field, value",
    [
        (["--num_train_epochs", "3"], "num_train_epochs", 3.0),  # the recipe says "epochs"
        (["--epochs=2"], "num_train_epochs", 2.0),
        (["--per_device_train_batch_size", "8"], "per_device_train_batch_size", 8),  # the recipe says "batch_size"
    ],
)
def test_an_option_overrides_the_recipes_value_of_its_alias(override, field, value):
    _, _, training_args = parse_args([str(RECIPE), *override])
    assert getattr(training_args, field) == value


def test_the_offline_hint_for_a_recipe_user_is_a_command_that_works(tmp_path):
    (resource,) = needed_resources("uoft-cs/cifar100")
    suggested = resource.instead[resource.instead.index("--dataset_name") :].split(" (")[0]
    assert "after the recipe" in resource.instead
    _, data_args, _ = parse_args([str(RECIPE), *shlex.split(suggested)])
    assert data_args.dataset_name == "cifar100-local"


def test_help_says_how_to_adjust_a_recipe():
    text = build_parser().format_help()
    assert "[RECIPE.json]" in text and "options after it override it" in text


def test_the_readme_adjusts_a_recipe_on_the_command_line():
    readme = (PROJECT_DIR / "README.md").read_text()
    command = "python run_classification.py recipes/cpu_32px_30min.json --dataset_name"
    assert command in readme
    line = next(line for line in readme.splitlines() if line.startswith(command))
    argv = shlex.split(line)[2:]
    _, data_args, training_args = parse_args(argv)
    assert data_args.dataset_name == argv[argv.index("--dataset_name") + 1]
    assert Path(training_args.output_dir) == Path(argv[argv.index("--output_dir") + 1])


# Errors a user reads: one line, exit status 2; tracebacks for bugs


@pytest.fixture(scope="module")
def train_only_data(tmp_path_factory):
    """A parquet file with a train split only."""
    return make_parquet_dataset(tmp_path_factory.mktemp("train-only"), rows_per_class=1, split="train")


def command_result(capsys, command, *args):
    """(exit status, stderr) of a command-line entry point."""
    with pytest.raises(SystemExit) as exited:
        command(*args)
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image_size", "x"], "argument --image_size/--image-size: invalid int value: 'x'"),
        (["--epoch", "3"], "unknown options: --epoch (did you mean --epochs?); `--help`"),  # its value is not named
        (["--learning_rate", "0.001"], "--learning_rate 0.001 is not used"),  # equal to --lr_fc, refused all the same
        (
            ["--do_predict"],
            "--do_predict needs a test split: the data '{data}' has the splits ['train'], none named "
            "'test'; pass --test_split_name with one of them",
        ),  # fmt: skip
        (
            ["--train_val_split", "0", "--do_eval", "false"],
            "evaluating during training (--eval_strategy epoch) needs a validation split: the data '{data}' has the "
            "splits ['train'], none named 'validation'; pass --validation_split_name with one of them, or "
            "--train_val_split > 0 to carve one from the training split, or --eval_strategy no to train without "
            "evaluating",
        ),  # --do_train evaluates every epoch whatever --do_eval says: the fix is named
        (["--image_column_name", "picture"], "picture"),
        (["--hierarchy_file", "missing.csv"], "missing.csv"),
    ],
)
def test_a_user_error_is_one_line_with_exit_status_2(train_only_data, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.delenv(DEBUG_ENVIRONMENT_VARIABLE, raising=False)
    output_dir = tmp_path / "out"
    status, stderr = command_result(capsys, cli, tiny_args(train_only_data, output_dir, "--do_train", *extra))
    assert status == 2
    assert stderr.startswith("error: ") and message.format(data=train_only_data) in stderr, stderr
    assert "Traceback" not in stderr
    if "--do_predict" in extra or "--train_val_split" in extra:
        assert not output_dir.exists(), "the output folder was made before the splits were checked"


def test_the_debug_variable_keeps_the_traceback_and_bugs_keep_theirs(train_only_data, tmp_path, monkeypatch):
    argv = tiny_args(train_only_data, tmp_path / "out", "--do_train", "--do_predict")
    monkeypatch.setenv(DEBUG_ENVIRONMENT_VARIABLE, "1")
    with pytest.raises(ValueError, match="--do_predict needs a test split"):
        cli(argv)
    monkeypatch.delenv(DEBUG_ENVIRONMENT_VARIABLE)

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(training_run, "load_raw_datasets", bug)
    with pytest.raises(KeyError, match="a bug"):
        cli(argv)


def test_eval_report_ends_a_user_error_with_one_line(train_only_data, saved_model_dir, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENVIRONMENT_VARIABLE, raising=False)
    argv = [str(saved_model_dir), "--dataset_name", str(train_only_data), "--split", "test"]
    status, stderr = command_result(capsys, run_command, partial(eval_report.main, argv))
    assert status == 2 and stderr.startswith("error: ") and "'test'" in stderr and "Traceback" not in stderr


def test_push_to_hub_is_checked_with_the_other_downloads_before_any_work(train_only_data, tmp_path, monkeypatch):
    monkeypatch.setattr(remote_resources, "hub_reachable", lambda: False)
    monkeypatch.setattr(training_run, "load_raw_datasets", lambda *args: pytest.fail("data loaded"))
    argv = tiny_args(train_only_data, tmp_path / "out", "--do_train", "--push_to_hub", "--hub_model_id", "me/model")
    with pytest.raises(FileNotFoundError, match=r"--push_to_hub\): leave out --push_to_hub"):
        run_classification.main(argv)
    assert not (tmp_path / "out").exists()


def test_the_summary_says_that_do_train_also_evaluates_and_calibrates(tmp_path):
    model_args, _, training_args = parse_args(["--output_dir", str(tmp_path), "--do_train"])
    model = HierarchicalEfficientNetV2ForImageClassification(small_config())
    summary = run_summary(model, None, "data", {"train": 8, "validation": 2}, training_args, None, calibrate=True)
    tasks = next(line for line in summary.splitlines() if "tasks:" in line)
    assert "evaluate on the validation split (--eval_strategy epoch; --eval_strategy no skips it)" in tasks
    assert "calibrate on it (temperatures, selective threshold; --no_calibrate skips it)" in tasks


class InterruptAt(TrainerCallback):
    """Ctrl-C during the given step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_ctrl_c_names_the_last_complete_checkpoint(tiny_parquet_dir, tmp_path, capsys):
    output_dir = tmp_path / "out"
    argv = tiny_args(tiny_parquet_dir, output_dir, "--do_train", "--eval_strategy", "no", "--save_strategy", "steps",
                     "--save_steps", "2", "--max_train_samples", "16", "--batch_size", "4")  # fmt: skip
    status, stderr = command_result(capsys, cli, argv, [InterruptAt(3)])
    assert status == 130
    assert stderr.strip() == (
        f"interrupted: the last complete checkpoint is {output_dir / 'checkpoint-2'}; the same command resumes from it"
    )


def test_a_finished_run_started_again_says_nothing_to_do_and_writes_nothing(tmp_path, caplog, monkeypatch):
    output_dir = tmp_path / "out"
    argv = tiny_args(tmp_path / "data", output_dir, "--do_train", "--do_eval")
    write_run_options(str(output_dir), *parse_args(argv))
    metrics = {"train_loss": 4.6, "eval_fine_accuracy": 0.02}
    for name in ("train_results.json", "eval_results.json", "all_results.json"):
        (output_dir / name).write_text(json.dumps(metrics))
    (output_dir / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    written = {path: path.stat().st_mtime_ns for path in output_dir.rglob("*")}

    def started(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(training_run, "check_remote_resources", started)  # nothing else is done

    with caplog.at_level(logging.INFO):
        assert run_classification.main(argv) == metrics

    first = [record for record in caplog.records if record.name.startswith("hierarchical")][0].getMessage()
    assert first.startswith("Training already finished at step 4: nothing to do;") and str(output_dir) in first
    assert {path: path.stat().st_mtime_ns for path in output_dir.rglob("*")} == written
    (output_dir / "eval_results.json").unlink()  # a run stopped before its evaluation is not finished
    with pytest.raises(AssertionError, match="the run started"):
        run_classification.main(argv)


# --help and progress in a log file


def help_entries(text: str) -> dict[str, str]:
    """`{first option string: its help text}` of an argparse help page."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            current = stripped.split()[0].rstrip(",")
            entries[current] = stripped.split("  ", 1)[1].strip() if "  " in stripped else ""
        elif current and line.startswith(" " * 6) and stripped:
            entries[current] = f"{entries[current]} {stripped}".strip()
        else:
            current = None
    return entries


def test_help_lists_the_projects_options_first_each_default_once_and_no_negation_copies():
    text = build_parser().format_help()
    titles = ["model and calibration:", "data:", "training:", "Trainer options (transformers TrainingArguments"]
    positions = [text.index(f"\n{title}") for title in titles]
    assert positions == sorted(positions)
    assert positions[2] < text.index("--lr_conv") < positions[3] < text.index("--per_device_train_batch_size")
    entries = help_entries(text)
    assert not [option for option in entries if option.startswith("--no_")]
    assert "(--no_calibrate turns it off.)" in entries["--calibrate"]
    for option, help_text in entries.items():  # "(default: x)" added once, and only where the help names none
        assert help_text.count("(default:") <= 1, (option, help_text)
        assert "(default:" not in help_text or "default" not in help_text.split("(default:")[0].lower(), option
    own = [help_text for option, help_text in entries.items() if text.index(option) < positions[3] and help_text]
    assert len(own) == len(set(own)), "an option of the project repeats another's help"
    assert entries["--image_size"] == "Input resolution (default 224)."


# What a command loads before it answers `--help` or an option error: the option dataclasses and transformers'
# TrainingArguments, not the data library, the Trainer, the model code or the image libraries (seconds of start-up).
LOADED_MODULES = """
import json, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    print(json.dumps({"status": exit.code, "modules": sorted(sys.modules)}))
"""
HEAVY_MODULES = (
    "datasets",
    "evaluate",
    "torchvision",
    "transformers.trainer",
    "transformers.modeling_utils",
    "modeling_hierarchical",
    "image_processing_hierarchical",
    "pipeline_hierarchical",
)


@pytest.mark.parametrize(
    "argv",
    [
        ["run_classification.py", "--help"],
        ["run_classification.py", "--output_dir", "out", "--do_train", "--lr_cnv", "1e-3"],
        ["eval_report.py", "--help"],
        ["eval_report.py", "model", "--dataset_name", "data", "--batch_sise", "8"],
    ],
    ids=["help", "unknown option", "eval_report help", "eval_report unknown option"],
)
def test_help_and_option_errors_load_no_data_trainer_or_model_code(argv):
    result = run_script("-c", LOADED_MODULES, *argv)
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer["status"] in (0, 2), result.stderr
    assert ("--lr_conv" if "run_classification.py" in argv else "--batch_size") in result.stdout + result.stderr
    loaded = [name for name in HEAVY_MODULES if name in answer["modules"]]
    assert not loaded, f"{' '.join(argv)} loaded {loaded}"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_is_logged_at_a_fixed_interval_with_rate_and_time_left(caplog):
    clock = FakeClock()
    callback = TimedProgressCallback(interval=PROGRESS_INTERVAL_S, clock=clock)
    state = TrainerState(global_step=20, max_steps=220)  # resumed at step 20
    callback.on_train_begin(None, state, TrainerControl())
    with caplog.at_level(logging.INFO, logger=PROJECT_LOGGER):  # the package logger, which covers the callbacks
        for _ in range(100):  # a step every 0.5 s: a line every 60 steps
            clock.now += 0.5
            state.global_step += 1
            callback.on_step_end(None, state, TrainerControl())
    lines = [record.getMessage() for record in caplog.records]
    assert lines == ["step 80/220 (36%), 2.00 steps/s, 1m10s left"]
    assert progress_line(10, 100_000, 10.0, 10) == "step 10/100000 (0%), 1.00 steps/s, 27h46m left"
    # a time budget that ends training sooner gives the time left, and says so; a later one changes nothing
    assert progress_line(10, 100_000, 10.0, 10, budget_left=470.4) == (
        "step 10/100000 (0%), 1.00 steps/s, 7m50s left (--max_train_minutes)"
    )
    assert progress_line(10, 20, 10.0, 10, budget_left=470.4) == "step 10/20 (50%), 1.00 steps/s, 0m10s left"


def python_imports_of_the_readme() -> list[tuple[str, list[str]]]:
    """(module, names) of every `import` and `from ... import` line in the README's Python blocks."""
    readme = (PROJECT_DIR / "README.md").read_text(encoding="utf-8")
    imports = []
    for block in readme.split("```python\n")[1:]:
        for line in block.split("```")[0].splitlines():
            words = line.strip().split()
            if words[:1] == ["import"]:
                imports.append((words[1], []))
            elif words[:1] == ["from"] and "import" in words:
                names = " ".join(words[words.index("import") + 1 :]).replace(",", " ").split()
                imports.append((words[1], [name for name in names if name != "as"][:1] if " as " in line else names))
    return imports


def test_every_import_in_the_readme_resolves():
    """A module that moved leaves no stale `from module import name` in the README's examples."""
    import importlib

    imports = python_imports_of_the_readme()
    assert any(module.startswith("hierarchical.") for module, _ in imports)
    for module, names in imports:
        loaded = importlib.import_module(module)
        for name in names:
            assert hasattr(loaded, name), f"README: from {module} import {name}"
