"""Configuration of the hierarchical (superclass + class) EfficientNetV2-S classifier (CIFAR-100 by default)."""

from __future__ import annotations

import math
import os
import unicodedata
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # the largest image decoded, from its header (`--max_image_pixels`)

# The range of the stored temperatures: the fitter keeps them in it, a config outside it is refused. At 100 a head's
# probabilities are practically uniform, so the consistent distribution is practically the other head's alone.
TEMPERATURE_RANGE = (0.01, 100.0)

# The intervals of 0 and 1 that `check_unit_interval` checks, written as its messages write them.
UNIT_INTERVALS = ("(0, 1)", "(0, 1]", "[0, 1)", "[0, 1]")

# The official CIFAR-100 tables: fine names in official (alphabetical) order, the 20 superclass
# names in official order, and the superclass index of every fine class.
CIFAR100_FINE_LABELS = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]  # fmt: skip
CIFAR100_COARSE_LABELS = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
]  # fmt: skip
CIFAR100_FINE_TO_COARSE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
]  # fmt: skip

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# torchvision's efficientnet_v2_s().features has 8 stages: 0 stem, 1-3 FusedMBConv, 4-6 MBConv, 7 head conv.
NUM_BACKBONE_STAGES = 8
# The pipelines saved with every model (`pipeline_hierarchical.py`), found by `pipeline(..., trust_remote_code=True)`:
# the hierarchical task, and the standard image-classification task decoding images with the model's own decoder.
HIERARCHICAL_PIPELINE_TASK = "hierarchical-image-classification"
HIERARCHICAL_PIPELINE = {
    "impl": "pipeline_hierarchical.HierarchicalImageClassificationPipeline",
    "pt": ["AutoModelForImageClassification"],
    "type": "image",
}
DECODING_PIPELINE = {
    "impl": "pipeline_hierarchical.DecodingImageClassificationPipeline",
    "pt": ["AutoModelForImageClassification"],
    "type": "image",
}


