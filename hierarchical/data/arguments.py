"""The data options (`DataArguments`): where the data comes from, which columns and splits to use, and how training
images are augmented; with the names of the prepared splits (`SPLITS`), the option names of their limits
(`SPLIT_LIMITS`) and the augmentation policies."""

from __future__ import annotations

from dataclasses import dataclass

from configuration_hierarchical import DEFAULT_MAX_IMAGE_PIXELS, check_unit_interval
from hierarchical.options import check_finite_options, option

# The training augmentation policies (`--augmentation`), in the order `--help` lists them: 'original' and 'none' run
# on whole batches on the device, the others are torchvision's (`augmentation.PolicyAugment.POLICIES`).
AUGMENTATION_POLICIES = ("original", "trivialaugment", "randaugment", "autoaugment", "none")
# What a policy does after crop and flip, where its name does not say it.
AUGMENTATION_NOTES = {"original": "rotation + colour jitter", "autoaugment": "CIFAR-10 policy"}


def augmentation_help() -> str:
    """The help text of `--augmentation`: every policy of `AUGMENTATION_POLICIES`, with its note."""
    named = [
        f"'{name}' ({AUGMENTATION_NOTES[name]})" if name in AUGMENTATION_NOTES else f"'{name}'"
        for name in AUGMENTATION_POLICIES
    ]
    return f"Augmentation policy after crop and flip: {', '.join(named[:-1])} or {named[-1]}."


# The prepared splits, in the order they are read and reported: the one trained on, then the two evaluated.
SPLITS = ("train", "validation", "test")
EVALUATION_SPLITS = SPLITS[1:]  # the splits never trained on

# The option that limits the rows of each split.
SPLIT_LIMITS = dict(zip(SPLITS, ("max_train_samples", "max_eval_samples", "max_predict_samples"), strict=True))


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
    image_column_name: str | None = option(
        None, "Column that holds the images; by default the one Image column, else the one named image or img."
    )
    label_column_name: str | None = option(
        None,
        "Column that holds the fine labels; by default the one named label, labels or fine_label, else the one "
        "ClassLabel column.",
    )
    coarse_label_column_name: str | None = option(
        None,
        "Column that holds the superclass labels; by default coarse_label or coarse_labels when present. Without "
        "one, superclasses are derived from the fine labels.",
    )
    hierarchy_file: str | None = option(
        None,
        "UTF-8 JSON ({fine: coarse} or {coarse: [fine, ...]}) or CSV (rows fine,coarse; a first row naming no class "
        "of the data is a header) file mapping every class "
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
    augmentation: str = option("original", augmentation_help(), choices=AUGMENTATION_POLICIES)
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
    allow_data_mismatch: bool = option(
        False,
        "Evaluating a saved model's validation split uses the rows recorded with the model (provenance.json), "
        "and is refused when the training data differ from the recorded ones or the rows would include rows the "
        "model trained on; a resumed run is refused when its data differ from its checkpoint's. True evaluates or "
        "resumes anyway, with a warning.",
    )

    def source_split_names(self) -> dict[str, str]:
        """The name in the source of each prepared split (`SPLITS`, in their order): `--train_split_name`,
        `--validation_split_name` and `--test_split_name`."""
        names = (self.train_split_name, self.validation_split_name, self.test_split_name)
        return dict(zip(SPLITS, names, strict=True))

    def __post_init__(self) -> None:
        check_finite_options(self)
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be a positive number of pixels, got {self.max_image_pixels!r}")
        check_unit_interval("train_val_split", self.train_val_split, "[0, 1)")
        for name in SPLIT_LIMITS.values():
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of rows (or unset for all), got {value!r}")
        if self.augmentation not in AUGMENTATION_POLICIES:
            raise ValueError(f"augmentation must be one of {list(AUGMENTATION_POLICIES)}, got {self.augmentation!r}")
        for name in ("rotation_degrees", "color_jitter", "mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("random_erasing", "mix_prob", "cutmix_switch_prob"):  # probabilities
            check_unit_interval(name, getattr(self, name), "[0, 1]")
