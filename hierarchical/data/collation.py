"""From dataset rows to batches: `ImageTransform` (decode and augment on access), `EpochCallback` (the epoch
that seeds augmentation) and `HierarchicalCollator` (stacking, MixUp/CutMix on fine and coarse targets)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from configuration_hierarchical import HierarchicalEfficientNetV2Config, check_label_range
from hierarchical.data.augmentation import NO_BOX, TrainAugment, derive_seed
from hierarchical.data.decoding import DEFAULT_MAX_IMAGE_PIXELS, decode_image, decode_to_tensor

logger = logging.get_logger(__name__)


class ImageTransform:
    """Batch transform for `Dataset.with_transform`: decode every image, transform it, keep the labels.

    Args:
        transform (`Callable`, *optional*):
            `None` (evaluation): every image becomes an 8-bit RGB `(3, H, W)` tensor at its source size, for
            `DevicePreprocessor` to resize and normalise on the device. A `TrainAugment` from
            `build_train_transform` (training) gives 8-bit tensors at the source size too, after its per-image
            policy, plus the per-image parameters of the device-side steps under `augmentation`. Any other
            callable (such as `build_eval_transform`) maps one PIL image to the model's input.
        seed (`int`, *optional*):
            For random (training) transforms: image `index` of epoch `e` is augmented from the seed
            `derive_seed(seed, e, index)` (per-image transforms run under the torch CPU RNG seeded with it inside
            `torch.random.fork_rng`), so the draw depends on nothing else (global RNG, batch, dataloader workers,
            resuming). Such outputs also carry `epoch`, which marks them as
            training examples for `HierarchicalCollator`. `None` for deterministic (evaluation) transforms.
        split (`str`, *optional*, defaults to `"train"`):
            Split name used in error messages.
        max_image_pixels (`int`, *optional*, defaults to 50,000,000):
            Images larger than this (width x height) are refused from their header, before decoding.
        image_size (`int`, *optional*):
            The model's image size: image sides above twice this are reduced while decoding (see
            `image_processing_hierarchical.decode_rgb`), so a decoded image holds under (4 x image_size)^2 pixels.

    Example:

    ```python
    >>> transform = ImageTransform(build_train_transform(config, data_args), seed=42)
    >>> train = prepared["train"].cast_column("image", Image(decode=False)).with_transform(transform)
    >>> transform.set_epoch(1)
    >>> train[0]["pixel_values"].shape, train[0]["pixel_values"].dtype
    (torch.Size([3, 32, 32]), torch.uint8)
    ```
    """

    def __init__(
        self,
        transform: Callable | None = None,
        seed: int | None = None,
        split: str = "train",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        image_size: int | None = None,
    ):
        self.transform = transform
        self.seed = seed
        self.split = split
        self.max_image_pixels = max_image_pixels
        self.image_size = image_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the next draws."""
        self.epoch = int(epoch)

    def decode(self, value: Any, index: int) -> PIL.Image.Image:
        """One stored image as an 8-bit RGB PIL image (`hierarchical.data.decoding.decode_image`)."""
        return decode_image(value, index, self.split, self.max_image_pixels, self.image_size)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        indices = batch["index"]
        values = zip(batch["image"], indices, strict=True)
        output = {}
        if self.transform is None:
            pixel_values = [
                decode_to_tensor(value, index, self.split, self.max_image_pixels, self.image_size)
                for value, index in values
            ]
        elif self.seed is None:
            pixel_values = [self.transform(self.decode(value, index)) for value, index in values]
        elif isinstance(self.transform, TrainAugment):
            images = [self.decode(value, index) for value, index in values]
            seeds = [derive_seed(self.seed, self.epoch, index) for index in indices]
            pixel_values, parameters = self.transform.sample(images, seeds)
            if parameters:
                output["augmentation"] = [{k: v[i] for k, v in parameters.items()} for i in range(len(indices))]
        else:
            with torch.random.fork_rng(devices=[]):
                pixel_values = []
                for value, index in values:
                    image = self.decode(value, index)
                    torch.default_generator.manual_seed(derive_seed(self.seed, self.epoch, index))
                    pixel_values.append(self.transform(image))
        output.update(pixel_values=pixel_values, index=indices)
        for key in ("labels", "coarse_labels"):
            if key in batch:
                output[key] = batch[key]
        if self.seed is not None:
            output["epoch"] = [self.epoch] * len(indices)
        return output


