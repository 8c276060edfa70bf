"""Any supported source turned into the prepared splits (`prepare_datasets`: the columns `image`, `labels`,
`coarse_labels` and `index`, a validation split carved with its record) and their transforms attached
(`apply_transforms`, `evaluation_inputs`)."""

from __future__ import annotations

import math
from collections.abc import Collection

from datasets import Dataset, DatasetDict
from datasets import Image as ImageFeature
from transformers.utils import logging

from configuration_hierarchical import HierarchicalEfficientNetV2Config
from hierarchical.data.arguments import SPLIT_LIMITS, DataArguments
from hierarchical.data.augmentation import build_train_transform
from hierarchical.data.checks import check_duplicate_images, resolve_image_paths, standardise_split
from hierarchical.data.collation import ImageTransform
from hierarchical.data.hierarchy import discover_hierarchy
from hierarchical.data.provenance import DataRecord, split_with_record
from hierarchical.data.sources import load_raw_datasets, only_splits, source_folder

logger = logging.get_logger(__name__)


def source_splits(args: DataArguments, splits: Collection[str] | None) -> list[str] | None:
    """The source split names to read for the prepared `splits` ("train", "validation", "test"; None for all): a
    validation split may be carved from the training one, so asking for it reads that too."""
    if splits is None:
        return None
    names = args.source_split_names()
    wanted = [names[split] for split in splits]
    return wanted + [args.train_split_name] if "validation" in splits else wanted


def planned_split_sizes(args: DataArguments, source_sizes: dict[str, int]) -> dict[str, int]:
    """The rows each split will have, from the row counts of the source's splits (`{source split name: rows}`):
    the validation share carved from "train" (as `split_train_validation` carves it) and the `max_*_samples`
    limits. `ValueError` naming `--train_val_split` when carving would leave an empty split, before any work."""
    names = args.source_split_names()
    sizes = {split: source_sizes[name] for split, name in names.items() if name in source_sizes}
    if "validation" not in sizes and "train" in sizes and args.train_val_split > 0:
        rows = sizes["train"]
        validation = math.ceil(args.train_val_split * rows)  # the rule of `datasets.Dataset.train_test_split`
        if not 0 < validation < rows:
            raise ValueError(
                f"--train_val_split {args.train_val_split} of the {rows} training rows leaves {rows - validation} "
                f"to train on and {validation} for validation; give a share that leaves both non-empty"
            )
        sizes["train"], sizes["validation"] = rows - validation, validation
    for split, option_name in SPLIT_LIMITS.items():
        limit = getattr(args, option_name)
        if split in sizes and limit is not None:
            sizes[split] = min(sizes[split], limit)
    return sizes


def prepare_datasets(
    args: DataArguments,
    config: HierarchicalEfficientNetV2Config,
    seed: int,
    raw: DatasetDict | None = None,
    splits: Collection[str] | None = None,
) -> DatasetDict:
    """The splits of [`prepare_datasets_with_record`], without the record."""
    return prepare_datasets_with_record(args, config, seed, raw, splits=splits)[0]