class HierarchicalEfficientNetV2Config(PretrainedConfig):
    r"""
    Configuration of [`HierarchicalEfficientNetV2ForImageClassification`]: an EfficientNetV2-S backbone with a
    coarse head (superclasses) and a fine head (classes) that also sees the coarse logits.

    The defaults describe CIFAR-100 (100 classes in 20 superclasses of 5) with the official label tables.

    Args:
        fine_to_coarse (`list[int]`, *optional*, defaults to the official CIFAR-100 table):
            Superclass index of every fine class; its length is the number of fine classes.
        id2label (`dict[int, str]`, *optional*, defaults to the 100 CIFAR-100 fine names):
            Fine class names (`label2id` is derived from it).
        coarse_label_names (`list[str]`, *optional*, defaults to the 20 CIFAR-100 superclass names):
            Superclass names; the length is the number of superclasses.
        num_frozen_stages (`int`, *optional*, defaults to 4):
            How many of the 8 torchvision feature stages (`features[0]` ... `features[7]`) are frozen, counted
            from the input. The default 4 freezes the stem and the three FusedMBConv stages (`features[0:4]`,
            24/48/64 channels, under 5% of the backbone's parameters): no gradient, BatchNorm kept in eval mode.
        dropout (`float`, *optional*, defaults to 0.2):
            Dropout on the pooled features before both heads.
        drop_path_rate (`float`, *optional*, defaults to 0.2):
            Stochastic-depth rate of the backbone (torchvision's `stochastic_depth_prob`).
        fine_head_uses_coarse_logits (`bool`, *optional*, defaults to `True`):
            Whether the fine head's input is the pooled features concatenated with the coarse logits.
        coarse_loss_weight (`float`, *optional*, defaults to 1.0):
            Loss = fine cross-entropy + `coarse_loss_weight` x coarse cross-entropy.
        label_smoothing (`float`, *optional*, defaults to 0.0):
            Label smoothing applied inside both cross-entropies.
        backbone_weights (`str`, *optional*, defaults to `"imagenet"`):
            Initial backbone weights when a model is built fresh: `"imagenet"` (torchvision `IMAGENET1K_V1`),
            `None` (random initialisation) or the path of a torchvision state dict (`.pth` or `.safetensors`).
            Ignored by `from_pretrained`, which loads the saved weights.
        image_size (`int`, *optional*, defaults to 224):
            Input resolution. 224 is the default for GPU training: CIFAR's 32 px images upsampled so that
            the ImageNet features apply (384, the resolution of the ImageNet weights, is a little more accurate
            and about 3x slower); 32 trains fastest on CPU.
        image_mean (`list[float]`, *optional*, defaults to the ImageNet mean):
            Per-channel mean used for normalisation.
        image_std (`list[float]`, *optional*, defaults to the ImageNet standard deviation):
            Per-channel standard deviation used for normalisation.
        channels_last (`bool`, *optional*, defaults to `False`):
            Keep weights and activations in channels-last memory format (faster with mixed precision on GPU).
        fine_temperature (`float`, *optional*, defaults to 1.0):
            Temperature of the fine head: its logits are divided by it before the softmax in `predict_hierarchical`
            and the hierarchical pipeline (never in `forward`, so the loss is unchanged). Fitted on held-out data
            by `hierarchical.evaluation.temperature_scaling.fit_temperatures`.
        coarse_temperature (`float`, *optional*, defaults to 1.0):
            Temperature of the coarse head, used in the same places.
        selective_threshold (`float`, *optional*):
            Default `min_confidence` of selective predictions, in (0, 1]: answer the class when its probability
            reaches it, else the superclass when that reaches it, else abstain. `None`: no selective answer unless
            asked for. Chosen by `hierarchical.evaluation.selective_threshold.choose_selective_threshold`.
        selective_target_accuracy (`float`, *optional*):
            The accuracy of answers the threshold was chosen for (a record, not used for predictions).
        selective_confidence (`float`, *optional*):
            The search's confidence: P(a threshold is chosen and misses the target on new data) <= 1 - this, over
            the draw of the calibration images (a record, not used for predictions).
        fine_class_weights (`list[float]`, *optional*):
            Per-class weights of the fine cross-entropy (e.g. inverse class frequencies); `None` weighs all alike.
        coarse_class_weights (`list[float]`, *optional*):
            Per-superclass weights of the coarse cross-entropy; `None` weighs all alike.

    Example:

    ```python
    >>> from configuration_hierarchical import HierarchicalEfficientNetV2Config
    >>> config = HierarchicalEfficientNetV2Config(backbone_weights=None, image_size=32)
    >>> config.num_labels, config.num_coarse_labels
    (100, 20)
    >>> config.id2label[config.coarse_children(17)[0]]
    'maple_tree'
    ```
    """

    model_type = "hierarchical_efficientnet_v2"

    def __init__(
        self,
        fine_to_coarse: list[int] | None = None,
        coarse_label_names: list[str] | None = None,
        num_frozen_stages: int = 4,
        dropout: float = 0.2,
        drop_path_rate: float = 0.2,
        fine_head_uses_coarse_logits: bool = True,
        coarse_loss_weight: float = 1.0,
        label_smoothing: float = 0.0,
        backbone_weights: str | None = "imagenet",
        image_size: int = 224,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        channels_last: bool = False,
        num_channels: int = 3,
        fine_temperature: float = 1.0,
        coarse_temperature: float = 1.0,
        selective_threshold: float | None = None,
        selective_target_accuracy: float | None = None,
        selective_confidence: float | None = None,
        fine_class_weights: list[float] | None = None,
        coarse_class_weights: list[float] | None = None,
        **kwargs,
    ):
        kwargs = _pretrained_config_kwargs(kwargs)
        for field, value in (("fine_to_coarse", fine_to_coarse), ("coarse_label_names", coarse_label_names)):
            if value is not None and not isinstance(value, list | tuple):
                raise ValueError(f"{field} must be a list, got {value!r}")
        if coarse_label_names is not None:
            _check_names("coarse_label_names", dict(enumerate(coarse_label_names)))
        if backbone_weights is not None and not isinstance(backbone_weights, str | os.PathLike):
            raise ValueError(f"backbone_weights must be 'imagenet', None or a file path, got {backbone_weights!r}")
        self.fine_to_coarse = list(CIFAR100_FINE_TO_COARSE if fine_to_coarse is None else fine_to_coarse)
        self.coarse_label_names = list(CIFAR100_COARSE_LABELS if coarse_label_names is None else coarse_label_names)
        self.image_mean = list(IMAGENET_MEAN if image_mean is None else image_mean)
        self.image_std = list(IMAGENET_STD if image_std is None else image_std)
        self.fine_class_weights = _float_list("fine_class_weights", fine_class_weights)
        self.coarse_class_weights = _float_list("coarse_class_weights", coarse_class_weights)
        self.backbone_weights = os.fspath(backbone_weights) if backbone_weights is not None else None
        self.num_frozen_stages = num_frozen_stages
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.fine_head_uses_coarse_logits = fine_head_uses_coarse_logits
        self.coarse_loss_weight = coarse_loss_weight
        self.label_smoothing = label_smoothing
        self.image_size = image_size
        self.channels_last = channels_last
        self.num_channels = num_channels
        self.fine_temperature = fine_temperature
        self.coarse_temperature = coarse_temperature
        self.selective_threshold = selective_threshold
        self.selective_target_accuracy = selective_target_accuracy
        self.selective_confidence = selective_confidence
        super().__init__(**kwargs)
        self.validate_hierarchy()

    # The base class sends every attribute read through `attribute_map` aliases and per-layer (heterogeneous)
    # checks; this config has neither (the class defines no aliases, `__init__` refuses `per_layer_config`).
    # Plain lookups halve the image-classification pipeline's post-processing, which reads `config.id2label`
    # once per class and image. Python's own lookup itself (not a method calling it), so that `torch.compile`
    # traces `self.config.x` in the forward instead of giving up on the whole forward.
    __getattribute__ = object.__getattribute__

    @property
    def num_coarse_labels(self) -> int:
        """Number of superclasses."""
        return len(self.coarse_label_names)

    def validate_hierarchy(self) -> None:
        """Check every field of the configuration; raise `ValueError` naming the field and the bad value."""
        self._check_hierarchy()
        self._check_model_and_loss()
        self._check_calibration()

    def _check_hierarchy(self) -> None:
        """The class tables: one superclass index per class, no empty superclass, no duplicate name."""
        num_fine, num_coarse = len(self.fine_to_coarse), len(self.coarse_label_names)
        if num_fine != self.num_labels:
            raise ValueError(
                f"fine_to_coarse has {num_fine} entries but there are {self.num_labels} fine labels (id2label); "
                "it needs one superclass index per fine class"
            )
        for fine, coarse in enumerate(self.fine_to_coarse):
            if isinstance(coarse, bool) or not isinstance(coarse, int) or not 0 <= coarse < num_coarse:
                raise ValueError(
                    f"fine_to_coarse[{fine}] = {coarse!r} is not a superclass index in [0, {num_coarse}) "
                    f"(coarse_label_names has {num_coarse} names)"
                )
        empty = sorted(set(range(num_coarse)) - set(self.fine_to_coarse))
        if empty:
            raise ValueError(
                f"superclass {empty[0]} ({self.coarse_label_names[empty[0]]!r}) has no fine class in fine_to_coarse; "
                f"superclasses without classes: {empty}"
            )
        for field, names in (
            ("id2label", list(self.id2label.values())),
            ("coarse_label_names", self.coarse_label_names),
        ):
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise ValueError(f"{field} has duplicate names: {duplicates}")
            normalised = [unicodedata.normalize("NFC", name) for name in names]
            same = sorted({name for name, form in zip(names, normalised, strict=True) if normalised.count(form) > 1})
            if same:  # two names that print alike are one class to a reader
                shown = ", ".join(ascii(name) for name in same)
                raise ValueError(f"{field} has names that are equal in Unicode normal form NFC: {shown}")
        if sorted(self.id2label) != list(range(num_fine)):
            raise ValueError(f"id2label keys must be 0..{num_fine - 1}, got {sorted(self.id2label)[:5]}...")

    def _check_model_and_loss(self) -> None:
        """Freezing, regularisation, the loss, the input images, the class weights and the backbone weights."""
        self._check_fields(
            ("num_frozen_stages",),
            lambda value: is_integer(value) and 0 <= value <= NUM_BACKBONE_STAGES,
            f"be in [0, {NUM_BACKBONE_STAGES}] (an integer)",
        )
        for field in ("dropout", "drop_path_rate", "label_smoothing"):
            check_unit_interval(field, getattr(self, field), "[0, 1)")
        self._check_fields(
            ("coarse_loss_weight",),
            lambda value: is_number(value) and math.isfinite(value) and value >= 0,
            "be a finite number >= 0",
        )
        self._check_fields(("fine_head_uses_coarse_logits", "channels_last"), _is_bool, "be true or false")
        self._check_fields(("image_size",), lambda value: is_integer(value) and value >= 16, "be an integer >= 16")
        self._check_fields(("num_channels",), lambda value: is_integer(value) and value == 3, "be 3 (RGB input)")
        channels = f"hold {self.num_channels} values (finite numbers)"
        self._check_fields(
            ("image_mean",),
            lambda value: len(value) == self.num_channels and all(_is_finite_number(v) for v in value),
            channels,
        )
        self._check_fields(
            ("image_std",),
            lambda value: len(value) == self.num_channels and all(_is_finite_number(v) and v > 0 for v in value),
            f"hold {self.num_channels} values (finite numbers > 0)",
        )
        for field, size in (("fine_class_weights", self.num_labels), ("coarse_class_weights", self.num_coarse_labels)):
            weights = getattr(self, field)
            if weights is not None and (
                len(weights) != size or not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights)
            ):
                raise ValueError(f"{field} must hold {size} finite weights >= 0, not all 0, got {weights!r}")
        self._check_fields(
            ("backbone_weights",),
            lambda value: value in (None, "imagenet") or str(value).endswith((".pth", ".pt", ".safetensors")),
            "be 'imagenet', None or a .pth/.pt/.safetensors file",
        )

    def _check_calibration(self) -> None:
        """The temperatures, the selective threshold and what it was chosen for."""
        self._check_fields(
            ("fine_temperature", "coarse_temperature"),
            lambda value: is_number(value) and TEMPERATURE_RANGE[0] <= value <= TEMPERATURE_RANGE[1],
            f"be a finite number > 0 in [{TEMPERATURE_RANGE[0]}, {TEMPERATURE_RANGE[1]}] (the range they are fitted in)",
        )
        check_unit_interval("selective_threshold", self.selective_threshold, "(0, 1]", allow_none=True)
        for field in ("selective_target_accuracy", "selective_confidence"):
            check_unit_interval(field, getattr(self, field), "(0, 1)", allow_none=True)

    def _check_fields(self, fields: tuple[str, ...], is_valid: Callable[[Any], bool], requirement: str) -> None:
        """Raise `ValueError("<field> must <requirement>, got <value>")` for the first of `fields` that is not valid."""
        for field in fields:
            value = getattr(self, field)
            if not is_valid(value):
                raise ValueError(f"{field} must {requirement}, got {value!r}")

    def fine_to_coarse_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The fine-to-coarse mapping as a `(num_labels,)` int64 tensor."""
        return torch.tensor(self.fine_to_coarse, dtype=torch.long, device=device)

    def hierarchy_matrix(self, device: torch.device | str | None = None) -> torch.Tensor:
        """A `(num_labels, num_coarse_labels)` 0/1 float matrix: row `f` has a 1 at the superclass of `f`."""
        matrix = torch.zeros(self.num_labels, self.num_coarse_labels, device=device)
        matrix[torch.arange(self.num_labels), self.fine_to_coarse_tensor(device)] = 1.0
        return matrix

    def class_weights_tensor(self, name: str) -> torch.Tensor | None:
        """`fine_class_weights` or `coarse_class_weights` (`name`) as a float tensor; None when not set."""
        weights = getattr(self, name)
        return None if weights is None else torch.tensor(weights)

    def coarse_children(self, coarse_id: int) -> list[int]:
        """Fine class indices that belong to superclass `coarse_id`."""
        return [fine for fine, coarse in enumerate(self.fine_to_coarse) if coarse == coarse_id]


def _pretrained_config_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` for `PretrainedConfig`, with this model's defaults: the CIFAR-100 class names when neither
    `id2label` nor `num_labels` is given, `label2id` derived from `id2label`, and the hierarchical pipeline."""
    if kwargs.get("per_layer_config") is not None:
        raise ValueError("per_layer_config is not supported: every layer of this model shares one configuration")
    num_labels = kwargs.get("num_labels")
    if num_labels is not None and (not is_integer(num_labels) or num_labels < 1):
        raise ValueError(f"num_labels must be an integer >= 1, got {num_labels!r}")
    if kwargs.get("id2label") is None and num_labels is None:
        kwargs["id2label"] = dict(enumerate(CIFAR100_FINE_LABELS))
    if kwargs.get("id2label") is not None:
        id2label = kwargs["id2label"]
        if not isinstance(id2label, dict):
            raise ValueError(f"id2label must be an object of class ids and names, got {id2label!r}")
        keys = [key for key in id2label if not is_integer(key) and not (isinstance(key, str) and key.isdecimal())]
        if keys:
            raise ValueError(f"id2label must have class ids (0, 1, ...) as keys, got {keys[0]!r}")
        kwargs["id2label"] = {int(key): name for key, name in id2label.items()}
        _check_names("id2label", kwargs["id2label"])
        if num_labels is not None and num_labels != len(id2label):
            raise ValueError(f"num_labels is {num_labels} but id2label names {len(id2label)} classes")
        kwargs["label2id"] = {name: i for i, name in kwargs["id2label"].items()}
    if kwargs.get("custom_pipelines") is None:
        kwargs["custom_pipelines"] = {
            HIERARCHICAL_PIPELINE_TASK: dict(HIERARCHICAL_PIPELINE),
            "image-classification": dict(DECODING_PIPELINE),
        }
    return kwargs


