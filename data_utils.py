"""Data pipeline of the hierarchical CIFAR-100 classifier, its public face: the options (`DataArguments`), the two
entry points and the parts other code uses, from the `hierarchical.data` package.

`prepare_datasets` turns any supported source into splits with the columns `image`, `labels`, `coarse_labels`
and `index`; `apply_transforms` attaches the transforms; `HierarchicalCollator` builds batches and draws
their MixUp/CutMix parameters, which `DevicePreprocessor` applies on the training device. The parts live in
`hierarchical/data/`: `sources` (loading), `checks` (labels, paths, duplicates), `splits`, `decoding`,
`augmentation`, `collation` and `device_preprocess`.
All training randomness comes from seeds derived from (seed, epoch, row index): where the global torch RNG is
used, it is seeded from such a seed first, so a resumed run sees the same augmentations as an uninterrupted one.

    python data_utils.py download cifar100-local   # a local copy of CIFAR-100 (hierarchical/data/download.py)
"""

from __future__ import annotations

from hierarchical.data.arguments import AUGMENTATION_POLICIES, SPLIT_LIMITS, SPLITS, DataArguments
from hierarchical.data.augmentation import (
    BatchedAugment,
    PolicyAugment,
    RandomCropWithPadding,
    build_eval_transform,
    build_train_transform,
    derive_seed,
    uniform_draws,
)
from hierarchical.data.collation import EpochCallback, HierarchicalCollator, ImageTransform
from hierarchical.data.decoding import decode_image, to_rgb
from hierarchical.data.device_preprocess import JITTER_ORDERS
from hierarchical.data.sources import CifarUnpickler, load_raw_datasets
from hierarchical.data.splits import (
    apply_transforms,
    evaluation_inputs,
    planned_split_sizes,
    prepare_datasets,
    prepare_datasets_with_record,
)
from image_processing_hierarchical import ToNormalizedFloat

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
    "SPLITS",
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
    "prepare_datasets_with_record",
    "to_rgb",
    "uniform_draws",
]


if __name__ == "__main__":
    from hierarchical.data.download import cli

    cli()
