"""Reading a two-level hierarchy from disk: an image folder tree `superclass/class/image` (optionally under
split-named folders) and a hierarchy file (JSON or CSV, fine name -> coarse name)."""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from collections import Counter
from collections.abc import Collection
from typing import Any

from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from transformers.utils import logging

from hierarchical.data.arguments import DataArguments
from hierarchical.data.label_columns import normalise_name, normalised_names

logger = logging.get_logger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_NAMES_SHOWN = 10


def shorten_names(names: list[str]) -> str:
    """The first names of a list, quoted, with '...' when there are more."""
    return ", ".join(repr(name) for name in names[:MAX_NAMES_SHOWN]) + (" ..." if len(names) > MAX_NAMES_SHOWN else "")


# ----------------------------------------------------------------------------------------------------------------
# Image folder trees
# ----------------------------------------------------------------------------------------------------------------


HIDDEN_PREFIXES = (".", "__")  # .DS_Store, macOS AppleDouble `._name` files, .git, __MACOSX, __pycache__


def walk_files(root: str, max_depth: int | None = None) -> list[tuple[str, ...]]:
    """Every file under `root` as its path parts relative to `root`, in sorted order: the one walk of a folder tree
    that every reader uses (at most `max_depth` parts deep when given).

    Links to folders are followed; a link to a folder that contains it is refused, naming the link. Hidden names
    (`HIDDEN_PREFIXES`: `.name`, AppleDouble `._name`, `__MACOSX`) are skipped, files and folders alike, with their
    count in the log; so are links that point nowhere, counted too. Folders without files (an empty class folder,
    one with only hidden files) are named in a warning: they give no class; so are links that reach a folder read
    under another name too (its files are read twice).
    """
    files: list[tuple[str, ...]] = []
    skipped: list[str] = []
    broken: list[str] = []
    empty: list[str] = []
    reached: dict[str, str] = {}  # real folder -> the first path it was read under
    twice: list[tuple[str, str]] = []

    def visit(folder: str, parts: tuple[str, ...], ancestors: frozenset[str]) -> None:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            if entry.name.startswith(HIDDEN_PREFIXES):
                skipped.append(os.path.join(*parts, entry.name))
            elif entry.is_dir():  # follows a link
                if max_depth is not None and len(parts) + 1 >= max_depth:
                    continue  # its files would lie deeper than asked
                real = os.path.realpath(entry.path)
                if real in ancestors:
                    raise ValueError(
                        f"{entry.path!r} is a link to {real!r}, a folder that contains it: reading it would never "
                        "end; remove the link"
                    )
                here = os.path.join(*parts, entry.name)
                if real in reached:
                    twice.append((here, reached[real]))
                reached.setdefault(real, here)
                found = len(files)
                visit(entry.path, (*parts, entry.name), ancestors | {real})
                if len(files) == found:
                    empty.append(os.path.join(*parts, entry.name))
            elif entry.is_file():
                files.append((*parts, entry.name))
            elif entry.is_symlink():
                broken.append(entry.path)

    visit(root, (), frozenset({os.path.realpath(root)}))
    if skipped:  # a warning when some look like images (AppleDouble `._photo.png`), else a note
        like_images = [name for name in skipped if name.lower().endswith(IMAGE_EXTENSIONS)]
        (logger.warning if like_images else logger.info)(
            f"Skipped {len(skipped)} hidden files and folders of {root!r} (names starting with '.', such as macOS "
            f"'._*' files, or '__'), e.g. {(like_images or skipped)[0]!r}"
        )
    if broken:
        logger.warning(f"Skipped {len(broken)} links of {root!r} that point nowhere, e.g. {broken[0]!r}")
    if twice:
        logger.warning(
            f"{len(twice)} folders of {root!r} are links to a folder read under another name as well, so its files "
            f"are read twice: e.g. {twice[0][0]!r} and {twice[0][1]!r}"
        )
    if empty:
        logger.warning(f"{len(empty)} folders of {root!r} hold no files (they give no class): {shorten_names(empty)}")
    return files