def prepare_datasets_with_record(
    args: DataArguments,
    config: HierarchicalEfficientNetV2Config,
    seed: int,
    raw: DatasetDict | None = None,
    recorded: DataRecord | None = None,
    recorded_in: str = "the model",
    splits: Collection[str] | None = None,
) -> tuple[DatasetDict, DataRecord | None]:
    """Load (unless `raw` is given: the output of `load_raw_datasets`), validate and standardise the source; carve
    a validation split if needed (with `recorded`, a saved model's [`DataRecord`] read from `recorded_in`: the one
    recorded, see [`split_with_record`]); apply `max_*_samples`. The data's hierarchy (`discover_hierarchy`) must fit
    `config`: every class of the data a class of the config, under the same superclass.

    `splits` (among "train", "validation", "test"; default all) are the splits wanted: the others are neither read
    (where the source allows, see [`source_splits`]) nor checked, so that evaluating on the test split never loads the
    training images.

    Returns the available splits among "train", "validation" and "test", each with the columns `image` (`Image`),
    `labels` and `coarse_labels` (`ClassLabel`) and `index` (the row's position in its source split), and the
    record of the training data (None without a training split).
    """
    wanted = None if splits is None else list(splits)
    raw = load_raw_datasets(args, source_splits(args, wanted)) if raw is None else raw
    source_names = args.source_split_names()
    if wanted is not None:
        keep = source_splits(args, wanted)
        if "train" not in wanted and args.validation_split_name in raw:  # no validation split to carve
            keep = [name for name in keep if name != args.train_split_name]
        raw = only_splits(raw, keep)
    if not any(name in raw for name in source_names.values()):
        raise ValueError(
            f"the dataset has the splits {list(raw)}, none named {list(source_names.values())}; "
            "pass --train_split_name / --validation_split_name / --test_split_name"
        )
    ignored = [name for name in raw if name not in source_names.values()]
    if ignored:
        logger.warning(f"Ignoring the splits {ignored} of {args.dataset_name!r}")
    root = source_folder(args)
    splits = {
        split: resolve_image_paths(standardise_split(raw[name], args, config, split_name=name), root, split_name=name)
        for split, name in source_names.items()
        if name in raw
    }
    hierarchy = discover_hierarchy(raw, args)  # rows checked above; now the superclasses of a hierarchy file too
    if hierarchy is not None and (problem := hierarchy.mismatch(config)):
        raise ValueError(f"the data {args.dataset_name!r} does not fit the model's classes: {problem}")
    splits, record = split_with_record(
        splits, args.train_val_split, seed, recorded, recorded_in, allow_data_mismatch=args.allow_data_mismatch
    )
    splits = only_splits(splits, wanted)
    for split, option_name in SPLIT_LIMITS.items():
        limit = getattr(args, option_name)
        if split in splits and limit is not None and limit < len(splits[split]):
            splits[split] = splits[split].select(range(limit))
    splits = check_duplicate_images(splits, drop=args.drop_duplicate_images)
    logger.info(f"Prepared splits: { {split: len(dataset) for split, dataset in splits.items()} }")
    return DatasetDict(splits), record


# ----------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------


def apply_transforms(
    datasets: DatasetDict, config: HierarchicalEfficientNetV2Config, args: DataArguments, seed: int
) -> DatasetDict:
    """Attach the seeded training transform to "train"; the other splits decode to 8-bit tensors at the source
    size. `DevicePreprocessor` (which `HierarchicalTrainer` runs on the device) turns both into model inputs."""
    transformed = {}
    for split, dataset in datasets.items():
        if split == "train":
            transform = ImageTransform(
                build_train_transform(config, args),
                seed=seed,
                split=split,
                max_image_pixels=args.max_image_pixels,
                image_size=config.image_size,
            )
            transformed[split] = dataset.cast_column("image", ImageFeature(decode=False)).with_transform(transform)
        else:
            transformed[split] = evaluation_inputs(dataset, split, args, config.image_size)
    return DatasetDict(transformed)


def evaluation_inputs(dataset: Dataset, split: str, args: DataArguments, image_size: int | None = None) -> Dataset:
    """`dataset` with its images decoded to 8-bit RGB tensors (refused above `--max_image_pixels`; with the model's
    `image_size`, reduced as `decode_rgb` reduces them), as the training script feeds every split but "train" to
    `HierarchicalTrainer`."""
    transform = ImageTransform(split=split, max_image_pixels=args.max_image_pixels, image_size=image_size)
    return dataset.cast_column("image", ImageFeature(decode=False)).with_transform(transform)


__all__ = [
    "apply_transforms",
    "evaluation_inputs",
    "planned_split_sizes",
    "prepare_datasets",
    "prepare_datasets_with_record",
    "source_splits",
]
