"""Batched preprocessing on the training device: 8-bit images at their source size in, model inputs out.

DataLoader workers decode the images, run the per-image random policy where it is cheap (at the source resolution)
and draw every other random parameter of the training augmentation; they ship `uint8` tensors at the source size
(3 KB for a CIFAR image, against 1.77 MB of float32 at 384 px) together with those parameters. `DevicePreprocessor`
does the rest on whole batches, on whatever device the batch is on: resize to the model size, conversion to float,
normalisation, the 'original' policy's crop, flip, rotation and colour jitter, random erasing and MixUp/CutMix. It
only applies parameters that were drawn on the CPU, so it never reads a value back from the device (no host-device
synchronisation) and gives the same result on any device and in any batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from configuration_hierarchical import HierarchicalEfficientNetV2Config

JITTER_ORDERS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's "L" mode and torchvision's rgb_to_grayscale
PER_IMAGE_STEPS = ("affine", "jitter_factors", "jitter_order")  # applied at the source size, before the resize


class DevicePreprocessor(torch.nn.Module):
    """Turn a collated batch of 8-bit images at their source size into the model's inputs, on the batch's device.

    Args:
        config (`HierarchicalEfficientNetV2Config`):
            Model image size, normalisation, number of classes and the class hierarchy (for mixed targets).

    The batch (from `hierarchical.data.collation.HierarchicalCollator`) holds:

    - `pixel_values`: `uint8` `(batch, 3, H, W)`, or a list of `uint8` `(3, H_i, W_i)` tensors when the sizes differ
      (grouped by size here, which costs a host-device copy of the group indices). A float tensor is taken as
      already normalised model input and passed through.
    - `labels`, `coarse_labels`: `(batch,)` class indices.
    - `augmentation` (training batches only): a dict of per-image parameters, each optional:
      `affine` `(batch, 2, 3)` float, the `affine_grid` matrix of crop, flip and rotation at the source size;
      `jitter_factors` `(batch, 3)` float and `jitter_order` `(batch, 3)` int, brightness, contrast and saturation
      factors and their order; `erase_box` `(batch, 4)` int, the (top, left, bottom, right) rectangle erased at the
      model size (empty: none); `mix_index` `(batch,)` int, the partner of each image, `mix_box` `(batch, 4)` int,
      the CutMix rectangle taken from the partner, and `mix_weights` `(batch, 2)` float, the weight of the image
      (against its partner's) for the pixels outside the rectangle and for the targets.

    Returns the batch with `pixel_values` as normalised float32 `(batch, 3, S, S)`, without `augmentation`, and with
    soft `(batch, num_labels)` and `(batch, num_coarse_labels)` targets when it was mixed.

    Images with the 'original' policy's geometry or jitter are converted to float first and resized in float; the
    others are resized in 8 bits (as `v2.Resize` does on 8-bit tensors) and then normalised, so evaluation batches
    match `build_eval_transform`.

    Example:

    ```python
    >>> preprocess = DevicePreprocessor(config).to("cuda")
    >>> batch = preprocess({"pixel_values": torch.zeros(8, 3, 32, 32, dtype=torch.uint8, device="cuda")})
    >>> batch["pixel_values"].shape, batch["pixel_values"].dtype
    (torch.Size([8, 3, 224, 224]), torch.float32)
    ```
    """

    def __init__(self, config: HierarchicalEfficientNetV2Config):
        super().__init__()
        self.image_size = config.image_size
        self.num_labels = config.num_labels
        mean = torch.tensor(config.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(config.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)  # 8-bit values to normalised, fused
        self.register_buffer("shift", -mean / std, persistent=False)
        self.register_buffer("grey_weights", torch.tensor(GREY_WEIGHTS).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("hierarchy", config.hierarchy_matrix(), persistent=False)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        augmentation = batch.get("augmentation") or {}
        pixel_values = self.model_input(batch["pixel_values"], augmentation)
        if "erase_box" in augmentation:
            pixel_values = pixel_values.masked_fill(box_mask(augmentation["erase_box"], pixel_values.shape[-2:]), 0.0)
        outputs = {"pixel_values": pixel_values}
        outputs.update((key, value) for key, value in batch.items() if key not in ("pixel_values", "augmentation"))
        if "mix_index" in augmentation:
            outputs["pixel_values"], outputs["labels"], outputs["coarse_labels"] = self.mix(
                pixel_values, batch["labels"], augmentation
            )
        return outputs

    def model_input(self, pixels: torch.Tensor | list[torch.Tensor], augmentation: dict[str, torch.Tensor]):
        """8-bit images (with the per-image steps of `augmentation`) -> normalised float `(batch, 3, S, S)`."""
        if isinstance(pixels, (list, tuple)):
            return self._model_input_by_size(pixels, augmentation)
        if pixels.is_floating_point():
            return pixels
        if pixels.dtype != torch.uint8:
            raise ValueError(f"pixel_values must be uint8 images or normalised floats, got {pixels.dtype}")
        if not any(step in augmentation for step in PER_IMAGE_STEPS):
            resized = TF.resize(pixels, [self.image_size, self.image_size], antialias=True)  # bilinear, 8 bits
            return torch.addcmul(self.shift, resized, self.scale)  # float32 by type promotion
        pixels = pixels.float().div_(255.0)  # (batch, 3, H, W) in [0, 1]
        if "affine" in augmentation:
            grid = F.affine_grid(augmentation["affine"].float(), list(pixels.shape), align_corners=False)
            pixels = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if "jitter_factors" in augmentation:
            pixels = self.jitter(pixels, augmentation["jitter_factors"], augmentation["jitter_order"])
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
        return (pixels - self.mean) / self.std

    def _model_input_by_size(self, images: list[torch.Tensor], augmentation: dict[str, torch.Tensor]) -> torch.Tensor:
        """`model_input` of images of different sizes: one group per size, put back in batch order."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for position, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(position)
        output = None
        for positions in groups.values():
            index = torch.tensor(positions, device=images[positions[0]].device)
            steps = {key: augmentation[key][index] for key in PER_IMAGE_STEPS if key in augmentation}
            part = self.model_input(torch.stack([images[p] for p in positions]), steps)
            if output is None:
                output = part.new_empty((len(images), *part.shape[1:]))
            output[index] = part
        return output

    def jitter(self, pixels: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast and saturation of `[0, 1]` images, each image with its own factors and order
        (`v2.ColorJitter`'s blends: with black, with the mean grey level, with the grey image)."""
        factors = factors.float()
        for step in range(3):
            op = order[:, step]
            factor = factors.gather(1, op.view(-1, 1)).view(-1, 1, 1, 1)
            grey = (pixels * self.grey_weights).sum(dim=1, keepdim=True)  # (batch, 1, H, W)
            target = torch.where(op.view(-1, 1, 1, 1) == 1, grey.mean(dim=(2, 3), keepdim=True), grey)
            target = target * (op != 0).view(-1, 1, 1, 1)  # brightness blends with black
            pixels = torch.lerp(target, pixels, factor).clamp_(0.0, 1.0)
        return pixels

    def mix(
        self, pixels: torch.Tensor, labels: torch.Tensor, augmentation: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MixUp/CutMix with the drawn partners, rectangles and weights; returns pixels, fine and coarse targets."""
        index, weights = augmentation["mix_index"], augmentation["mix_weights"].float()
        partner = pixels[index]
        blended = torch.lerp(partner, pixels, weights[:, 0].view(-1, 1, 1, 1))  # exactly `pixels` at weight 1
        pixels = torch.where(box_mask(augmentation["mix_box"], pixels.shape[-2:]), partner, blended)
        targets = torch.zeros(len(labels), self.num_labels, device=labels.device)
        targets.scatter_(1, labels.view(-1, 1), 1.0)  # one-hot (batch, num_labels), without reading labels back
        targets = targets * weights[:, 1:2] + targets[index] * (1.0 - weights[:, 1:2])
        return pixels, targets, targets @ self.hierarchy  # coarse: (batch, num_coarse_labels)


def box_mask(boxes: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """`(batch, 1, H, W)` mask of the `(top, left, bottom, right)` rectangle of each image (bottom, right excluded)."""
    top, left, bottom, right = boxes.unbind(1)
    rows = torch.arange(size[0], device=boxes.device)
    columns = torch.arange(size[1], device=boxes.device)
    inside_rows = (rows >= top[:, None]) & (rows < bottom[:, None])  # (batch, H)
    inside_columns = (columns >= left[:, None]) & (columns < right[:, None])  # (batch, W)
    return (inside_rows[:, :, None] & inside_columns[:, None, :]).unsqueeze(1)


__all__ = ["DevicePreprocessor", "box_mask"]
