"""Decoding a stored image (bytes or a file path) into an 8-bit RGB image, within a pixel limit, with the model's
own decoder (`image_processing_hierarchical.decode_rgb`, saved with every model), so training, evaluation and the
pipelines see the same pixels."""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch
from torchvision.transforms import v2

from image_processing_hierarchical import DEFAULT_MAX_IMAGE_PIXELS, as_decodable, check_regular_file, decode_rgb


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert a PIL image of any mode (L, P, RGBA, I;16, F, ...) to 8-bit RGB at its size, as `decode_rgb` does."""
    return decode_rgb(image, max_pixels=None, where="the image")


def decode_image(
    value: Any,
    index: int,
    split: str = "train",
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    image_size: int | None = None,
) -> PIL.Image.Image:
    """Decode one value of an `Image(decode=False)` column (or a PIL image) into 8-bit RGB with `decode_rgb`;
    `ValueError` names the row.

    An image larger than `max_pixels` (width x height) is refused from its header, before it is decoded; a `path`
    must name a regular file; with `image_size`, sides above twice that are reduced while decoding.
    """
    where = f"row index={index} of split {split!r}"
    return decode_rgb(as_decodable(value, where), image_size, max_pixels, where)


def decode_to_tensor(
    value: Any,
    index: int,
    split: str = "train",
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    image_size: int | None = None,
) -> torch.Tensor:
    """`decode_image`, as an 8-bit RGB `(3, H, W)` tensor."""
    return v2.functional.pil_to_tensor(decode_image(value, index, split, max_pixels, image_size))


__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "check_regular_file", "decode_image", "decode_to_tensor", "to_rgb"]
