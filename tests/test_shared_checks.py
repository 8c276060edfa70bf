"""Checks written once and used by every option, field and argument they apply to, with one message form:
`check_unit_interval` (shares, probabilities and thresholds between 0 and 1) and `check_label_range` (class and
superclass ids)."""

from __future__ import annotations

import math
import re

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from configuration_hierarchical import UNIT_INTERVALS, check_label_range, check_unit_interval
from conftest import small_config
from data_utils import DataArguments, HierarchicalCollator
from hierarchical.data.checks import standardise_split
from hierarchical.evaluation.calibration import CalibrationArguments
from hierarchical.evaluation.selective_threshold import choose_selective_threshold
from hierarchical.evaluation.temperature_scaling import check_predictions
from run_classification import parse_args

# ----------------------------------------------------------------------------------------------------------------
# Numbers between 0 and 1
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval", "inside", "outside"),
    [
        ("(0, 1)", [1e-9, 0.5, 1 - 1e-9], [0, 0.0, 1, 1.0]),
        ("(0, 1]", [1e-9, 1, 1.0], [0, 0.0, 1.5]),
        ("[0, 1)", [0, 0.0, 0.5], [1, 1.0, -0.1]),
        ("[0, 1]", [0, 0.0, 1, 1.0], [-1e-9, 1 + 1e-9]),
    ],
)
def test_unit_interval_bounds(interval, inside, outside):
    for value in inside:
        assert check_unit_interval("x", value, interval) == float(value)
    for value in [*outside, math.nan, math.inf, True, "0.5", None]:
        with pytest.raises(ValueError, match=re.escape(f"x must be in {interval}, got {value!r}")):
            check_unit_interval("x", value, interval)


def test_unit_interval_none_and_unknown_intervals():
    assert check_unit_interval("x", None, "(0, 1]", allow_none=True) is None
    with pytest.raises(ValueError, match=re.escape("x must be None or in (0, 1], got 2")):
        check_unit_interval("x", 2, "(0, 1]", allow_none=True)
    with pytest.raises(ValueError, match="interval must be one of"):
        check_unit_interval("x", 0.5, "(0, 2)")
    assert len(UNIT_INTERVALS) == 4


SCORES = (np.linspace(0.5, 1, 40), np.ones(40, bool), np.linspace(0.6, 1, 40), np.ones(40, bool))


