"""Recorded provenance: checkpoints and saved models record their label tables and data; a resumed run or an
evaluation never mixes a run's parts with another's; weights with NaN or infinity are refused at load."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification

import eval_report
from conftest import data_args, make_parquet_dataset, small_config, tiny_args
from data_utils import prepare_datasets_with_record
from hierarchical.data.hierarchy import Hierarchy
from hierarchical.data.provenance import (
    PROVENANCE_NAME,
    DataRecord,
    check_resumed_data,
    read_record,
    tables_difference,
    write_record,
)
from hierarchical.training import run as training_run
from hierarchical.training import saved_model
from hierarchical.training.checkpoints import checkpoint_problem, find_checkpoints
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification
from run_classification import main


def stepped_args(data: Path, output_dir: Path, *extra: str) -> list[str]:
    """32 training images, a checkpoint every step (the newest kept); the validation split carved with seed 42 from
    the 200 training rows."""
    return tiny_args(data, output_dir, "--do_train", *extra) + [
        "--max_train_samples", "32", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tiny_parquet_dir, tmp_path_factory) -> Path:
    """A finished run whose output folder holds one checkpoint."""
    output_dir = tmp_path_factory.mktemp("provenance") / "out"
    main(stepped_args(tiny_parquet_dir, output_dir))
    return output_dir


def newest_checkpoint(output_dir: Path) -> Path:
    return Path(find_checkpoints(str(output_dir))[-1])


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(finished_run, copy, ignore=shutil.ignore_patterns(".run.lock"))
    return copy


# ---------------------------------------------------------------------------------------------------------------
# Label tables
# ---------------------------------------------------------------------------------------------------------------

names = st.lists(st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=6), min_size=2, max_size=8)


@st.composite
def hierarchies(draw) -> Hierarchy:
    fine = draw(names.map(lambda values: list(dict.fromkeys(values))).filter(lambda values: len(values) >= 2))
    coarse = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=len(fine), max_size=len(fine)))
    return Hierarchy.from_pairs(list(zip(fine, coarse, strict=True)), fine_order=fine)


@given(hierarchies(), st.data())
def test_tables_that_differ_in_any_way_are_named_and_identical_ones_accepted(hierarchy, data):
    """Identical tables (an equal copy) are accepted; the same names in another order, a renamed class, fewer
    classes and a class under another superclass are each refused, the message naming the first difference."""
    copy = Hierarchy(tuple(hierarchy.fine_names), tuple(hierarchy.coarse_names), tuple(hierarchy.fine_to_coarse))
    assert tables_difference(hierarchy, copy, "a", "b") is None
    fine = list(hierarchy.fine_names)
    order = data.draw(st.permutations(range(len(fine))).filter(lambda p: list(p) != sorted(p)))
    permuted = Hierarchy(tuple(fine[i] for i in order), hierarchy.coarse_names, hierarchy.fine_to_coarse)
    position = next(i for i, j in enumerate(order) if i != j)
    message = tables_difference(hierarchy, permuted, "the checkpoint", "this run")
    assert message == (
        f"class {position} is {fine[position]!r} in the checkpoint and {fine[order[position]]!r} in this run "
        "(the same names in another order)"
    )
    renamed_at = data.draw(st.integers(0, len(fine) - 1))
    renamed = list(fine)
    renamed[renamed_at] = "".join(fine) + "x"  # a name no class has
    other = Hierarchy(tuple(renamed), hierarchy.coarse_names, hierarchy.fine_to_coarse)
    assert f"class {renamed_at} is {fine[renamed_at]!r}" in tables_difference(hierarchy, other, "a", "b")
    assert "(other names)" in tables_difference(hierarchy, other, "a", "b")
    fewer = Hierarchy(tuple(fine[:-1]), hierarchy.coarse_names, hierarchy.fine_to_coarse[:-1])
    assert tables_difference(hierarchy, fewer, "a", "b").startswith(f"another hierarchy: a has {len(fine)} classes")
    if len(hierarchy.coarse_names) > 1:
        moved = list(hierarchy.fine_to_coarse)
        moved[0] = (moved[0] + 1) % len(hierarchy.coarse_names)
        regrouped = Hierarchy(hierarchy.fine_names, hierarchy.coarse_names, tuple(moved))
        assert tables_difference(hierarchy, regrouped, "a", "b").startswith(f"class 0 ({fine[0]!r}) belongs to")


def edit_config(folder: Path, case: str) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    fine = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    if case == "order":
        fine[3], fine[4] = fine[4], fine[3]
    elif case == "rename":
        fine[3] = "wolf cub"
    elif case == "coarse":  # only a superclass name differs
        config["coarse_label_names"][1] = "fishes"
    else:  # another hierarchy: 10 classes in 2 superclasses
        fine, config["coarse_label_names"], config["fine_to_coarse"] = fine[:10], ["x", "y"], [0] * 5 + [1] * 5
    config["id2label"] = {str(i): name for i, name in enumerate(fine)}
    config["label2id"] = {name: i for i, name in enumerate(fine)}
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "case, message",
    [
        ("order", "class 3 is 'beaver' in the checkpoint and 'bear' in this run \\(the same names in another order\\)"),
        ("rename", "class 3 is 'wolf cub' in the checkpoint and 'bear' in this run \\(other names\\)"),
        ("hierarchy", "another hierarchy: the checkpoint has 10 classes in 2 superclasses, this run 100 classes in 20"),
        ("coarse", "superclass 1 is 'fishes' in the checkpoint and 'fish' in this run \\(other names\\)"),
    ],
)
def test_resuming_a_checkpoint_of_other_label_tables_is_refused(
    finished_run, tiny_parquet_dir, tmp_path, case, message
):
    output_dir = copy_run(finished_run, tmp_path)
    checkpoint = newest_checkpoint(output_dir)
    edit_config(checkpoint, case)
    with pytest.raises(ValueError, match=f"cannot resume from '{re.escape(str(checkpoint))}': .*{message}") as error:
        main(stepped_args(tiny_parquet_dir, output_dir))
    print(error.value)
    explicit = stepped_args(tiny_parquet_dir, tmp_path / "other", "--resume_from_checkpoint", str(checkpoint))
    with pytest.raises(ValueError, match=message):
        main(explicit)


def test_resuming_an_optimizer_state_of_another_group_count_is_refused(finished_run, tiny_parquet_dir, tmp_path):
    output_dir = copy_run(finished_run, tmp_path)
    path = newest_checkpoint(output_dir) / "optimizer.pt"
    state = torch.load(path, weights_only=True)
    groups = len(state["param_groups"])
    state["param_groups"] = state["param_groups"][:-1]
    torch.save(state, path)
    with pytest.raises(
        ValueError,
        match=f"{re.escape(str(path.parent))}'.*optimizer.pt\\) holds {groups - 1} parameter groups, this run's optimizer {groups}",
    ) as error:
        main(stepped_args(tiny_parquet_dir, output_dir))
    print(error.value)


# ---------------------------------------------------------------------------------------------------------------
# Data record
# ---------------------------------------------------------------------------------------------------------------


def test_checkpoints_and_the_model_record_the_data_and_the_validation_rows(finished_run):
    record = read_record(str(finished_run))
    assert record is not None and read_record(str(newest_checkpoint(finished_run))) == record
    assert (record.validation, record.seed, record.fraction, record.train_rows) == ("carved", 42, 0.1, 200)
    assert len(record.validation_rows) == 20 and len(set(record.validation_rows)) == 20


# a record's field -> values of another type or out of range (each makes the record invalid)
BAD_RECORD_VALUES = {
    "format": [True, 1.0, "1", 2, None],
    "train_fingerprint": [None, 5, "abc", "Z" * 64],
    "train_rows": [True, 200.0, "200", 0, -1],
    "validation": ["Carved", None, 1],
    "seed": [None, "42", 42.0, True],
    "fraction": [None, "0.1", 0, 1.5, True],
    "validation_rows": ["[1, 2]", [1, 1], [True], [200], [-1], [1.0], [[1]], []],
    "validation_fingerprint": [5, "abc"],
}


def carved_record() -> DataRecord:
    return DataRecord("ab" * 32, 200, "carved", seed=42, fraction=0.1, validation_rows=tuple(range(0, 200, 10)))


@given(st.sampled_from([(key, value) for key, values in BAD_RECORD_VALUES.items() for value in values]))
def test_a_record_with_a_field_of_another_type_is_refused_naming_the_file(tmp_path_factory, field_and_value):
    """A record is trusted whole or not at all: every field of another JSON type (a boolean is not a number), out of
    range, or disagreeing with where the validation split came from is refused, naming the file and the field."""
    folder = tmp_path_factory.mktemp("record")
    path = write_record(str(folder), carved_record())
    assert read_record(str(folder)) == carved_record()
    field, value = field_and_value
    content = json.loads(Path(path).read_text())
    content[field] = value
    Path(path).write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"{re.escape(path)} is not a valid record of the training data: .*{field}"):
        read_record(str(folder))


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"format": 1, "format": 1}', "the key 'format' is given more than once"),
        ("[1, 2]", "it holds list, not a JSON object"),
        ('{"format": 1', "cannot be read"),
        ('{"format": NaN}', "NaN is not a number JSON allows"),
    ],
)
def test_an_unreadable_record_is_refused_naming_the_file(tmp_path, text, message):
    (tmp_path / PROVENANCE_NAME).write_text(text)
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / PROVENANCE_NAME))}.*{re.escape(message)}"):
        read_record(str(tmp_path))
    record = json.loads(Path(write_record(str(tmp_path), carved_record())).read_text())
    (tmp_path / PROVENANCE_NAME).write_text(json.dumps({**record, "note": "x"}))
    with pytest.raises(ValueError, match=r"unknown \['note'\]"):
        read_record(str(tmp_path))


def test_a_checkpoint_that_records_no_data_is_not_resumed_unless_allowed(tmp_path, caplog):
    with pytest.raises(ValueError, match=f"cannot resume from '{re.escape(str(tmp_path))}': it records no training "
                       f"data \\({PROVENANCE_NAME} is missing\\).*--allow_data_mismatch true"):  # fmt: skip
        check_resumed_data(str(tmp_path), carved_record())
    check_resumed_data(str(tmp_path), carved_record(), allow_data_mismatch=True)
    assert "it records no training data" in caplog.text
    (tmp_path / PROVENANCE_NAME).write_text("{}")
    with pytest.raises(ValueError, match=f"cannot resume from '{re.escape(str(tmp_path))}': .*not a valid record"):
        check_resumed_data(str(tmp_path), carved_record(), allow_data_mismatch=True)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "config.json is missing"),
        ("truncated", "config.json is not a valid config of this model \\(Expecting value"),
        ("boolean", "config.json is not a valid config of this model \\(num_frozen_stages must be"),
        ("names", "config.json is not a valid config of this model \\(coarse_label_names must be a list"),
    ],
)
def test_a_checkpoint_whose_label_tables_cannot_be_read_is_incomplete(finished_run, tmp_path, case, message):
    """A checkpoint is resumed only when its label tables can be compared with the run's: a missing, truncated or
    invalid config.json makes it incomplete (moved aside, or refused when asked for), never silently resumed."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(newest_checkpoint(finished_run), checkpoint)
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    if case == "missing":
        path.unlink()
    elif case == "truncated":
        path.write_text('{"a": ')
    elif case == "boolean":
        path.write_text(json.dumps({**config, "num_frozen_stages": True}))
    else:
        path.write_text(json.dumps({**config, "coarse_label_names": "".join(config["coarse_label_names"])}))
    assert re.match(message, checkpoint_problem(str(checkpoint))), checkpoint_problem(str(checkpoint))


