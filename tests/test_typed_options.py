"""Options are typed the same from every source: a JSON options file is read as the command line is, config
fields refuse values of another type, stored temperatures stay in the fitted range, and options that depend on the
data's size are checked before any work."""

import dataclasses
import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import run_classification
from configuration_hierarchical import TEMPERATURE_RANGE, HierarchicalEfficientNetV2Config
from conftest import NUM_FINE, make_parquet_dataset, small_config, tiny_args
from data_utils import AUGMENTATION_POLICIES
from hierarchical.evaluation.temperature_scaling import LOG_TEMPERATURE_RANGE, fit_temperatures
from hierarchical.training import run as training_run
from hierarchical.training.checkpoints import _best_metric_problem
from run_classification import parse_args


def floats(low: float, high: float) -> st.SearchStrategy:
    """Numbers for a float option: in and out of its range, whole numbers, NaN and infinities."""
    return st.one_of(st.floats(low, high), st.integers(-3, 3), st.sampled_from([math.nan, math.inf, -math.inf, 1e-9]))


# option -> (JSON type it takes, a strategy of values of that type, some out of the option's range)
OPTIONS = {
    "calibrate": ("bool", st.booleans()),
    "horizontal_flip": ("bool", st.booleans()),
    "channels_last": ("bool", st.booleans()),
    "fine_head_uses_coarse_logits": ("bool", st.booleans()),
    "do_train": ("bool", st.booleans()),
    "schedule_by_time": ("bool", st.booleans()),
    "image_size": ("int", st.integers(-5, 300)),
    "num_frozen_stages": ("int", st.integers(-2, 10)),
    "max_train_samples": ("int", st.integers(-2, 1000)),
    "batch_size": ("int", st.integers(-1, 256)),
    "seed": ("int", st.integers(0, 2**31)),
    "dropout": ("float", floats(-0.5, 1.5)),
    "lr_fc": ("float", floats(-1.0, 1.0)),
    "train_val_split": ("float", floats(-0.5, 1.5)),
    "epochs": ("float", floats(-1.0, 50.0)),
    "mix_prob": ("float", floats(-0.5, 1.5)),
    "calibration_split_fraction": ("float", floats(-0.5, 1.5)),
    "max_train_minutes": ("float", floats(-1.0, 100.0)),
    "augmentation": ("str", st.sampled_from([*AUGMENTATION_POLICIES, "bogus"])),
    "lr_scheduler_type": ("str", st.sampled_from(["cosine", "linear", "bogus"])),
    "dataset_name": ("str", st.text("abc-/_", min_size=1, max_size=8)),
}


def command_line_word(value) -> str:
    """How a user types `value` on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def parsed_or_error(argv: list[str]) -> tuple[str, str]:
    """("ok", every parsed value as JSON) or ("error", the message)."""
    try:
        model_args, data_args, training_args = parse_args(argv)
    except ValueError as error:
        return "error", str(error)
    values = [dataclasses.asdict(model_args), dataclasses.asdict(data_args), training_args.to_dict()]
    return "ok", json.dumps(values, sort_keys=True, default=str)


def spelled(name: str, dashed: bool) -> str:
    """An option's name as a user may write it: `num_train_epochs` or `num-train-epochs`."""
    return name.replace("_", "-") if dashed else name


@settings(max_examples=20)
@given(options=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), max_size=6).flatmap(
    lambda chosen: st.fixed_dictionaries({name: OPTIONS[name][1] for name in chosen})
), dashed=st.sets(st.sampled_from(sorted(OPTIONS))))  # fmt: skip
def test_an_options_file_parses_as_the_same_command_line(options, dashed, tmp_path_factory):
    folder = tmp_path_factory.mktemp("options")
    options = {"output_dir": str(folder / "out"), **{spelled(k, k in dashed): v for k, v in options.items()}}
    path = folder / "options.json"
    path.write_text(json.dumps(options))
    command_line = [word for name, value in options.items() for word in (f"--{name}", command_line_word(value))]

    from_file, from_command_line = parsed_or_error([str(path)]), parsed_or_error(command_line)

    assert from_file == from_command_line
    if from_file[0] == "error":
        assert any(name in from_file[1] or name.replace("-", "_") in from_file[1] for name in options), from_file[1]