class EpochCallback(TrainerCallback):
    """Tell the training transform which epoch the Trainer is starting, so augmentations follow (seed, epoch, index).

    Args:
        targets (`Any` or `list`):
            Objects with `set_epoch(epoch)` (an `ImageTransform`), or datasets whose `with_transform` transform has
            one (the "train" split returned by `apply_transforms`).

    With `dataloader_num_workers > 0`, workers receive a copy of the transform each epoch; persistent workers keep
    the copy of the first epoch, so the callback warns about `dataloader_persistent_workers`.
    """

    def __init__(self, targets: Any):
        targets = targets if isinstance(targets, (list, tuple)) else [targets]
        self.targets = [_epoch_target(target) for target in targets]

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.dataloader_num_workers > 0 and args.dataloader_persistent_workers:
            logger.warning(
                "dataloader_persistent_workers keeps each worker's copy of the training transform, which never "
                "learns the epoch: every epoch would repeat the augmentations of the first"
            )

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        epoch = math.floor(state.epoch + 1e-6)  # a resumed run starts inside the checkpoint's epoch
        for target in self.targets:
            target.set_epoch(epoch)


def _epoch_target(target: Any) -> Any:
    """`target` itself if it has `set_epoch`, else the transform of a dataset that has one."""
    if hasattr(target, "set_epoch"):
        return target
    transform = getattr(target, "format", {}).get("format_kwargs", {}).get("transform")
    if hasattr(transform, "set_epoch"):
        return transform
    raise TypeError(f"EpochCallback needs objects with set_epoch or datasets with such a transform, got {target!r}")