def image_folder_layout(
    path: str, split_names: tuple[str, ...], files: list[tuple[str, ...]] | None = None
) -> tuple[str, dict[str, list[tuple[str, ...]]]]:
    """How the images under `path` are laid out: `("classes", {split: [parts, ...]})` for `class/image`, or
    `("tree", ...)` for `superclass/class/image`, each optionally under top folders named after splits (all of
    them, else the data is all training data). `parts` are the image's path parts relative to `path`.

    Images directly in `path` (or in a split folder) belong to no class: a warning names them and they are not read.
    Any other mix of depths is refused with a message that names an image and what is wrong with its place: an
    image directly inside a superclass folder, images in subfolders of a class folder, deeper nesting.
    """
    files = walk_files(path) if files is None else files  # `files`: this walk of `path`, made already
    images = [parts for parts in files if parts[-1].lower().endswith(IMAGE_EXTENSIONS)]
    if len(images) < len(files):
        others = [os.path.join(*parts) for parts in files if not parts[-1].lower().endswith(IMAGE_EXTENSIONS)]
        logger.info(f"Not reading {len(others)} files of {path!r} that are not images by name, e.g. {others[0]!r}")
    nested = [parts for parts in images if len(parts) > 1]
    tops = sorted({parts[0] for parts in nested})
    in_splits = bool(tops) and all(name in split_names for name in tops) and any(len(p) > 2 for p in nested)
    skip = 1 if in_splits else 0  # path parts before the class or superclass folder
    loose = [parts for parts in images if len(parts) <= 1 + skip]
    if loose:
        logger.warning(
            f"Not reading {len(loose)} images of {path!r} that are in no class folder, e.g. {os.path.join(*loose[0])!r}"
        )
    placed = [parts for parts in images if len(parts) > 1 + skip]
    if not placed:
        raise ValueError(f"image folder {path!r} has no images in class subfolders")
    depths = {len(parts) - skip for parts in placed}
    if depths not in ({2}, {3}):
        raise ValueError(f"the image folder {path!r} mixes layouts: {_misplaced(placed, skip)}")
    kind = "classes" if depths == {2} else "tree"
    by_split: dict[str, list[tuple[str, ...]]] = {}
    for parts in placed:
        by_split.setdefault(parts[0] if in_splits else split_names[0], []).append(parts)
    return kind, by_split


def _misplaced(images: list[tuple[str, ...]], skip: int) -> str:
    """What is wrong with the place of one image of a folder whose images lie at several depths."""
    depth_of = {parts: len(parts) - skip for parts in images}
    common = Counter(depth_of.values()).most_common(1)[0][0]
    odd = next(parts for parts in images if depth_of[parts] != common)
    shown, folder = os.path.join(*odd), os.path.join(*odd[: skip + 1])
    if common == 3 and depth_of[odd] == 2:
        return (
            f"the image {shown!r} is directly inside the superclass folder {folder!r}, whose other images are in "
            "class folders (superclass/class/image); move it into one of its class folders, or, if "
            f"{folder!r} is a class folder (class/image), move the images of its subfolders into it"
        )
    if common == 3 and depth_of[odd] > 3:
        return (
            f"the image {shown!r} is in a subfolder of the class folder {os.path.join(*odd[: skip + 2])!r} "
            "(superclass/class/image expected); move it into the class folder"
        )
    if common == 2 and depth_of[odd] > 2:
        return (
            f"the image {shown!r} is in a subfolder of the class folder {folder!r} (class/image expected); move it "
            "into the class folder, or lay every class out as superclass/class/image"
        )
    return (
        f"the image {shown!r} lies {depth_of[odd]} folders deep where most lie {common} deep; expected "
        "superclass/class/image or class/image, optionally under split folders"
    )