WRONG_TYPES = {
    "bool": st.one_of(st.sampled_from(["false", "true", "no"]), st.integers(0, 1)),
    "int": st.one_of(st.booleans(), st.sampled_from([32.0, "32", "nan"])),
    "float": st.one_of(st.booleans(), st.sampled_from(["nan", "1e-3", "0.5", [0.5]])),
    "str": st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=False)),
}
EXPECTED_TYPES = {"bool": "a boolean", "int": "an integer", "float": "a number", "str": "a string"}


@settings(max_examples=20)
@given(option_name=st.sampled_from(sorted(OPTIONS)), dashed=st.booleans(), data=st.data())
def test_a_value_of_another_json_type_is_refused_naming_the_key_and_the_type(
    option_name, dashed, data, tmp_path_factory
):
    kind, name = OPTIONS[option_name][0], spelled(option_name, dashed)
    value = data.draw(WRONG_TYPES[kind])
    path = tmp_path_factory.mktemp("options") / "options.json"
    path.write_text(json.dumps({name: value}))

    with pytest.raises(ValueError, match=f"'{name}' takes {EXPECTED_TYPES[kind]}") as error:
        parse_args([str(path)])
    assert str(path) in str(error.value)


def test_the_reported_examples_of_an_options_file(tmp_path):
    path = tmp_path / "options.json"
    path.write_text('{"calibrate": "false"}')
    with pytest.raises(ValueError, match=r"'calibrate' takes a boolean \(true or false\).*got \"false\""):
        parse_args([str(path)])
    path.write_text('{"epochs": "nan"}')
    with pytest.raises(ValueError, match="'epochs' takes a number"):
        parse_args([str(path)])
    path.write_text('{"epochs": NaN}')
    with pytest.raises(ValueError, match="--epochs must be a finite number, got nan"):
        parse_args([str(path)])
    path.write_text('{"seed": 1, "seed": 2}')
    with pytest.raises(ValueError, match="'seed' is given more than once"):
        parse_args([str(path)])
    path.write_text('{"selective_target_accuracy": null}')
    with pytest.raises(ValueError, match="'selective_target_accuracy' cannot be null"):
        parse_args([str(path)])


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"do-train": 1}', "'do-train' takes a boolean"),
        ('{"output-dir": 5}', "'output-dir' takes a string"),
        ('{"seed": 1, "se\\u0065d": 2}', "'seed' is given more than once"),
        ('{"do_train": true, "do-train": false}', "'do_train' and 'do-train' name the same option; give it once"),
        ('{"no_calibrate": true}', "'no_calibrate' is the command line's switch for 'calibrate'; write \"calibrate\""),
        (
            '{"selective_start_coverage": [[0.01], [0.1]]}',
            "'selective_start_coverage' takes a list, each item a number",
        ),
        ('{"selective_start_coverage": [0.01, null]}', "'selective_start_coverage' takes a list, each item a number"),
        ('{"lr_fc": 1' + "0" * 400 + "}", "--lr_fc must be a finite number, got inf"),
        ('{"dataset_name": ["a", "b"]}', "'dataset_name' takes a string"),
    ],
)
def test_every_spelling_and_shape_of_a_key_is_typed_as_on_the_command_line(tmp_path, text, message):
    path = tmp_path / "options.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_args([str(path)])


