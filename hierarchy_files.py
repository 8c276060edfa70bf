"""Reading a two-level hierarchy from disk: an image folder tree `superclass/class/image` (optionally under
split-named folders) and a hierarchy file (JSON or CSV, fine name -> coarse name)."""

from __future__ import annotations

import csv
import json
import os
from typing import TYPE_CHECKING

from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from transformers.utils import logging

from option_fields import PROJECT_LOGGER

if TYPE_CHECKING:
    from data_arguments import DataArguments

logger = logging.get_logger(f"{PROJECT_LOGGER}.{__name__}")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_NAMES_SHOWN = 10


def shorten_names(names: list[str]) -> str:
    """The first names of a list, quoted, with '...' when there are more."""
    return ", ".join(repr(name) for name in names[:MAX_NAMES_SHOWN]) + (" ..." if len(names) > MAX_NAMES_SHOWN else "")


# ----------------------------------------------------------------------------------------------------------------
# Image folder trees
# ----------------------------------------------------------------------------------------------------------------


def load_hierarchy_tree(path: str, args: DataArguments) -> DatasetDict | None:
    """Load an image folder nested as `superclass/class/image` (optionally under split-named folders) into string
    columns named by `args` (image, fine label, coarse label); None when the folder is not nested that way.

    Layouts, by the depth of the images below `path`: 3 levels with no split-named top folder is
    `superclass/class/image` (all training data); 4 levels under split-named top folders is
    `split/superclass/class/image`. `split/class/image` and `class/image` (flat class folders, read by
    `load_image_folder`) give None, also when deeper subfolders hold images too.
    """
    split_names = (args.train_split_name, args.validation_split_name, args.test_split_name)
    images = []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        relative = os.path.relpath(folder, path)
        parts = () if relative == "." else tuple(relative.split(os.sep))
        images.extend((*parts, name) for name in sorted(names) if name.lower().endswith(IMAGE_EXTENSIONS))
    depths = {len(parts) for parts in images}
    top = sorted({parts[0] for parts in images})
    split_tops = [name for name in top if name in split_names]
    if not images or max(depths) < 3 or 2 in depths or (3 in depths and len(split_tops) == len(top)):
        return None  # class/image or split/class/image: flat class folders (deeper files are not read)
    if depths == {3} and not split_tops:
        by_split = {args.train_split_name: images}
    elif depths == {4} and len(split_tops) == len(top):
        by_split = {split: [parts for parts in images if parts[0] == split] for split in top}
    else:
        examples = {depth: os.path.join(*next(p for p in images if len(p) == depth)) for depth in sorted(depths)}
        raise ValueError(
            f"the image folder {path!r} mixes layouts (images at depths {sorted(depths)}, top folders {shorten_names(top)}); "
            "expected superclass/class/image, optionally under split folders named "
            f"{list(split_names)} (split/superclass/class/image), or class/image. Examples: {examples}"
        )
    features = Features(
        {
            args.image_column_name: ImageFeature(),
            args.label_column_name: Value("string"),
            args.coarse_label_column_name: Value("string"),
        }
    )
    root = os.path.abspath(path)  # absolute paths: a relative `path` is the working folder's, not the dataset's
    splits = {}
    for split, rows in by_split.items():
        columns = {
            args.image_column_name: [os.path.join(root, *parts) for parts in rows],
            args.label_column_name: [parts[-2] for parts in rows],
            args.coarse_label_column_name: [parts[-3] for parts in rows],
        }
        splits[split] = Dataset.from_dict(columns, features=features)
    logger.info(f"Image folder tree {path!r}: { {split: len(d) for split, d in splits.items()} } images")
    return DatasetDict(splits)


# ----------------------------------------------------------------------------------------------------------------
# Hierarchy files
# ----------------------------------------------------------------------------------------------------------------


def read_hierarchy_file(path: str) -> dict[str, str]:
    """Read a hierarchy file into `{fine name: coarse name}`, in the file's order.

    JSON: an object `{"fine": "coarse", ...}` or `{"coarse": ["fine", ...], ...}`. CSV: two columns, fine name
    then coarse name, one row per class; a first row `fine,coarse` is a header.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--hierarchy_file {path!r}: no such file")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".json":
        with open(path, encoding="utf-8") as file:
            try:
                content = json.load(file)
            except json.JSONDecodeError as error:
                raise ValueError(f"--hierarchy_file {path!r} is not valid JSON: {error}") from None
        if not isinstance(content, dict) or not content:
            raise ValueError(
                f"--hierarchy_file {path!r} must hold a non-empty JSON object, got {type(content).__name__}"
            )
        if all(isinstance(value, str) for value in content.values()):
            pairs = list(content.items())
        elif all(isinstance(value, list) and all(isinstance(v, str) for v in value) for value in content.values()):
            pairs = [(fine, coarse) for coarse, fines in content.items() for fine in fines]
        else:
            raise ValueError(
                f"--hierarchy_file {path!r}: the values must all be superclass names (fine -> coarse) or all lists of "
                "class names (coarse -> [fine, ...])"
            )
    elif extension == ".csv":
        with open(path, encoding="utf-8", newline="") as file:
            rows = [row for row in csv.reader(file) if any(cell.strip() for cell in row)]
        if rows and [cell.strip().lower() for cell in rows[0]] == ["fine", "coarse"]:
            rows = rows[1:]
        for number, row in enumerate(rows, start=1):
            if len(row) != 2:
                raise ValueError(
                    f"--hierarchy_file {path!r}: row {number} has {len(row)} cells {row}; expected 2 (fine,coarse)"
                )
        pairs = [(fine.strip(), coarse.strip()) for fine, coarse in rows]
        if not pairs:
            raise ValueError(f"--hierarchy_file {path!r} holds no rows")
    else:
        raise ValueError(f"--hierarchy_file {path!r} must be a .json or .csv file")
    mapping: dict[str, str] = {}
    for fine, coarse in pairs:
        if mapping.get(fine, coarse) != coarse:
            raise ValueError(
                f"--hierarchy_file {path!r} puts the class {fine!r} under two superclasses: {mapping[fine]!r} and "
                f"{coarse!r}"
            )
        mapping[fine] = coarse
    return mapping


__all__ = ["load_hierarchy_tree", "read_hierarchy_file", "shorten_names"]
