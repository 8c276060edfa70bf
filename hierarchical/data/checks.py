"""Checks and fixes of a loaded split: labels by name or id, label ranges, the coarse labels against the hierarchy,
image paths, duplicate images across splits, and the held-out validation split."""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import pyarrow
import pyarrow.compute
from datasets import ClassLabel, Dataset
from datasets import Image as ImageFeature
from transformers.utils import logging

from configuration_hierarchical import HierarchicalEfficientNetV2Config, check_label_range
from hierarchical.data.arguments import EVALUATION_SPLITS, DataArguments
from hierarchical.data.cifar100 import is_cifar100_config
from hierarchical.data.decoding import check_regular_file
from hierarchical.data.label_columns import are_integer_names, column_names, column_values, data_columns, ids_from_names
from image_processing_hierarchical import open_image

logger = logging.get_logger(__name__)


def standardise_split(
    dataset: Dataset, args: DataArguments, config: HierarchicalEfficientNetV2Config, split_name: str
) -> Dataset:
    """Validate one source split and return it with the columns `image`, `labels`, `coarse_labels`, `index`."""
    if len(dataset) == 0:
        raise ValueError(f"split {split_name!r} of {args.dataset_name!r} is empty")
    columns = data_columns(dataset, args)
    image_column, label_column = columns.image, columns.label
    missing = [column for column in (image_column, label_column) if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"split {split_name!r} has no column {missing}; its columns are {dataset.column_names}. Name the image and "
            "fine-label columns with --image_column_name and --label_column_name "
            f"(now {args.image_column_name!r} and {args.label_column_name!r})"
        )
    labels, plain_integers = _fine_labels(dataset, label_column, args, config, split_name)
    if columns.coarse is not None and args.hierarchy_file is None:
        try:
            _check_coarse_column(dataset, columns.coarse, labels, config, split_name)
        except ValueError as error:
            if not plain_integers:
                raise
            tables = "the CIFAR-100 tables" if is_cifar100_config(config) else "the model's tables"
            raise ValueError(
                f"the columns {label_column!r} and {columns.coarse!r} of split {split_name!r} hold plain integers "
                f"that name no classes, so they are read as class and superclass ids of {tables}, and they "
                f"disagree with them: {error}. For classes of your own, give them names (a ClassLabel or strings), "
                "or pass a --hierarchy_file"
            ) from None
    elif columns.coarse is None:
        logger.info(f"Split {split_name!r} has no superclass column: superclasses follow config.fine_to_coarse")
    standard = _standard_image_column(dataset, image_column, split_name)
    coarse_labels = config.fine_to_coarse_tensor().numpy()[labels]
    standard = standard.add_column("labels", labels.astype(np.int64))
    standard = standard.add_column("coarse_labels", coarse_labels.astype(np.int64))
    standard = standard.add_column("index", np.arange(len(standard), dtype=np.int64))
    standard = standard.cast_column("labels", ClassLabel(names=_fine_names(config)))
    return standard.cast_column("coarse_labels", ClassLabel(names=config.coarse_label_names))


def _fine_labels(
    dataset: Dataset, label_column: str, args: DataArguments, config: HierarchicalEfficientNetV2Config, split_name: str
) -> tuple[np.ndarray, bool]:
    """The fine labels of a split as ids of `config`, and whether they were plain integers (no names): integers
    checked against their range, class names (or `ClassLabel` ids with names) mapped through `config.label2id`."""
    names, _ = column_names(dataset, label_column, split_name, numbers_as_names=args.hierarchy_file is not None)
    if names is None:  # plain integers: ids of the config
        where = f"column {label_column!r} of split {split_name!r}"
        labels = column_values(dataset, label_column, where)
        check_label_range(labels, config.num_labels, where)
        return labels, True
    try:
        return ids_from_names(names, _fine_names(config), f"{label_column!r} of split {split_name!r}"), False
    except ValueError as error:
        raise ValueError(
            f"{error}; give the superclasses in a column (--coarse_label_column_name) or a --hierarchy_file, or "
            "use superclass/class image folders"
        ) from None


def _fine_names(config: HierarchicalEfficientNetV2Config) -> list[str]:
    """The config's class names in id order."""
    return [config.id2label[i] for i in range(config.num_labels)]


