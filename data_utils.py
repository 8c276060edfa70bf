"""Data pipeline of the hierarchical CIFAR-100 classifier: the data options and the two entry points.

`prepare_datasets` turns any supported source into splits with the columns `image`, `labels`, `coarse_labels`
and `index`; `apply_transforms` attaches the transforms; `HierarchicalCollator` builds batches and draws
their MixUp/CutMix parameters, which `DevicePreprocessor` applies on the training device. The parts live in
`data_sources.py` (loading), `data_checks.py` (labels, paths, duplicates), `image_decoding.py`,
`augmentation.py`, `collation.py` and `device_preprocess.py`.
All training randomness comes from seeds derived from (seed, epoch, row index): where the global torch RNG is
used, it is seeded from such a seed first, so a resumed run sees the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
from data_checks import (
    check_duplicate_images,
    resolve_image_paths,
    split_train_validation,
    standardise_split,
)
from data_sources import CifarUnpickler, load_raw_datasets, source_folder
from device_preprocess import JITTER_ORDERS
from hierarchy_data import discover_hierarchy
from image_decoding import DEFAULT_MAX_IMAGE_PIXELS, decode_image, to_rgb
from option_fields import check_finite_options, option

logger = logging.get_logger(__name__)

AUGMENTATION_POLICIES = ("original", "trivialaugment", "randaugment", "autoaugment", "none")

# The option that limits the rows of each split.
SPLIT_LIMITS = {"train": "max_train_samples", "validation": "max_eval_samples", "test": "max_predict_samples"}


@dataclass
class DataArguments:
    """Where the data comes from, which columns and splits to use, and how training images are augmented."""

    dataset_name: str = option(
        "uoft-cs/cifar100",
        "A Hub dataset id; a local folder, file or glob of parquet/arrow files in the uoft-cs/cifar100 "
        "schema (in a folder: files named train-*/test-* at its top, or files in train/, validation/, test/ "
        "folders; other subfolders are not read); an image folder with one subfolder per class or "
        "superclass/class subfolders (or 'imagefolder' together with --data_dir); or an original cifar-100-python "
        "folder.",
    )
    dataset_config_name: str | None = option(None, "Configuration name of a Hub dataset.")
    data_dir: str | None = option(None, "Data folder of a Hub dataset, or the folder of --dataset_name imagefolder.")
    cache_dir: str | None = option(None, "Where the datasets library caches what it loads.")
    image_column_name: str = option("img", "Column that holds the images.")
    label_column_name: str = option("fine_label", "Column that holds the fine labels.")
    coarse_label_column_name: str = option(
        "coarse_label", "Column that holds the superclass labels; derived from the fine labels when absent."
    )
    hierarchy_file: str | None = option(
        None,
        "JSON ({fine: coarse} or {coarse: [fine, ...]}) or CSV (rows fine,coarse) file mapping every class "
        "name to its superclass name, for data with fine labels only (plain integer labels are named by their "
        "decimal strings). Without it the hierarchy comes from the data: superclass/class/image folders, or the "
        "fine and coarse label columns; CIFAR-100 when the data names none.",
    )
    train_split_name: str = option("train", "Name of the training split in the source.")
    validation_split_name: str = option("validation", "Name of the validation split in the source, if it has one.")
    test_split_name: str = option("test", "Name of the test split in the source.")
    train_val_split: float = option(
        0.1,
        "Fraction of the training split carved out (with the training seed, stratified by class) as the "
        "validation split when the source has none; 0 carves nothing.",
    )
    max_train_samples: int | None = option(None, "Keep only the first N training rows (after splitting); default all.")
    max_eval_samples: int | None = option(None, "Keep only the first N validation rows (after splitting); default all.")
    max_predict_samples: int | None = option(None, "Keep only the first N test rows; default all.")
    augmentation: str = option(
        "original",
        "Augmentation policy after crop and flip: 'original' (rotation + colour jitter), "
        "'trivialaugment', 'randaugment', 'autoaugment' (CIFAR-10 policy) or 'none'.",
        choices=AUGMENTATION_POLICIES,
    )
    rotation_degrees: float = option(15.0, "Maximum rotation of the 'original' policy, in degrees; 0 disables it.")
    color_jitter: float = option(
        0.4, "Brightness, contrast and saturation jitter of the 'original' policy; 0 disables it."
    )
    horizontal_flip: bool = option(True, "Flip training images horizontally at random.")
    random_crop: bool = option(
        True, "Random crop with zero padding (4 px at 32 px, scaled with larger sources), CIFAR-style."
    )
    random_erasing: float = option(0.0, "Probability of erasing a random rectangle of a training image.")
    mixup_alpha: float = option(0.0, "MixUp Beta(alpha, alpha) parameter; 0 disables it.")
    cutmix_alpha: float = option(0.0, "CutMix Beta(alpha, alpha) parameter; 0 disables it.")
    mix_prob: float = option(1.0, "Probability that a training batch is mixed when an alpha is above 0.")
    cutmix_switch_prob: float = option(0.5, "Probability of CutMix rather than MixUp when both alphas are above 0.")
    max_image_pixels: int = option(
        DEFAULT_MAX_IMAGE_PIXELS,
        "Largest image (width x height) that is decoded; larger ones are refused from their header, "
        "before decoding, naming the row.",
    )
    drop_duplicate_images: bool = option(
        False,
        "Images of the validation or test split whose encoded bytes equal those of a training image are "
        "refused by default; true drops them from the evaluation splits instead, and logs how many.",
    )

    def __post_init__(self) -> None:
        check_finite_options(self)
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be a positive number of pixels, got {self.max_image_pixels!r}")
        if not 0.0 <= self.train_val_split < 1.0:
            raise ValueError(f"train_val_split must be in [0, 1), got {self.train_val_split!r}")
        for name in SPLIT_LIMITS.values():
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of rows (or unset for all), got {value!r}")
        if self.augmentation not in AUGMENTATION_POLICIES:
            raise ValueError(f"augmentation must be one of {list(AUGMENTATION_POLICIES)}, got {self.augmentation!r}")
        for name in ("rotation_degrees", "color_jitter", "mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("random_erasing", "mix_prob", "cutmix_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability and must be in [0, 1], got {getattr(self, name)!r}")


def planned_split_sizes(args: DataArguments, source_sizes: dict[str, int]) -> dict[str, int]:
    """The rows each split will have, from the row counts of the source's splits (`{source split name: rows}`):
    the validation share carved from "train" (as `split_train_validation` carves it) and the `max_*_samples`
    limits. `ValueError` naming `--train_val_split` when carving would leave an empty split, before any work."""
    names = dict(train=args.train_split_name, validation=args.validation_split_name, test=args.test_split_name)
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
    "planned_split_sizes",
    "prepare_datasets",
    "to_rgb",
    "uniform_draws",
]


if __name__ == "__main__":  # `python data_utils.py download DEST`: a local copy of CIFAR-100, see download_data.py
    from download_data import cli

    cli()