def test_an_options_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "options.json"
    path.write_text('{"seed": 3, "calibrate": false}', encoding="utf-8-sig")
    model_args, _, training_args = parse_args([str(path), "--output_dir", str(tmp_path / "out")])
    assert (training_args.seed, model_args.calibrate) == (3, False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "3", "--num_train_epochs", "5"], "--epochs 3.0 and --num_train_epochs 5.0 disagree"),
        (
            ["--batch_size", "4", "--per_device_eval_batch_size", "16"],
            "--batch_size 4 and --per_device_eval_batch_size 16",
        ),
        (
            ["--batch_size", "4", "--per_device_train_batch_size", "8"],
            "--batch_size 4 and --per_device_train_batch_size 8",
        ),
    ],
)
def test_an_alias_and_its_option_set_to_different_values_are_refused(tmp_path, argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_args(["--output_dir", str(tmp_path), *argv])
    # the same option in a file and its alias on the command line: the command line overrides the file
    path = tmp_path / "options.json"
    path.write_text(json.dumps({argv[2].lstrip("-"): float(argv[3]) if "epochs" in argv[2] else int(argv[3])}))
    _, _, training_args = parse_args([str(path), "--output_dir", str(tmp_path), *argv[:2]])
    assert getattr(training_args, argv[2].lstrip("-")) == float(argv[1])


# config field -> values of another type than it takes
CONFIG_WRONG_TYPES = {
    "num_frozen_stages": [True, False, 2.0, "2"],
    "image_size": [True, 32.0, "32"],
    "num_channels": [True, 3.0],
    "dropout": [True, False, "0.1", None],
    "drop_path_rate": [False, "0"],
    "label_smoothing": [False, "0.1"],
    "coarse_loss_weight": [True, "1"],
    "fine_head_uses_coarse_logits": [1, 0, "true", None],
    "channels_last": [0, "false"],
    "fine_temperature": [True, "1.0"],
    "coarse_temperature": [True],
    "selective_threshold": [True, "0.5"],
    "image_mean": [[True, 0.5, 0.5], ["0.5", 0.5, 0.5], "abc"],
    "image_std": [[0.5, 0.5, math.nan], [True, 1, 1]],
}


@settings(max_examples=25)
@given(field_and_value=st.sampled_from([(f, v) for f, values in CONFIG_WRONG_TYPES.items() for v in values]))
def test_config_fields_refuse_values_of_another_type(field_and_value):
    field, value = field_and_value
    with pytest.raises(ValueError, match=f"^{field} must"):
        small_config(**{field: value})


# edits of a saved config.json's label tables (4 classes "a".."d" in superclasses "x", "y") -> the message
LABEL_TABLE_EDITS = [
    ({"id2label": {"0": True, "1": "b", "2": "c", "3": "d"}}, "id2label[0] must be a name (a non-empty string), got True"),
    ({"id2label": {"0": 7, "1": "b", "2": "c", "3": "d"}}, "id2label[0] must be a name (a non-empty string), got 7"),
    ({"id2label": {"0": "", "1": "b", "2": "c", "3": "d"}}, "id2label[0] must be a name (a non-empty string), got ''"),
    ({"id2label": {"0": "caf\u00e9", "1": "cafe\u0301", "2": "c", "3": "d"}}, "id2label has names that are equal in "
     "Unicode normal form NFC: 'cafe\\u0301', 'caf\\xe9'"),
    ({"id2label": {"x": "a", "1": "b", "2": "c", "3": "d"}}, "id2label must have class ids (0, 1, ...) as keys, got 'x'"),
    ({"id2label": ["a", "b", "c", "d"]}, "id2label must be an object of class ids and names"),
    ({"coarse_label_names": "xy"}, "coarse_label_names must be a list, got 'xy'"),
    ({"coarse_label_names": [True, "y"]}, "coarse_label_names[0] must be a name (a non-empty string), got True"),
    ({"fine_to_coarse": "0011"}, "fine_to_coarse must be a list, got '0011'"),
    ({"fine_to_coarse": [True, 0, 1, 1]}, "fine_to_coarse[0] = True is not a superclass index"),
    ({"num_labels": True}, "num_labels must be an integer >= 1, got True"),
    ({"num_labels": 7}, "num_labels is 7 but id2label names 4 classes"),
    ({"backbone_weights": 5}, "backbone_weights must be 'imagenet', None or a file path, got 5"),
]  # fmt: skip


@pytest.mark.parametrize("edit, message", LABEL_TABLE_EDITS)
def test_stored_label_tables_of_another_type_are_refused_at_load(tmp_path, edit, message):
    tables = {"id2label": dict(enumerate("abcd")), "coarse_label_names": ["x", "y"], "fine_to_coarse": [0, 0, 1, 1]}
    small_config(**tables).save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**stored, **edit}))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        HierarchicalEfficientNetV2Config.from_pretrained(tmp_path)