@dataclass
class HierarchicalCollator:
    """Stack examples into a batch and draw the MixUp/CutMix parameters of training batches.

    Args:
        config (`HierarchicalEfficientNetV2Config`, *optional*):
            The number of classes (labels are checked against it) and the model image size (the CutMix rectangle);
            needed when mixing.
        mixup_alpha (`float`, *optional*, defaults to 0.0):
            MixUp Beta(alpha, alpha) parameter; 0 disables MixUp.
        cutmix_alpha (`float`, *optional*, defaults to 0.0):
            CutMix Beta(alpha, alpha) parameter; 0 disables CutMix.
        mix_prob (`float`, *optional*, defaults to 1.0):
            Probability that a batch is mixed.
        cutmix_switch_prob (`float`, *optional*, defaults to 0.5):
            Probability of CutMix rather than MixUp when both alphas are above 0.
        seed (`int`, *optional*, defaults to 0):
            Seed of the mixing draws, together with the batch's epoch and row indices.

    The batch holds `labels` and `coarse_labels` as `(batch,)` int64 (checked against `config` here, on the CPU,
    so the training step never reads them back from the device), `pixel_values` stacked as the examples give them
    (8-bit images at the source size from `ImageTransform`; a list when their sizes differ) and, for training
    examples, `augmentation`: their per-image parameters stacked, plus the mixing parameters when mixing is on.
    Training examples are those that carry `epoch` (set by the seeded `ImageTransform`); evaluation batches are
    never mixed, so one collator serves the Trainer's training and evaluation. `DevicePreprocessor` applies the
    parameters on the device; mixed batches then get soft `(batch, num_labels)` and `(batch, num_coarse_labels)`
    targets, with `coarse_labels == labels @ config.hierarchy_matrix()`.

    Example:

    ```python
    >>> collator = HierarchicalCollator(config, mixup_alpha=0.2, cutmix_alpha=1.0, seed=42)
    >>> batch = DevicePreprocessor(config)(collator([train[i] for i in range(8)]))
    >>> batch["labels"].shape, batch["coarse_labels"].shape
    (torch.Size([8, 100]), torch.Size([8, 20]))
    ```
    """

    config: HierarchicalEfficientNetV2Config | None = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    cutmix_switch_prob: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {self.mixup_alpha}, {self.cutmix_alpha}")
        if self.mixes and self.config is None:
            raise ValueError("HierarchicalCollator needs the config (class hierarchy) when mixup or cutmix is enabled")

    @property
    def mixes(self) -> bool:
        """Whether training batches are mixed at all."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = {  # labels first: the Trainer reads the batch size from the first tensor it finds
            "labels": torch.tensor([example["labels"] for example in examples], dtype=torch.long),
            "coarse_labels": torch.tensor([example["coarse_labels"] for example in examples], dtype=torch.long),
        }
        if self.config is not None:
            self.check_labels(batch, examples)
        images = [example["pixel_values"] for example in examples]
        same_size = all(image.shape == images[0].shape for image in images)
        batch["pixel_values"] = torch.stack(images) if same_size else images  # (batch, 3, H, W)
        augmentation = {}
        if "augmentation" in examples[0]:
            keys = examples[0]["augmentation"]
            augmentation = {key: torch.stack([example["augmentation"][key] for example in examples]) for key in keys}
        if self.mixes and all("epoch" in example for example in examples):
            seed = derive_seed(self.seed, examples[0]["epoch"], *(example["index"] for example in examples))
            augmentation.update(self.mix_parameters(len(examples), np.random.default_rng(seed)))
        if augmentation:
            batch["augmentation"] = augmentation
        return batch

    def check_labels(self, batch: dict[str, torch.Tensor], examples: list[dict[str, Any]]) -> None:
        """Raise `ValueError` naming the example when a label is outside the config's classes."""

        def example(row: int) -> str:
            return f"the example with index={examples[row].get('index', row)}"

        for name, classes in (("labels", self.config.num_labels), ("coarse_labels", self.config.num_coarse_labels)):
            check_label_range(batch[name], classes, name, example)

    # Not v2.MixUp/CutMix: they draw from the global RNG (not the batch's seed, so a resumed run would differ) and
    # mix one label tensor; here the workers draw the parameters and the device mixes both heads' targets.
    def mix_parameters(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """MixUp or CutMix parameters for one batch (mixed with probability `mix_prob`), per image: the partner
        (`mix_index`), the rectangle taken from it at the model size (`mix_box`) and the weights (`mix_weights`)."""
        index = torch.arange(batch_size)
        box = NO_BOX
        pixel_lam = target_lam = 1.0
        if rng.random() < self.mix_prob:
            index = torch.from_numpy(rng.permutation(batch_size))
            use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.cutmix_switch_prob)
            if use_cutmix:
                lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
                height = width = self.config.image_size
                cut_height, cut_width = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
                center_y, center_x = rng.integers(height), rng.integers(width)
                top, bottom = max(center_y - cut_height // 2, 0), min(center_y + cut_height // 2, height)
                left, right = max(center_x - cut_width // 2, 0), min(center_x + cut_width // 2, width)
                box = (top, left, bottom, right)
                target_lam = 1.0 - (bottom - top) * (right - left) / (height * width)  # the share actually kept
            else:
                pixel_lam = target_lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
        return {
            "mix_index": index,
            "mix_box": torch.tensor(box, dtype=torch.long).expand(batch_size, 4).contiguous(),
            "mix_weights": torch.tensor([pixel_lam, target_lam], dtype=torch.float32)
            .expand(batch_size, 2)
            .contiguous(),
        }