def test_resuming_a_checkpoint_without_a_record_is_refused(finished_run, tiny_parquet_dir, tmp_path):
    output_dir = copy_run(finished_run, tmp_path)
    checkpoint = newest_checkpoint(output_dir)
    (checkpoint / PROVENANCE_NAME).unlink()
    with pytest.raises(ValueError, match=f"cannot resume from '{re.escape(str(checkpoint))}': it records no training"):
        main(stepped_args(tiny_parquet_dir, output_dir))


def test_resuming_with_another_validation_split_is_refused(finished_run, tiny_parquet_dir, tmp_path):
    output_dir = copy_run(finished_run, tmp_path)
    with pytest.raises(ValueError, match="checkpoint-\\d'.*validation split holds other rows.*seed 42.*seed 7.*--seed"):
        main(stepped_args(tiny_parquet_dir, output_dir, "--seed", "7"))


def evaluated_rows(monkeypatch) -> list:
    """Records the `index` column of every split `saved_model.predict_split` evaluates."""
    seen = []
    original = saved_model.predict_split

    def spy(model, dataset, *args, **kwargs):
        seen.append(sorted(dataset["index"]))
        return original(model, dataset, *args, **kwargs)

    monkeypatch.setattr(saved_model, "predict_split", spy)
    return seen