@pytest.mark.parametrize("field", ["fine_class_weights", "coarse_class_weights"])
def test_class_weights_refuse_booleans_and_strings(field):
    size = 4 if field == "fine_class_weights" else 2
    for weights in ([True] * size, ["1"] * size):
        with pytest.raises(ValueError, match=f"{field} must be a list of numbers"):
            small_config(**{field: weights})


def test_a_stored_boolean_is_not_a_number_of_frozen_stages(tmp_path):
    small_config().save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**stored, "num_frozen_stages": True}))
    with pytest.raises(ValueError, match=r"num_frozen_stages must be in \[0, 8\] \(an integer\)"):
        HierarchicalEfficientNetV2Config.from_pretrained(tmp_path)


@pytest.mark.parametrize("temperature", [0.009, 100.5, 1e6])
def test_a_stored_temperature_outside_the_fitted_range_is_refused_at_load(tmp_path, temperature):
    small_config().save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**stored, "coarse_temperature": temperature}))
    with pytest.raises(ValueError, match=r"coarse_temperature must be a finite number > 0 in \[0.01, 100.0\]"):
        HierarchicalEfficientNetV2Config.from_pretrained(tmp_path)


@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_fitted_temperatures_at_the_bounds_are_accepted_by_the_config(scale):
    assert (math.log(TEMPERATURE_RANGE[0]), math.log(TEMPERATURE_RANGE[1])) == LOG_TEMPERATURE_RANGE
    config = small_config()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, config.num_labels, 64)
    coarse_labels = np.asarray(config.fine_to_coarse)[labels]
    # logits far too confident (scale 1e4, and wrong half the time) or flat (1e-4) push the fit to a bound
    logits = scale * rng.normal(size=(64, config.num_labels))
    coarse_logits = scale * rng.normal(size=(64, config.num_coarse_labels))
    temperatures = fit_temperatures(logits, coarse_logits, labels, coarse_labels, config)
    assert all(TEMPERATURE_RANGE[0] <= t <= TEMPERATURE_RANGE[1] for t in temperatures)
    small_config(fine_temperature=temperatures[0], coarse_temperature=temperatures[1])  # accepted


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--train_val_split", "0.999"],
            rf"--train_val_split 0.999 of the {2 * NUM_FINE} training rows leaves 0 to train on and {2 * NUM_FINE}",
        ),
        (
            ["--train_val_split", "0.5", "--calibration_split_fraction", "1e-9"],
            rf"--calibration_split_fraction 1e-09 of {NUM_FINE} validation images leaves an empty part: "
            rf"0 to calibrate on and {NUM_FINE} held out",
        ),
    ],
)
def test_options_that_depend_on_the_data_size_are_checked_before_the_model_is_built(
    tmp_path, monkeypatch, extra, message
):
    data = make_parquet_dataset(tmp_path / "data", rows_per_class=2, split="train")

    def model_is_built(*args, **kwargs):
        raise AssertionError("the model was built before the options were checked")

    monkeypatch.setattr(training_run, "load_model", model_is_built)
    argv = tiny_args(data, tmp_path / "out", "--do_train", "--do_eval", *extra)
    argv.remove("--max_eval_samples"), argv.remove("20")
    with pytest.raises(ValueError, match=message):
        run_classification.main(argv)


def test_a_boolean_best_metric_in_a_checkpoint_is_not_a_number(tmp_path):
    """`true == 1.0` in Python: a checkpoint's state saying its best accuracy is `true` is refused, not matched."""
    state = {"best_metric": True, "best_global_step": 1, "log_history": [{"step": 1, "eval_fine_accuracy": 1.0}]}
    problem = _best_metric_problem(state, str(tmp_path / "checkpoint-1"), "fine_accuracy", True)
    assert problem == "trainer_state.json has best_metric True, not a number"
    state = {**state, "best_metric": 1.0, "log_history": [{"step": 1, "eval_fine_accuracy": True}]}
    assert "its log holds no eval_fine_accuracy" in _best_metric_problem(state, str(tmp_path), "fine_accuracy", True)
