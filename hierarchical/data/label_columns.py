"""Which columns hold the images and labels, and how class names are read wherever they come from: label columns
(`ClassLabel` names, strings, integers), folder names and hierarchy files.

Every name is normalised before it is compared: Unicode normal form C, surrounding spaces removed. So `café` typed
with a combining accent and with a precomposed one is one class, and so are `mug` and `mug `. Case is kept: `Mug`
and `mug` are two classes. A table of names (a `ClassLabel`, the classes or superclasses of a hierarchy) in which two
names are one after normalisation, or differ only by invisible characters (zero-width spaces, joiners, direction
marks), is refused: they would be two classes that print the same.
The known misspelling of the published CIFAR-100 table (`cra` for `crab`) is corrected only in that table.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute
from datasets import ClassLabel, Dataset
from datasets import Image as ImageFeature

from configuration_hierarchical import check_label_range
from hierarchical.data.cifar100 import is_cifar100_table

# Known misspellings of class names in published dataset metadata (uoft-cs/cifar100 spells "crab" as "cra").
LABEL_NAME_ALIASES = {"cra": "crab"}


def normalise_name(name: str) -> str:
    """A class or superclass name in Unicode normal form C without surrounding spaces, the form every comparison of
    names uses."""
    return unicodedata.normalize("NFC", str(name)).strip()


def printed_form(name: str) -> str:
    """`name` normalised and without invisible format characters (Unicode category Cf: zero-width spaces and
    joiners, direction marks, byte-order marks): names with the same printed form look the same."""
    return "".join(char for char in normalise_name(name) if unicodedata.category(char) != "Cf")


def normalised_names(names: Iterable[str], where: str) -> list[str]:
    """`names` (a table of distinct names) normalised ([`normalise_name`]); `ValueError` naming `where` when two of
    them are the same name written two ways (Unicode forms, surrounding spaces, invisible characters): they would be
    two classes that print the same."""
    seen: dict[str, str] = {}
    result = []
    for name in names:
        printed = printed_form(name)
        if printed in seen:
            raise ValueError(
                f"{where} lists {seen[printed]!r} and {name!r}, the same name written two ways "
                f"({ascii(seen[printed])} and {ascii(name)}: Unicode form, surrounding spaces or invisible "
                "characters); keep one of them"
            )
        seen[printed] = name
        result.append(normalise_name(name))
    return result


def are_integer_names(names: Iterable[str]) -> bool:
    """Whether every name is the decimal form of an integer: the names that plain integer labels are read as."""
    return all(name.lstrip("-").isdigit() for name in names)


def class_label_names(feature: Any, where: str) -> list[str] | None:
    """The class names of a `ClassLabel` feature, normalised; `None` for other features and for the placeholder
    names "0", "1", ... of `ClassLabel(num_classes=n)`. The CIFAR-100 table published with `cra` reads `crab`."""
    if not isinstance(feature, ClassLabel):
        return None
    if feature.names == [str(i) for i in range(feature.num_classes)]:  # ClassLabel(num_classes=n) names nothing
        return None
    names = list(feature.names)
    corrected = [LABEL_NAME_ALIASES.get(name, name) for name in names]
    if is_cifar100_table(corrected):
        names = corrected
    return normalised_names(names, f"the ClassLabel of {where}")


def column_values(dataset: Dataset, column: str, where: str) -> np.ndarray:
    """One label column as a numpy array; `ValueError` naming `where` and the first row when a value is missing."""
    values = dataset.select_columns([column]).with_format("arrow")[:][column]
    if values.null_count:
        missing = np.flatnonzero(pyarrow.compute.is_null(values).to_numpy(zero_copy_only=False))
        raise ValueError(
            f"{where} has {missing.size} rows without a label (null); first: row {missing[0]}. Fill or remove them"
        )
    return dataset.select_columns([column]).with_format("numpy")[:][column]


def column_names(
    dataset: Dataset, column: str, split_name: str, numbers_as_names: bool = False
) -> tuple[np.ndarray | None, list[str] | None]:
    """A label column read as names: `(per-row names, the ClassLabel's names or None)`.

    `ClassLabel` ids become their names, strings stay names, plain integers (and a `ClassLabel(num_classes=n)`)
    become their decimal strings when `numbers_as_names` and give `(None, None)` otherwise. Names are normalised
    ([`normalise_name`]). `ValueError` naming the column and split for a null, an id outside the `ClassLabel`, values
    that are neither ids nor names, or two names that differ only by invisible characters.
    """
    where = f"column {column!r} of split {split_name!r}"
    feature = dataset.features[column]
    values = column_values(dataset, column, where)
    names = class_label_names(feature, where)
    if names is not None:
        check_label_range(values, len(names), where)
        return np.asarray(names, dtype=object)[values], names
    if values.dtype.kind in "OUS":
        unique, inverse = np.unique(values.astype(str), return_inverse=True)
        normal = np.asarray([normalise_name(name) for name in unique], dtype=object)
        normalised_names(sorted(set(normal)), where)  # names that differ only by invisible characters are refused
        return normal[inverse], None
    if values.dtype.kind == "f":
        odd = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        found = (
            f"row {odd[0]} holds {values[odd[0]]}"
            + (" (a missing label, as pandas writes one)" if np.isnan(values[odd[0]]) else "")
            if odd.size
            else "all are whole numbers: store them as integers"
        )
        raise ValueError(f"{where} must hold class ids or class names, got {feature}: {found}")
    if values.dtype.kind not in "iu":
        raise ValueError(f"{where} must hold class ids or class names, got {feature}")
    if numbers_as_names:
        return values.astype(str).astype(object), None
    return None, None


def ids_from_names(names: np.ndarray, target_names: list[str], where: str) -> np.ndarray:
    """Map (normalised) names onto positions in `target_names`; `ValueError` naming `where` and unknown names."""
    unique_names, inverse = np.unique(np.asarray(names).astype(str), return_inverse=True)
    target_ids = {normalise_name(name): i for i, name in enumerate(target_names)}
    unknown = [str(name) for name in unique_names if name not in target_ids]
    if unknown:
        raise ValueError(
            f"{len(unknown)} class names in {where} are not among the config's {len(target_names)} labels: "
            f"{unknown[:20]}{' ...' if len(unknown) > 20 else ''}"
        )
    return np.array([target_ids[name] for name in unique_names], dtype=np.int64)[inverse].reshape(np.shape(names))


# Column names found without an option, in the order `datasets` users write them.
IMAGE_COLUMN_NAMES = ("image", "img")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label")
COARSE_COLUMN_NAMES = ("coarse_label", "coarse_labels")


@dataclass(frozen=True)
class DataColumns:
    """The columns of a split that hold the images, the class labels and the superclass labels.

    Args:
        image (`str`): the image column.
        label (`str`): the class (fine label) column.
        coarse (`str` or `None`): the superclass column; `None` when the split has none.
        found (`tuple[str, ...]`): which of "image", "label", "coarse" were found rather than named by an option.
    """

    image: str
    label: str
    coarse: str | None
    found: tuple[str, ...] = ()

    def describe(self) -> str:
        """`images 'img', classes 'fine_label', superclasses 'coarse_label' (found by name or feature: ...)`."""
        text = f"images {self.image!r}, classes {self.label!r}, superclasses " + (
            repr(self.coarse) if self.coarse else "none (from the hierarchy)"
        )
        if self.found:
            text += f" (found: {', '.join(self.found)}; --image_column_name etc. choose others)"
        return text


def data_columns(dataset: Dataset, args: Any) -> DataColumns:
    """The image, class and superclass columns of `dataset`: those `args` names (`image_column_name`,
    `label_column_name`, `coarse_label_column_name`), else found as `datasets` users expect.

    Images: the one `Image` feature, else the one column named `image` or `img`. Classes: the one column named
    `label`, `labels` or `fine_label`, else the one `ClassLabel` feature other than the superclass column.
    Superclasses: `coarse_label` or `coarse_labels` when present. Data read by the `imagefolder` builder has
    `image` and `label`. `ValueError` naming the candidates when there are several, or the columns when none fits.
    """
    names = list(dataset.column_names)
    if dataset.info.builder_name == "imagefolder":  # its columns are always "image" and "label"
        return DataColumns("image", "label", None)
    found = []
    coarse = args.coarse_label_column_name
    if coarse is None:
        coarse = next((name for name in COARSE_COLUMN_NAMES if name in names), None)
        found += ["superclasses"] if coarse else []
    elif coarse not in names:
        coarse = None
    image = args.image_column_name
    if image is None:
        found.append("images")
        typed = [name for name in names if isinstance(dataset.features[name], ImageFeature)]
        named = [name for name in IMAGE_COLUMN_NAMES if name in names]
        image = _one_candidate(
            "image", typed if typed else named, [name for name in typed if name in named], names, "--image_column_name"
        )
    label = args.label_column_name
    if label is None:
        found.append("classes")
        named = [name for name in LABEL_COLUMN_NAMES if name in names]
        typed = [n for n in names if isinstance(dataset.features[n], ClassLabel) and n not in (coarse, image)]
        label = _one_candidate("class label", named or typed, [], names, "--label_column_name")
    return DataColumns(image, label, coarse, tuple(found))


def _one_candidate(kind: str, candidates: list[str], preferred: list[str], columns: list[str], option: str) -> str:
    """The one candidate column (or the one preferred among several); `ValueError` naming them otherwise."""
    if len(candidates) == 1:
        return candidates[0]
    if len(preferred) == 1:
        return preferred[0]
    if not candidates:
        raise ValueError(f"no {kind} column among the columns {columns}; name it with {option}")
    raise ValueError(f"several columns could be the {kind} column: {candidates}; name one with {option}")


__all__ = [
    "are_integer_names",
    "COARSE_COLUMN_NAMES",
    "DataColumns",
    "IMAGE_COLUMN_NAMES",
    "LABEL_COLUMN_NAMES",
    "data_columns",
    "LABEL_NAME_ALIASES",
    "class_label_names",
    "column_names",
    "column_values",
    "ids_from_names",
    "normalise_name",
    "normalised_names",
    "printed_form",
]