def predict_with(value: float, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue("model")
    logits, coarse_logits = torch.zeros(2, model.config.num_labels), torch.zeros(2, model.config.num_coarse_labels)
    model.predict_from_logits(logits, coarse_logits, min_confidence=value)


# Every user of the check: (name in the message, its interval, None allowed, a valid value, set it to a value).
USERS = {
    "--selective_target_accuracy": ("(0, 1)", False, 0.9, lambda v, _: CalibrationArguments(selective_target_accuracy=v)),
    "--selective_confidence": ("(0, 1)", False, 0.9, lambda v, _: CalibrationArguments(selective_confidence=v)),
    "--calibration_split_fraction": ("(0, 1]", False, 1.0, lambda v, _: CalibrationArguments(calibration_split_fraction=v)),
    "--selective_start_coverage": ("[0, 1)", False, 0.0, lambda v, _: CalibrationArguments(selective_start_coverage=[0.1, v])),
    "target_accuracy": ("(0, 1)", False, 0.9, lambda v, _: choose_selective_threshold(*SCORES, target_accuracy=v)),
    "confidence": ("(0, 1)", False, 0.9, lambda v, _: choose_selective_threshold(*SCORES, 0.9, confidence=v)),
    "start_coverages": ("[0, 1)", False, 0.0, lambda v, _: choose_selective_threshold(*SCORES, 0.9, start_coverages=(v,))),
    "min_confidence": ("(0, 1]", False, 1.0, predict_with),
    "selective_threshold": ("(0, 1]", True, 1.0, lambda v, _: small_config(selective_threshold=v)),
    "selective_target_accuracy": ("(0, 1)", True, 0.9, lambda v, _: small_config(selective_target_accuracy=v)),
    "selective_confidence": ("(0, 1)", True, 0.9, lambda v, _: small_config(selective_confidence=v)),
    "dropout": ("[0, 1)", False, 0.0, lambda v, _: small_config(dropout=v)),
    "drop_path_rate": ("[0, 1)", False, 0.0, lambda v, _: small_config(drop_path_rate=v)),
    "label_smoothing": ("[0, 1)", False, 0.0, lambda v, _: small_config(label_smoothing=v)),
    "train_val_split": ("[0, 1)", False, 0.0, lambda v, _: DataArguments(train_val_split=v)),
    "random_erasing": ("[0, 1]", False, 1.0, lambda v, _: DataArguments(random_erasing=v)),
    "mix_prob": ("[0, 1]", False, 0.0, lambda v, _: DataArguments(mix_prob=v)),
    "cutmix_switch_prob": ("[0, 1]", False, 1.0, lambda v, _: DataArguments(cutmix_switch_prob=v)),
    "--layer_decay": ("(0, 1]", False, 1.0, lambda v, _: parse_args(["--output_dir", "x", "--layer_decay", str(v)])),
    "--ema_decay": ("[0, 1)", False, 0.0, lambda v, _: parse_args(["--output_dir", "x", "--ema_decay", str(v)])),
}  # fmt: skip


@pytest.mark.parametrize("name", list(USERS))
def test_every_share_is_checked_by_the_one_check_with_its_message(name, request):
    interval, allow_none, valid, set_to = USERS[name]
    set_to(valid, request)  # the edge that the interval includes
    excluded_edges = [edge for edge, bracket in ((0.0, interval[0]), (1.0, interval[-1])) if bracket in "()"]
    if name == "--selective_target_accuracy":
        excluded_edges.remove(0.0)  # 0 skips choosing a threshold
    for bad in (-0.5, 1.5, *excluded_edges):
        expected = f"{name} must be {'None or ' if allow_none else ''}in {interval}, got {bad!r}"
        with pytest.raises(ValueError, match=re.escape(expected)):
            set_to(bad, request)


# ----------------------------------------------------------------------------------------------------------------
# Class ids
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_given", [np.asarray, torch.tensor, list])
def test_label_range_names_the_field_the_first_bad_id_its_row_and_the_range(as_given):
    check_label_range(as_given([0, 4, 2]), 5, "x")
    check_label_range(as_given([]), 5, "x")
    with pytest.raises(ValueError, match=re.escape("x must be in [0, 5), got 5 at row 1 (2 of 4 rows out of range)")):
        check_label_range(as_given([0, 5, 3, -1]), 5, "x")
    with pytest.raises(ValueError, match=re.escape("x must be in [0, 5), got -1 at image 7 (1 of 2 rows")):
        check_label_range(as_given([-1, 3]), 5, "x", lambda row: f"image {row + 7}")


def from_a_column(labels: list[int]) -> None:
    image = PIL.Image.new("RGB", (4, 4))
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.Value("int64")})
    split = datasets.Dataset.from_dict({"img": [image] * len(labels), "fine_label": labels}, features=features)
    standardise_split(split, DataArguments(), small_config(), "train")


def from_the_collator(labels: list[int]) -> None:
    examples = [
        {"pixel_values": torch.zeros(3, 32, 32), "labels": label, "coarse_labels": 0, "index": 10 + row}
        for row, label in enumerate(labels)
    ]
    HierarchicalCollator(small_config(image_size=32))(examples)


def from_the_model(labels: list[int], request: pytest.FixtureRequest) -> None:
    request.getfixturevalue("model")(torch.randn(len(labels), 3, 32, 32), labels=torch.tensor(labels))


def from_predictions(labels: list[int]) -> None:
    n = len(labels)
    check_predictions(np.zeros((n, 100)), np.zeros((n, 20)), np.asarray(labels), np.zeros(n, int), small_config())


# Every user of the check: (how it is given labels, the name and row its message gives the first bad label).
LABEL_USERS = {
    "column": (lambda labels, _: from_a_column(labels), "column 'fine_label' of split 'train'", "row 1"),
    "collator": (lambda labels, _: from_the_collator(labels), "labels", "the example with index=11"),
    "model": (from_the_model, "labels", "row 1"),
    "predictions": (lambda labels, _: from_predictions(labels), "labels", "row 1"),
}


@pytest.mark.parametrize("user", list(LABEL_USERS))
def test_every_label_is_checked_by_the_one_check_with_its_message(user, request):
    give, name, row = LABEL_USERS[user]
    give([0, 99, 5], request)
    expected = f"{name} must be in [0, 100), got 100 at {row} (2 of 3 rows out of range)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        give([0, 100, -1], request)