def test_the_report_of_the_validation_split_uses_the_recorded_rows_whatever_the_seed(
    finished_run, tiny_parquet_dir, tmp_path, monkeypatch
):
    seen = evaluated_rows(monkeypatch)
    eval_report.main(
        [str(finished_run), "--dataset_name", str(tiny_parquet_dir), "--split", "validation", "--seed", "7",
         "--output_dir", str(tmp_path / "report"), "--cache_dir", str(tmp_path / "cache")]
    )  # fmt: skip
    assert seen == [sorted(read_record(str(finished_run)).validation_rows)]


@pytest.mark.parametrize(
    "extra", [["--seed", "7"], ["--train_val_split", "0"], ["--train_val_split", "0.999", "--seed", "42"]]
)
def test_an_evaluation_only_run_uses_the_recorded_rows_whatever_the_seed(
    finished_run, tiny_parquet_dir, tmp_path, monkeypatch, caplog, extra
):
    seen = []
    original = training_run.evaluate_validation

    def spy(trainer, config, validation, *args):
        seen.append(sorted(validation["index"]))
        return original(trainer, config, validation, *args)

    monkeypatch.setattr(training_run, "evaluate_validation", spy)
    args = tiny_args(tiny_parquet_dir, tmp_path / "eval", "--do_eval", *extra)
    main(args + ["--model_name_or_path", str(finished_run)])
    assert seen == [sorted(read_record(str(finished_run)).validation_rows)]
    given = dict(zip(extra[::2], extra[1::2], strict=True))
    unused = [f"{option} {float(value) if option == '--train_val_split' else value}" for option, value in given.items()]
    unused = [text for text in unused if text not in ("--seed 42", "--train_val_split 0.1")]  # the recorded ones
    assert f"{' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used" in caplog.text
    assert read_record(str(tmp_path / "eval")) == read_record(str(finished_run)), "the model's record goes with it"


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("other_data")
    make_parquet_dataset(folder, rows_per_class=2, split="train", seed=5)
    return folder


