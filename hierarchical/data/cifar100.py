"""Whether class names, a hierarchy or a model's classes are CIFAR-100's: the one place that decides it. The
questions differ, so each has its own function, side by side:

- [`is_cifar100_table`]: the class names in id order are CIFAR-100's table (so the class ids are CIFAR-100's);
- [`are_cifar100_names`]: some class names, each of them a CIFAR-100 class (any order, any subset);
- [`is_cifar100_hierarchy`]: some `(class, superclass)` pairs, each a CIFAR-100 class under its CIFAR-100
  superclass (its name, or its index written as a string);
- [`is_cifar100_config`]: a model's classes are CIFAR-100's table, each under its CIFAR-100 superclass index.

The tables themselves live in `configuration_hierarchical.py`, the defaults of every config.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from configuration_hierarchical import (
    CIFAR100_COARSE_LABELS,
    CIFAR100_FINE_LABELS,
    CIFAR100_FINE_TO_COARSE,
    HierarchicalEfficientNetV2Config,
)

# CIFAR-100 class name -> superclass index
CIFAR100_PARENT = dict(zip(CIFAR100_FINE_LABELS, CIFAR100_FINE_TO_COARSE, strict=True))


def is_cifar100_table(names: Sequence[str]) -> bool:
    """Whether `names`, in id order, are exactly CIFAR-100's 100 class names in its order."""
    return list(names) == CIFAR100_FINE_LABELS


def are_cifar100_names(names: Iterable[str]) -> bool:
    """Whether `names` hold at least one name and every one of them is a CIFAR-100 class name."""
    names = set(names)
    return bool(names) and names <= CIFAR100_PARENT.keys()


def is_cifar100_hierarchy(pairs: Iterable[tuple[str, str]]) -> bool:
    """Whether `pairs` of `(class name, superclass)` hold at least one pair and each is a CIFAR-100 class under its
    CIFAR-100 superclass, named or given by its index as a string (`"4"`)."""
    pairs = list(pairs)
    return bool(pairs) and all(
        fine in CIFAR100_PARENT
        and coarse in (CIFAR100_COARSE_LABELS[CIFAR100_PARENT[fine]], str(CIFAR100_PARENT[fine]))
        for fine, coarse in pairs
    )


def is_cifar100_config(config: HierarchicalEfficientNetV2Config) -> bool:
    """Whether `config` holds CIFAR-100's classes in CIFAR-100's order, each under its CIFAR-100 superclass index
    (the superclass names are not compared)."""
    fine_names = [config.id2label[i] for i in range(config.num_labels)]
    return is_cifar100_table(fine_names) and list(config.fine_to_coarse) == CIFAR100_FINE_TO_COARSE


__all__ = ["are_cifar100_names", "is_cifar100_config", "is_cifar100_hierarchy", "is_cifar100_table"]