def load_hierarchy_tree(path: str, args: DataArguments, by_split: dict[str, list[tuple[str, ...]]]) -> DatasetDict:
    """Load the images of an image folder nested as `superclass/class/image` (optionally under split-named
    folders; `by_split` as [`image_folder_layout`] found them) into string columns named by `args` (image, fine
    label, coarse label; `img`, `fine_label`, `coarse_label` by default)."""
    image, label = args.image_column_name or "img", args.label_column_name or "fine_label"
    coarse = args.coarse_label_column_name or "coarse_label"
    features = Features({image: ImageFeature(), label: Value("string"), coarse: Value("string")})
    root = os.path.abspath(path)  # absolute paths: a relative `path` is the working folder's, not the dataset's
    splits = {}
    for split, rows in by_split.items():
        columns = {
            image: [os.path.join(root, *parts) for parts in rows],
            label: [normalise_name(parts[-2]) for parts in rows],
            coarse: [normalise_name(parts[-3]) for parts in rows],
        }
        splits[split] = Dataset.from_dict(columns, features=features)
    logger.info(f"Image folder tree {path!r}: { {split: len(d) for split, d in splits.items()} } images")
    return DatasetDict(splits)


# ----------------------------------------------------------------------------------------------------------------
# Hierarchy files
# ----------------------------------------------------------------------------------------------------------------


