"""The two-level hierarchy of a dataset: discovered from the data, checked against a model, turned into a config.

A dataset names its hierarchy in one of three ways:

* an image folder tree `superclass/class/image` (optionally under `train/`, `validation/`, `test/` folders),
  read by `load_hierarchy_tree` into string columns;
* a fine and a coarse label column (`ClassLabel` names, plain strings or integers): each fine label must have
  exactly one coarse label across all splits;
* a hierarchy file (`--hierarchy_file`, JSON or CSV: fine name -> coarse name) for data with fine labels only.

The folder tree and the hierarchy file are read in `hierarchical/data/hierarchy_files.py`.

`discover_hierarchy` returns a [`Hierarchy`] (the CIFAR-100 tables when the names are CIFAR-100's), or `None`
when the data names no hierarchy (plain integer labels, or class names without superclasses): the model's config
then supplies it, CIFAR-100 for a fresh model.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets import DatasetDict
from transformers.utils import logging

from configuration_hierarchical import (
    CIFAR100_COARSE_LABELS,
    CIFAR100_FINE_LABELS,
    CIFAR100_FINE_TO_COARSE,
    HierarchicalEfficientNetV2Config,
)
from hierarchical.data.arguments import DataArguments
from hierarchical.data.cifar100 import are_cifar100_names, is_cifar100_hierarchy
from hierarchical.data.hierarchy_files import MAX_NAMES_SHOWN, read_hierarchy_file, shorten_names
from hierarchical.data.label_columns import are_integer_names, column_names, data_columns, normalised_names

if TYPE_CHECKING:
    from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification

logger = logging.get_logger(__name__)

HEAD_PREFIXES = ("coarse_classifier.", "fine_classifier.")


@dataclass(frozen=True)
class Hierarchy:
    """Fine class names, superclass names and the superclass index of every fine class.

    Args:
        fine_names (`tuple[str, ...]`): fine class names; the position is the class id.
        coarse_names (`tuple[str, ...]`): superclass names; the position is the superclass id.
        fine_to_coarse (`tuple[int, ...]`): superclass id of every fine class.

    Example:

    ```python
    >>> hierarchy = Hierarchy.from_pairs([("cat", "animal"), ("car", "vehicle"), ("dog", "animal")])
    >>> hierarchy.fine_names, hierarchy.coarse_names, hierarchy.fine_to_coarse
    (('car', 'cat', 'dog'), ('animal', 'vehicle'), (1, 0, 0))
    ```
    """

    fine_names: tuple[str, ...]
    coarse_names: tuple[str, ...]
    fine_to_coarse: tuple[int, ...]

    @classmethod
    def from_pairs(
        cls,
        pairs: list[tuple[str, str]],
        fine_order: list[str] | None = None,
        coarse_order: list[str] | None = None,
    ) -> Hierarchy:
        """Build from `(fine, coarse)` name pairs (each fine name once). Classes follow `fine_order` and
        superclasses `coarse_order` (names missing there are left out); both default to sorted names."""
        parent = dict(pairs)
        fine = [name for name in (fine_order or sorted(parent)) if name in parent]
        coarse_used = set(parent.values())
        coarse = [name for name in (coarse_order or sorted(coarse_used)) if name in coarse_used]
        for level, names in (("class", fine), ("superclass", coarse)):
            if any(not name.strip() for name in names):
                raise ValueError(f"a {level} name is empty or blank: {names[:MAX_NAMES_SHOWN]}")
            normalised_names(names, f"the {level} names of the hierarchy")  # two that print the same are refused
        coarse_id = {name: index for index, name in enumerate(coarse)}
        return cls(tuple(fine), tuple(coarse), tuple(coarse_id[parent[name]] for name in fine))

    @classmethod
    def cifar100(cls) -> Hierarchy:
        """The official CIFAR-100 tables (the config's defaults)."""
        return cls(tuple(CIFAR100_FINE_LABELS), tuple(CIFAR100_COARSE_LABELS), tuple(CIFAR100_FINE_TO_COARSE))

    @classmethod
    def from_config(cls, config: HierarchicalEfficientNetV2Config) -> Hierarchy:
        """The hierarchy a config describes."""
        fine = tuple(config.id2label[i] for i in range(config.num_labels))
        return cls(fine, tuple(config.coarse_label_names), tuple(config.fine_to_coarse))

    @property
    def parents(self) -> dict[str, str]:
        """Fine name -> superclass name."""
        return {fine: self.coarse_names[c] for fine, c in zip(self.fine_names, self.fine_to_coarse, strict=True)}

    def config_kwargs(self) -> dict:
        """The config fields that describe this hierarchy: `id2label`, `fine_to_coarse`, `coarse_label_names`."""
        return {
            "id2label": dict(enumerate(self.fine_names)),
            "fine_to_coarse": list(self.fine_to_coarse),
            "coarse_label_names": list(self.coarse_names),
        }

    def describe(self) -> str:
        """`N classes in M superclasses (sizes ...)`, for logs and messages."""
        sizes = Counter(self.fine_to_coarse)
        shown = ", ".join(f"{self.coarse_names[c]}: {sizes[c]}" for c in range(len(self.coarse_names))[:8])
        more = " ..." if len(self.coarse_names) > 8 else ""
        return f"{len(self.fine_names)} classes in {len(self.coarse_names)} superclasses ({shown}{more})"

    def mismatch(self, config: HierarchicalEfficientNetV2Config) -> str | None:
        """Why a model with `config` cannot take data of this hierarchy, or None when every class of the data is a
        class of the model, under the same superclass name."""
        model_parents = Hierarchy.from_config(config).parents
        missing = [name for name in self.fine_names if name not in model_parents]
        moved = [
            (n, p, model_parents[n]) for n, p in self.parents.items() if n in model_parents and model_parents[n] != p
        ]
        if not missing and not moved:
            return None
        reasons = [
            f"the data has {self.describe()}; the model has {config.num_labels} classes in "
            f"{config.num_coarse_labels} superclasses"
        ]
        if missing:
            reasons.append(f"{len(missing)} classes of the data are not classes of the model: {shorten_names(missing)}")
        if moved:
            examples = "; ".join(
                f"{n!r} under {data!r} in the data, {model!r} in the model" for n, data, model in moved
            )
            reasons.append(f"{len(moved)} classes belong to another superclass: {examples[:400]}")
        return ". ".join(reasons)


# ----------------------------------------------------------------------------------------------------------------
# Discovery from the data
# ----------------------------------------------------------------------------------------------------------------


def discover_hierarchy(raw: DatasetDict, args: DataArguments) -> Hierarchy | None:
    """The hierarchy of the splits of `raw` that `args` uses (see the module docstring); None when the data names
    none (plain integer labels without a hierarchy file, or class names without superclasses)."""
    used = [name for name in (args.train_split_name, args.validation_split_name, args.test_split_name) if name in raw]
    with_file = bool(args.hierarchy_file)
    fine_order: list[str] | None = None
    coarse_order: list[str] | None = None
    pairs: Counter = Counter()  # (fine name, coarse name) -> rows, from splits with a coarse column
    fine_only: set[str] = set()  # fine names of splits without one
    file_classes: dict[tuple[str, str], set[str]] = {}  # (split, column) -> its class names, to match the file's
    for split in used:
        dataset = raw[split]
        columns = data_columns(dataset, args)
        fine_column, coarse_column = columns.label, columns.coarse
        if fine_column not in dataset.column_names or len(dataset) == 0:
            return None  # standardise_split names the problem
        fine, class_names = column_names(dataset, fine_column, split, numbers_as_names=with_file)
        if fine is None:
            distinct = np.unique(dataset.select_columns([fine_column]).with_format("numpy")[:][fine_column]).size
            logger.warning(
                f"column {fine_column!r} of split {split!r} holds plain integers ({distinct} distinct) that name no "
                "classes: they are read as CIFAR-100 class ids, under CIFAR-100's superclasses (a fresh model gets "
                "100 classes). For classes of your own, give them names (a ClassLabel or strings) or a --hierarchy_file"
            )
            return None
        fine_order = fine_order or class_names
        if with_file:
            file_classes[(split, fine_column)] = set(fine.tolist())
            if coarse_column is not None:
                logger.warning(
                    f"Superclasses come from --hierarchy_file; the column {coarse_column!r} of split {split!r} is not read"
                )
        elif coarse_column is not None:
            coarse, coarse_class_names = column_names(dataset, coarse_column, split, numbers_as_names=True)
            coarse_order = coarse_order or coarse_class_names
            pairs.update(zip(fine.tolist(), coarse.tolist(), strict=True))
        else:
            fine_only.update(fine.tolist())
    if with_file:
        return _hierarchy_from_file(args.hierarchy_file, file_classes)
    if not pairs:
        return Hierarchy.cifar100() if are_cifar100_names(fine_only) else None
    check_one_parent(pairs, columns.label, columns.coarse)
    if is_cifar100_hierarchy(pairs):
        return Hierarchy.cifar100()
    if coarse_order is None and are_integer_names(coarse for _, coarse in pairs):
        coarse_order = sorted({coarse for _, coarse in pairs}, key=int)
    return Hierarchy.from_pairs(list(pairs), fine_order=fine_order, coarse_order=coarse_order)


def _hierarchy_from_file(path: str, file_classes: dict[tuple[str, str], set[str]]) -> Hierarchy:
    """The hierarchy of `--hierarchy_file` `path`, which must list every class of the data (`(split, column)` ->
    class names); classes it lists that the data lacks are named in a warning (they stay classes of the model)."""
    data_classes = set().union(*file_classes.values())
    from_file = read_hierarchy_file(path, data_classes)
    for (split, column), classes in file_classes.items():
        unknown = sorted(classes - set(from_file))
        if unknown:
            raise ValueError(
                f"{len(unknown)} classes of column {column!r} (split {split!r}) are not in --hierarchy_file "
                f"{path!r}: {shorten_names(unknown)}"
            )
    absent = [name for name in from_file if name not in data_classes]
    if absent:  # once: the run reads the hierarchy for the model's heads and again to check the prepared splits
        logger.warning_once(
            f"{len(absent)} classes of --hierarchy_file {path!r} have no rows in the data: {shorten_names(absent)}; "
            "they remain classes of the model"
        )
    return Hierarchy.from_pairs(list(from_file.items()), fine_order=list(from_file))


def check_one_parent(pairs: Counter, fine_column: str, coarse_column: str) -> None:
    """Raise `ValueError` naming the first fine label seen under two or more superclasses, with row counts."""
    parents: dict[str, list[tuple[str, int]]] = {}
    for (fine, coarse), count in pairs.items():
        parents.setdefault(fine, []).append((coarse, count))
    conflicts = {fine: found for fine, found in parents.items() if len(found) > 1}
    if conflicts:
        fine, found = next(iter(sorted(conflicts.items())))
        found = sorted(found, key=lambda item: -item[1])
        listed = " and ".join(f"{coarse!r} ({count} rows)" for coarse, count in found)
        raise ValueError(
            f"the class {fine!r} ({fine_column!r}) appears under {len(found)} superclasses ({coarse_column!r}): "
            f"{listed}; every class needs exactly one superclass across all splits "
            f"({len(conflicts)} classes have several)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Models and class weights
# ----------------------------------------------------------------------------------------------------------------


def config_with_hierarchy(
    config: HierarchicalEfficientNetV2Config, hierarchy: Hierarchy
) -> HierarchicalEfficientNetV2Config:
    """A copy of `config` describing `hierarchy` instead (class weights, which belong to the old classes, dropped)."""
    new_config = copy.deepcopy(config)
    fields = hierarchy.config_kwargs()
    new_config.id2label = fields["id2label"]
    new_config.label2id = {name: index for index, name in fields["id2label"].items()}
    new_config.fine_to_coarse = fields["fine_to_coarse"]
    new_config.coarse_label_names = fields["coarse_label_names"]
    new_config.fine_class_weights = new_config.coarse_class_weights = None
    new_config.validate_hierarchy()
    return new_config


def reinitialize_heads(
    model: HierarchicalEfficientNetV2ForImageClassification, hierarchy: Hierarchy
) -> HierarchicalEfficientNetV2ForImageClassification:
    """A model with `model`'s backbone and new, freshly initialised heads for `hierarchy`."""
    from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification, skip_backbone_weights

    config = config_with_hierarchy(model.config, hierarchy)
    with skip_backbone_weights():  # the backbone comes from `model`
        new_model = HierarchicalEfficientNetV2ForImageClassification(config)
    backbone = {key: value for key, value in model.state_dict().items() if not key.startswith(HEAD_PREFIXES)}
    result = new_model.load_state_dict(backbone, strict=False)
    if result.unexpected_keys or any(not key.startswith(HEAD_PREFIXES) for key in result.missing_keys):
        raise ValueError(
            f"the backbone of the loaded model does not fit: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    logger.warning(f"New heads for {hierarchy.describe()}: the loaded model's heads were dropped")
    return new_model


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> list[float]:
    """Inverse-frequency weights `n / (classes present x count)` (scikit-learn's 'balanced'); 1.0 for classes
    without rows (their weight never applies)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.round(6).tolist()


def set_class_weights(
    model: HierarchicalEfficientNetV2ForImageClassification, fine: list[float], coarse: list[float]
) -> None:
    """Weight both cross-entropies of `model` by class: stored in its config (so they are saved) and buffers."""
    config = model.config
    before = config.fine_class_weights, config.coarse_class_weights
    config.fine_class_weights, config.coarse_class_weights = [float(w) for w in fine], [float(w) for w in coarse]
    try:
        config.validate_hierarchy()
    except ValueError:
        config.fine_class_weights, config.coarse_class_weights = before
        raise
    device = model.fine_to_coarse.device
    model.fine_class_weights = torch.tensor(fine, dtype=torch.float32, device=device)
    model.coarse_class_weights = torch.tensor(coarse, dtype=torch.float32, device=device)


__all__ = [
    "Hierarchy",
    "balanced_class_weights",
    "check_one_parent",
    "config_with_hierarchy",
    "discover_hierarchy",
    "reinitialize_heads",
    "set_class_weights",
]