def check_unit_interval(name: str, value: Any, interval: str = "(0, 1)", allow_none: bool = False) -> float | None:
    """`value` as a float, after checking that it is a number (an int or float, not a bool; not NaN) in `interval`,
    one of `UNIT_INTERVALS`; None for None when `allow_none`. Otherwise `ValueError("<name> must be in <interval>,
    got <value>")` ("must be None or in" with `allow_none`), where `name` is the option (`--name`) or the field as
    its user writes it. The one check of every share, probability and threshold between 0 and 1."""
    if interval not in UNIT_INTERVALS:
        raise ValueError(f"interval must be one of {list(UNIT_INTERVALS)}, got {interval!r}")
    if value is None and allow_none:
        return None
    if is_number(value):
        above_low = value > 0 if interval[0] == "(" else value >= 0
        below_high = value < 1 if interval[-1] == ")" else value <= 1
        if above_low and below_high:
            return float(value)
    raise ValueError(f"{name} must be {'None or ' if allow_none else ''}in {interval}, got {value!r}")


def check_label_range(
    labels: Any, num_classes: int, name: str, describe_row: Callable[[int], str] | None = None
) -> None:
    """Raise `ValueError` when a class (or superclass) id of `labels` lies outside [0, `num_classes`):
    "<name> must be in [0, <num_classes>), got <id> at <row> (<count> of <rows> rows out of range)". `labels` is a
    numpy array, a sequence or a tensor (read on the CPU); `name` names the column or field and where it was read;
    `describe_row(position)` names the first bad row (default "row <position>"). The one check of label ranges."""
    values = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if bad.size:
        row = int(bad[0])
        where = f"row {row}" if describe_row is None else describe_row(row)
        raise ValueError(
            f"{name} must be in [0, {num_classes}), got {values.flat[row].item()} at {where} "
            f"({bad.size} of {values.size} rows out of range)"
        )


def _check_names(field: str, names: dict[int, Any]) -> None:
    """`ValueError` naming `field` and the entry when a class or superclass name is not a non-empty string."""
    for key, name in names.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{field}[{key}] must be a name (a non-empty string), got {name!r}")


def is_number(value: Any) -> bool:
    """Whether `value` is an int or float (not a bool); NaN passes here and fails the range checks."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    """Whether `value` is an int or a finite float (not a bool)."""
    return is_number(value) and math.isfinite(value)


def is_integer(value: Any) -> bool:
    """Whether `value` is an int (not a bool: `true` in a config file is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_bool(value: Any) -> bool:
    """Whether `value` is `True` or `False` (not 0, 1 or a string)."""
    return isinstance(value, bool)


def _float_list(field: str, values: list[float] | None) -> list[float] | None:
    """`values` as floats, or None; `ValueError` naming `field` when an entry is not a number."""
    if values is None:
        return None
    if isinstance(values, str | bytes) or not all(is_number(value) for value in values):
        raise ValueError(f"{field} must be a list of numbers, got {values!r}")
    return [float(value) for value in values]


__all__ = ["HierarchicalEfficientNetV2Config", "is_integer", "is_number"]
