"""Data pipeline of the hierarchical CIFAR-100 classifier: the two entry points, and the data options from
`data_arguments.py`.

`prepare_datasets` turns any supported source into splits with the columns `image`, `labels`, `coarse_labels`
and `index`; `apply_transforms` attaches the transforms; `HierarchicalCollator` builds batches and draws
their MixUp/CutMix parameters, which `DevicePreprocessor` applies on the training device. The parts live in
`data_sources.py` (loading), `data_checks.py` (labels, paths, duplicates), `image_decoding.py`,
`augmentation.py`, `collation.py` and `device_preprocess.py`.
All training randomness comes from seeds derived from (seed, epoch, row index): where the global torch RNG is
used, it is seeded from such a seed first, so a resumed run sees the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

from datasets import Dataset, DatasetDict
from datasets import Image as ImageFeature
from transformers.utils import logging

from augmentation import (
    BatchedAugment,
    PolicyAugment,
    RandomCropWithPadding,
    ToNormalizedFloat,
    build_eval_transform,
    build_train_transform,
    derive_seed,
    uniform_draws,
)
from collation import EpochCallback, HierarchicalCollator, ImageTransform
from configuration_hierarchical import HierarchicalEfficientNetV2Config
from data_arguments import AUGMENTATION_POLICIES, SPLIT_LIMITS, DataArguments
from data_checks import (
    check_duplicate_images,
    resolve_image_paths,
    split_train_validation,
    standardise_split,
)
from data_sources import CifarUnpickler, load_raw_datasets, source_folder
from device_preprocess import JITTER_ORDERS
from hierarchy_data import discover_hierarchy
from image_decoding import decode_image, to_rgb
from option_fields import PROJECT_LOGGER

logger = logging.get_logger(f"{PROJECT_LOGGER}.{__name__}")


def prepare_datasets(
    args: DataArguments, config: HierarchicalEfficientNetV2Config, seed: int, raw: DatasetDict | None = None
) -> DatasetDict:
    """Load (unless `raw` is given: the output of `load_raw_datasets`), validate and standardise the source; carve
    a validation split if needed; apply `max_*_samples`. The data's hierarchy (`discover_hierarchy`) must fit
    `config`: every class of the data a class of the config, under the same superclass.

    Returns the available splits among "train", "validation" and "test", each with the columns `image` (`Image`),
    `labels` and `coarse_labels` (`ClassLabel`) and `index` (the row's position in its source split).
    """
    raw = load_raw_datasets(args) if raw is None else raw
    source_names = dict(train=args.train_split_name, validation=args.validation_split_name, test=args.test_split_name)
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
    if "validation" not in splits and "train" in splits and args.train_val_split > 0:
        splits["train"], splits["validation"] = split_train_validation(splits["train"], args.train_val_split, seed)
    for split, option_name in SPLIT_LIMITS.items():
        limit = getattr(args, option_name)
        if split in splits and limit is not None and limit < len(splits[split]):
            splits[split] = splits[split].select(range(limit))
    splits = check_duplicate_images(splits, drop=args.drop_duplicate_images)
    logger.info(f"Prepared splits: { {split: len(dataset) for split, dataset in splits.items()} }")
    return DatasetDict(splits)


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
                build_train_transform(config, args), seed=seed, split=split, max_image_pixels=args.max_image_pixels
            )
            transformed[split] = dataset.cast_column("image", ImageFeature(decode=False)).with_transform(transform)
        else:
            transformed[split] = evaluation_inputs(dataset, split, args)
    return DatasetDict(transformed)


def evaluation_inputs(dataset: Dataset, split: str, args: DataArguments) -> Dataset:
    """`dataset` with its images decoded to 8-bit RGB tensors at their source size (refused above
    `--max_image_pixels`), as the training script feeds every split but "train" to `HierarchicalTrainer`."""
    transform = ImageTransform(split=split, max_image_pixels=args.max_image_pixels)
    return dataset.cast_column("image", ImageFeature(decode=False)).with_transform(transform)


# The pipeline's entry points, and the names of its parts that other code imports from here.
__all__ = [
    "AUGMENTATION_POLICIES",
    "BatchedAugment",
    "CifarUnpickler",
    "DataArguments",
    "EpochCallback",
    "HierarchicalCollator",
    "ImageTransform",
    "JITTER_ORDERS",
    "PolicyAugment",
    "SPLIT_LIMITS",
    "RandomCropWithPadding",
    "ToNormalizedFloat",
    "apply_transforms",
    "build_eval_transform",
    "build_train_transform",
    "decode_image",
    "evaluation_inputs",
    "derive_seed",
    "load_raw_datasets",
    "prepare_datasets",
    "to_rgb",
    "uniform_draws",
]


if __name__ == "__main__":  # `python data_utils.py download DEST`: a local copy of CIFAR-100, see download_data.py
    from download_data import cli

    cli()