def _check_coarse_column(
    dataset: Dataset, coarse_column: str, labels: np.ndarray, config: HierarchicalEfficientNetV2Config, split_name: str
) -> None:
    """Check the superclass column of a split (ids, or names) against the superclasses of its fine `labels`."""
    numbered = are_integer_names(config.coarse_label_names)  # read from integer labels
    names, _ = column_names(dataset, coarse_column, split_name, numbers_as_names=numbered)
    if names is None:
        given = column_values(dataset, coarse_column, f"column {coarse_column!r} of split {split_name!r}")
    else:
        given = ids_from_names(names, config.coarse_label_names, f"{coarse_column!r} of split {split_name!r}")
    check_coarse_labels(given, labels, config, coarse_column, split_name)


def _standard_image_column(dataset: Dataset, image_column: str, split_name: str) -> Dataset:
    """The split's images alone, as an `Image` column named `image` (from images, image bytes or image paths)."""
    standard = dataset.select_columns([image_column])
    if image_column != "image":
        standard = standard.rename_column(image_column, "image")
    image_feature = standard.features["image"]
    if isinstance(image_feature, dict) and "bytes" in image_feature and set(image_feature) <= {"bytes", "path"}:
        return standard.cast_column("image", ImageFeature())  # a struct{bytes, path} written without metadata
    if isinstance(image_feature, ImageFeature):
        return standard
    if getattr(image_feature, "dtype", None) not in ("binary", "large_binary", "string", "large_string"):
        raise ValueError(
            f"column {image_column!r} of split {split_name!r} must hold images, image bytes or image paths, "
            f"got {standard.features['image']}"
        )
    return standard.cast_column("image", ImageFeature())


def check_coarse_labels(
    coarse_labels: np.ndarray,
    labels: np.ndarray,
    config: HierarchicalEfficientNetV2Config,
    column: str,
    split_name: str,
) -> None:
    """Raise `ValueError` (count and first example row) when coarse labels disagree with `config.fine_to_coarse`."""
    expected = config.fine_to_coarse_tensor().numpy()[labels]
    bad = np.flatnonzero(coarse_labels != expected)
    if bad.size:
        row = bad[0]
        raise ValueError(
            f"{bad.size} of {labels.size} rows of split {split_name!r} have a {column!r} that disagrees with "
            f"config.fine_to_coarse; first: row {row} has fine label {labels[row]} ({config.id2label[labels[row]]}) "
            f"and {column}={coarse_labels[row]}, but that class belongs to superclass {expected[row]} "
            f"({config.coarse_label_names[expected[row]]})"
        )


def _image_structs(dataset: Dataset) -> pyarrow.StructArray:
    """The `image` column (struct of `bytes` and `path`) as one Arrow array, read without decoding."""
    column = dataset.select_columns(["image"]).with_format("arrow")[:]["image"]
    return column.combine_chunks() if isinstance(column, pyarrow.ChunkedArray) else column


