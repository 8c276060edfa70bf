"""The commands as a user types them: recipes adjusted on the command line."""

import json
import shlex
from pathlib import Path

import pytest

from conftest import PROJECT_DIR, run_script
from remote_resources import needed_resources
from run_classification import parse_args

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
    result = run_script("run_classification.py", "--help")
    assert result.returncode == 0, result.stderr
    assert "[RECIPE.json]" in result.stdout and "options after it override it" in result.stdout


def test_the_readme_adjusts_a_recipe_on_the_command_line():
    readme = (PROJECT_DIR / "README.md").read_text()
    command = "python run_classification.py recipes/cpu_32px_30min.json --dataset_name"
    assert command in readme
    line = next(line for line in readme.splitlines() if line.startswith(command))
    argv = shlex.split(line)[2:]
    _, data_args, training_args = parse_args(argv)
    assert data_args.dataset_name == argv[argv.index("--dataset_name") + 1]
    assert Path(training_args.output_dir) == Path(argv[argv.index("--output_dir") + 1])
