"""The questions "is this CIFAR-100?": each answered in one place (`hierarchical/data/cifar100.py`)."""

from __future__ import annotations

import pytest

from configuration_hierarchical import CIFAR100_COARSE_LABELS, CIFAR100_FINE_LABELS, CIFAR100_FINE_TO_COARSE
from conftest import small_config
from hierarchical.data.cifar100 import (
    are_cifar100_names,
    is_cifar100_config,
    is_cifar100_hierarchy,
    is_cifar100_table,
)

APPLE_PARENT = CIFAR100_COARSE_LABELS[CIFAR100_FINE_TO_COARSE[0]]  # "fruit_and_vegetables"


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (CIFAR100_FINE_LABELS, True),
        (tuple(CIFAR100_FINE_LABELS), True),
        (CIFAR100_FINE_LABELS[::-1], False),  # the same names, other ids
        (CIFAR100_FINE_LABELS[:99], False),
        (["cra" if name == "crab" else name for name in CIFAR100_FINE_LABELS], False),  # corrected by the reader
    ],
)
def test_the_class_table_is_cifar100s_only_in_its_order(names, expected):
    assert is_cifar100_table(names) is expected


@pytest.mark.parametrize(
    ("names", "expected"),
    [({"apple", "crab"}, True), (CIFAR100_FINE_LABELS, True), (set(), False), ({"apple", "café"}, False)],
)
def test_cifar100_names_are_some_cifar100_classes_and_nothing_else(names, expected):
    assert are_cifar100_names(names) is expected


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([("apple", APPLE_PARENT)], True),
        ([("apple", str(CIFAR100_FINE_TO_COARSE[0]))], True),  # a superclass given by its index
        ([("apple", APPLE_PARENT), ("crab", "vehicles_1")], False),  # a CIFAR-100 class under another superclass
        ([("café", APPLE_PARENT)], False),
        ([], False),
    ],
)
def test_a_cifar100_hierarchy_puts_cifar100_classes_under_their_own_superclasses(pairs, expected):
    assert is_cifar100_hierarchy(pairs) is expected


def test_a_cifar100_config_has_the_table_and_its_superclasses():
    assert is_cifar100_config(small_config())
    other = small_config(id2label={0: "cat", 1: "car"}, fine_to_coarse=[0, 1], coarse_label_names=["a", "b"])
    assert not is_cifar100_config(other)
    renamed = small_config(coarse_label_names=[f"group {i}" for i in range(20)])  # names of superclasses not compared
    assert is_cifar100_config(renamed)