def read_hierarchy_file(path: str, data_classes: Collection[str]) -> dict[str, str]:
    """Read a hierarchy file into `{fine name: coarse name}`, in the file's order, names normalised (NFC).

    The file is UTF-8 text (a byte-order mark is ignored); another encoding is refused. JSON: an object
    `{"fine": "coarse", ...}` or `{"coarse": ["fine", ...], ...}`, each key once. CSV: two columns, fine name then
    coarse name, one row per class (cells stripped of surrounding spaces); the first row is a header, whatever its
    two names, when its first cell is not a class of the data (`data_classes`), and it is refused as ambiguous when
    its second cell is also the superclass of other rows. Names that print the same after normalisation
    ([`normalised_names`]) and empty names are refused. Every refusal names the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--hierarchy_file {path!r}: no such file")
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".json", ".csv"):
        raise ValueError(f"--hierarchy_file {path!r} must be a .json or .csv file")
    text = _utf8_text(path)
    pairs = _json_pairs(text, path) if extension == ".json" else _csv_pairs(text, path, data_classes)
    mapping: dict[str, str] = {}
    for fine, coarse in pairs:
        fine, coarse = normalise_name(fine), normalise_name(coarse)
        if not fine or not coarse:
            raise ValueError(
                f"--hierarchy_file {path!r} gives an empty name: class {fine!r} under superclass {coarse!r}"
            )
        if mapping.get(fine, coarse) != coarse:
            raise ValueError(
                f"--hierarchy_file {path!r} puts the class {fine!r} under two superclasses: {mapping[fine]!r} and "
                f"{coarse!r}"
            )
        mapping[fine] = coarse
    for level, names in (("classes", list(mapping)), ("superclasses", list(dict.fromkeys(mapping.values())))):
        normalised_names(names, f"--hierarchy_file {path!r} ({level})")  # names that print the same are refused
    return mapping


def _utf8_text(path: str) -> str:
    """The text of `path` read as UTF-8, without a byte-order mark; `ValueError` naming the file otherwise."""
    with open(path, "rb") as file:
        content = file.read()
    for mark, encoding in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                           (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):  # fmt: skip
        if content.startswith(mark):
            raise ValueError(f"--hierarchy_file {path!r} is {encoding} text; save it as UTF-8")
    if b"\x00" in content:  # no UTF-8 text holds a NUL byte; UTF-16 and UTF-32 text does, also without a BOM
        raise ValueError(
            f"--hierarchy_file {path!r} holds NUL bytes (first at offset {content.index(0)}): it is UTF-16 or "
            "UTF-32 text without a byte-order mark, or not text; save it as UTF-8"
        )
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"--hierarchy_file {path!r} is not UTF-8 text (byte {content[error.start]:#04x} at offset "
            f"{error.start}); save it as UTF-8"
        ) from None


def _json_pairs(text: str, path: str) -> list[tuple[str, str]]:
    """`(fine, coarse)` pairs of a JSON hierarchy file, in either shape; duplicate keys refused."""

    def unique_keys(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, str] = {}
        for key, _ in items:
            normal = normalise_name(key)
            if normal in seen:
                raise ValueError(
                    f"--hierarchy_file {path!r} has the key {key!r} twice in one object"
                    + ("" if key == seen[normal] else f" (written two ways: {ascii(seen[normal])} and {ascii(key)})")
                    + "; JSON readers keep only one of them"
                )
            seen[normal] = key
        return dict(items)

    try:
        content = json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as error:
        raise ValueError(f"--hierarchy_file {path!r} is not valid JSON: {error}") from None
    if not isinstance(content, dict) or not content:
        got = "an empty object" if content == {} else f"a {type(content).__name__}"
        raise ValueError(f"--hierarchy_file {path!r} must hold a non-empty JSON object, got {got}")
    if all(isinstance(value, str) for value in content.values()):
        return list(content.items())
    if all(isinstance(value, list) and all(isinstance(v, str) for v in value) for value in content.values()):
        return [(fine, coarse) for coarse, fines in content.items() for fine in fines]

    first_is_name = isinstance(next(iter(content.values())), str)
    odd = [  # values of neither shape first, then values of the other shape than the first value's
        *((key, value) for key, value in content.items() if not isinstance(value, (str, list))),
        *(
            (key, value)
            for key, value in content.items()
            if isinstance(value, list) and not all(isinstance(v, str) for v in value)
        ),
        *((key, value) for key, value in content.items() if isinstance(value, str) != first_is_name),
    ]
    key, value = odd[0]
    raise ValueError(
        f"--hierarchy_file {path!r}: the values must all be superclass names (fine -> coarse) or all lists of "
        f"class names (coarse -> [fine, ...]); the value of {key!r} is {json.dumps(value)[:100]}"
    )


def _csv_pairs(text: str, path: str, data_classes: Collection[str]) -> list[tuple[str, str]]:
    """`(fine, coarse)` rows of a CSV hierarchy file; a first row naming no class of the data is its header."""
    try:
        rows = [row for row in csv.reader(io.StringIO(text, newline="")) if any(cell.strip() for cell in row)]
    except csv.Error as error:
        raise ValueError(f"--hierarchy_file {path!r} is not valid CSV: {error}") from None
    for number, row in enumerate(rows, start=1):
        if len(row) != 2:
            raise ValueError(
                f"--hierarchy_file {path!r}: row {number} has {len(row)} cells {row}; expected 2 (class,superclass), separated by a comma"
            )
    classes = {normalise_name(name) for name in data_classes}
    header = None
    if rows and normalise_name(rows[0][0]) not in classes:
        if normalise_name(rows[0][1]) in {normalise_name(coarse) for _, coarse in rows[1:]}:
            raise ValueError(
                f"--hierarchy_file {path!r}: the first row {rows[0]} names no class of the data, as a header row "
                f"does, but {rows[0][1].strip()!r} is the superclass of other rows, as in a class row. Put a header "
                "row (class,superclass) on top, or move that class to a later row"
            )
        header, rows = rows[0], rows[1:]
        logger.info(f"--hierarchy_file {path!r}: the first row {header} is its header (no class of the data)")
    if not rows:
        raise ValueError(f"--hierarchy_file {path!r} holds no rows" + (f" after its header {header}" if header else ""))
    return [(fine.strip(), coarse.strip()) for fine, coarse in rows]


__all__ = [
    "image_folder_layout",
    "load_hierarchy_tree",
    "read_hierarchy_file",
    "shorten_names",
    "walk_files",
]