def resolve_image_paths(dataset: Dataset, root: str | None, split_name: str) -> Dataset:
    """Check the rows whose image is given by a `path` (no bytes) and make relative paths absolute.

    Each path must name a regular file whose header is an image's (read, not decoded: about 25 us a file);
    relative paths are resolved against `root`, the dataset's own folder. `ValueError` naming the row otherwise (a
    FIFO, a folder, a device, a missing file, a macOS AppleDouble `._*` file or another file that is not an image, a
    relative path without a local folder), when the data is loaded rather than when training reaches the row.
    """
    structs = _image_structs(dataset)
    without_bytes = pyarrow.compute.is_null(pyarrow.compute.struct_field(structs, "bytes")).to_numpy(
        zero_copy_only=False
    )
    rows = np.flatnonzero(without_bytes)
    if rows.size == 0:
        return dataset
    paths = pyarrow.compute.struct_field(structs, "path").take(pyarrow.array(rows)).to_pylist()
    resolved = {}
    for row, path in zip(rows.tolist(), paths, strict=True):
        if path is None:
            raise ValueError(f"row index={row} of split {split_name!r} has neither image bytes nor an image path")
        if not os.path.isabs(path):
            if root is None:
                raise ValueError(
                    f"row index={row} of split {split_name!r} gives its image as the relative path {path!r}, and "
                    "the dataset has no local folder to resolve it against"
                )
            resolved[row] = path = os.path.join(root, path)
        where = f"row index={row} of split {split_name!r}"
        if os.path.basename(path).startswith("._"):
            raise ValueError(
                f"the image of {where} is the path {path!r}, a macOS AppleDouble file ('._' name: the metadata of "
                f"{os.path.basename(path)[2:]!r}), not an image; leave such files out of the data"
            )
        open_image(path, where, max_pixels=None).close()  # its header only: a file that is no image is named now
    if not resolved:
        return dataset

    def absolute(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        return {
            "image": [
                {"bytes": value["bytes"], "path": resolved.get(index, value["path"])}
                for value, index in zip(batch["image"], indices, strict=True)
            ]
        }

    logger.info(f"Resolved {len(resolved)} relative image paths of split {split_name!r} against {root!r}")
    dataset = dataset.cast_column("image", ImageFeature(decode=False))
    dataset = dataset.map(absolute, batched=True, with_indices=True, desc=f"Resolving image paths of {split_name}")
    return dataset.cast_column("image", ImageFeature())


def image_digests(dataset: Dataset) -> list[bytes]:
    """A 128-bit BLAKE2b digest of every row's encoded image (its bytes, or the file its path names), undecoded."""
    structs = _image_structs(dataset)
    contents = pyarrow.compute.struct_field(structs, "bytes").to_pylist()
    paths = pyarrow.compute.struct_field(structs, "path").to_pylist()
    digests = []
    for row, content in enumerate(contents):
        if content is None:  # a path, checked again right before it is opened
            check_regular_file(paths[row], f"row {row} of the split being hashed")
            with open(paths[row], "rb") as file:
                content = file.read()
        digests.append(hashlib.blake2b(content, digest_size=16).digest())
    return digests


def check_duplicate_images(splits: dict[str, Dataset], drop: bool = False) -> dict[str, Dataset]:
    """Refuse evaluation images that are exact copies (same encoded bytes) of training images, or drop them.

    Compares the "validation" and "test" splits with "train"; with `drop`, the copies are removed from the
    evaluation splits and counted in the log. Rows are named by their `index` in the source split.
    """
    evaluation = [split for split in EVALUATION_SPLITS if split in splits]
    if "train" not in splits or not evaluation:
        return splits
    start = time.perf_counter()
    train_rows = {}
    for row, digest in enumerate(image_digests(splits["train"])):
        train_rows.setdefault(digest, row)
    copies = {}
    for split in evaluation:
        digests = image_digests(splits[split])
        copies[split] = [(row, train_rows[d]) for row, d in enumerate(digests) if d in train_rows]
    hashed = sum(len(splits[split]) for split in ("train", *evaluation))
    logger.info(f"Duplicate-image check: {hashed} images hashed in {time.perf_counter() - start:.2f} s")
    found = {split: pairs for split, pairs in copies.items() if pairs}
    if not found:
        return splits
    counts = ", ".join(f"{len(pairs)} of {len(splits[split])} {split} images" for split, pairs in found.items())
    if not drop:
        split, pairs = next(iter(found.items()))
        row, train_row = pairs[0]
        eval_index = splits[split].select_columns(["index"])[row]["index"]
        train_index = splits["train"].select_columns(["index"])[train_row]["index"]
        raise ValueError(
            f"{counts} are exact copies (same encoded bytes) of training images, which would leak training data "
            f"into evaluation; e.g. {split} row index={eval_index} equals train row index={train_index}. Remove them "
            "from the data, or pass --drop_duplicate_images true to drop them from the evaluation splits"
        )
    splits = dict(splits)
    for split, pairs in found.items():
        duplicated = {row for row, _ in pairs}
        splits[split] = splits[split].select([row for row in range(len(splits[split])) if row not in duplicated])
    logger.warning(f"Dropped {counts} that are exact copies of training images (--drop_duplicate_images)")
    return splits


def split_train_validation(train: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Carve `fraction` of `train` out as validation with `seed`, stratified by `labels` where possible."""
    try:
        parts = train.train_test_split(test_size=fraction, seed=seed, stratify_by_column="labels")
    except ValueError as error:  # a class with too few rows, or fewer validation rows than classes
        logger.warning(f"Cannot stratify the validation split by class ({error}); splitting at random")
        parts = train.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]