def test_evaluating_on_other_data_is_refused_unless_allowed(finished_run, other_data, tmp_path):
    options = dict(split="validation", output_dir=tmp_path / "report", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="the model folder .* records its training data: the training split here "
                       "\\(200 rows, fingerprint .*\\) is not the one it was trained on.*--allow_data_mismatch") as error:  # fmt: skip
        saved_model.evaluate_saved_model(finished_run, str(other_data), **options)
    print(error.value)
    allowed = data_args(tmp_path, other_data, allow_data_mismatch=True)
    splits, _ = prepare_datasets_with_record(allowed, small_config(), 7, recorded=read_record(str(finished_run)))
    assert len(splits["validation"]) == 20


def test_a_validation_split_of_rows_the_model_trained_on_is_refused(finished_run, tiny_parquet_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(finished_run, model_dir, ignore=shutil.ignore_patterns("checkpoint-*", ".run.lock"))
    record = json.loads((model_dir / PROVENANCE_NAME).read_text())  # as written by a run with --train_val_split 0
    record.update(validation="none", seed=None, fraction=None, validation_rows=[])
    (model_dir / PROVENANCE_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="would hold rows it trained on: it trained on every one of the 200 rows"):
        saved_model.evaluate_saved_model(
            model_dir,
            str(tiny_parquet_dir),
            split="validation",
            output_dir=tmp_path / "report",
            cache_dir=str(tmp_path),
        )


# ---------------------------------------------------------------------------------------------------------------
# Weights with NaN or infinity
# ---------------------------------------------------------------------------------------------------------------


def poison(path: Path, tensor: str, value: float) -> None:
    weights = load_file(path)
    weights[tensor] = weights[tensor].clone()
    weights[tensor].view(-1)[0] = value
    save_file(weights, path, metadata={"format": "pt"})


def test_an_evaluation_of_a_model_with_nan_weights_is_refused_before_any_work(finished_run, tiny_parquet_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(finished_run, model_dir, ignore=shutil.ignore_patterns("checkpoint-*", ".run.lock"))
    poison(model_dir / "model.safetensors", "fine_classifier.bias", float("nan"))
    poison(model_dir / "model.safetensors", "features.0.0.weight", float("inf"))
    output_dir = tmp_path / "eval"
    with pytest.raises(
        ValueError, match="NaN or infinite values in 2 tensors: features.0.0.weight, fine_classifier.bias"
    ):
        main(tiny_args(tiny_parquet_dir, output_dir, "--do_eval", "--model_name_or_path", str(model_dir)))
    assert not (output_dir / "eval_results.json").exists() and not (output_dir / "model.safetensors").exists()


def test_every_way_of_loading_a_model_with_nan_weights_refuses_it(finished_run, tiny_parquet_dir, tmp_path):
    """The check travels with the model: the report script, the model class and `AutoModel` with the model's own
    code (as the pipelines load it) refuse it, naming the tensor."""
    model_dir = tmp_path / "model"
    shutil.copytree(finished_run, model_dir, ignore=shutil.ignore_patterns("checkpoint-*", ".run.lock"))
    poison(model_dir / "model.safetensors", "coarse_classifier.bias", float("inf"))
    message = (
        f"the model '{re.escape(str(model_dir))}' holds NaN or infinite values in 1 tensors: coarse_classifier.bias"
    )
    with pytest.raises(ValueError, match=message):
        HierarchicalEfficientNetV2ForImageClassification.from_pretrained(model_dir)
    with pytest.raises(ValueError, match=message):
        AutoModelForImageClassification.from_pretrained(model_dir, trust_remote_code=True)
    with pytest.raises(ValueError, match=message):
        eval_report.main([str(model_dir), "--dataset_name", str(tiny_parquet_dir), "--output_dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_a_checkpoint_with_nan_weights_is_not_resumed_from(finished_run, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(newest_checkpoint(finished_run), checkpoint)
    poison(checkpoint / "model.safetensors", "coarse_classifier.weight", float("-inf"))
    problem = checkpoint_problem(str(checkpoint))
    assert problem == "model.safetensors holds NaN or infinite values in 1 tensors: coarse_classifier.weight"
