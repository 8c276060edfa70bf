"""Decoding a stored image (bytes or a file path) into an 8-bit RGB image, within a pixel limit."""

from __future__ import annotations

import io
import os
import stat
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torchvision.transforms import v2

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


def check_regular_file(path: str, where: str) -> None:
    """`ValueError` naming `where` unless `path` is a regular file (a FIFO would block, a device never ends)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise ValueError(f"the image of {where} is the path {path!r}, which cannot be read: {error}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"the image of {where} is the path {path!r}, which is not a regular file")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert a PIL image of any mode (L, P, RGBA, I;16, F, ...) to 8-bit RGB; see `to_eight_bit` for deep pixels."""
    if image.mode == "RGB":
        return image
    image = to_eight_bit(image)
    if image.mode == "P":
        image = image.convert("RGBA")  # palettes may carry transparency
    return image.convert("RGB")


def to_eight_bit(image: PIL.Image.Image, where: str = "the image") -> PIL.Image.Image:
    """Grey images deeper than 8 bits -> 8-bit "L", scaled by the range their mode stands for; others unchanged.

    "I;16*" (16-bit): divided by 257. "I" (32-bit integers): read as 8-bit when every value is within [0, 255], as
    16-bit (divided by 257) within [0, 65535], refused beyond. "F" (32-bit float): [0, 1] is scaled by 255, [0, 255]
    kept; negative, larger or non-finite values are refused. `ValueError` names `where`.
    """
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    array = np.asarray(image, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: {image.mode} pixels include NaN or infinity")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        array = array / 257.0
    elif image.mode == "F":
        if low < 0 or high > 255:
            raise ValueError(
                f"{where}: 32-bit float pixels in [{low:g}, {high:g}], neither in [0, 1] nor in [0, 255]; "
                "convert the image to 8 bits"
            )
        if high <= 1.0:
            array = array * 255.0
    else:
        if low < 0 or high > 65535:
            raise ValueError(
                f"{where}: 32-bit integer pixels in [{low:g}, {high:g}], beyond the 16-bit range [0, 65535]; "
                "convert the image to 8 or 16 bits"
            )
        if high > 255:
            array = array / 257.0  # 16-bit data
    return PIL.Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))


def decode_image(
    value: Any, index: int, split: str = "train", max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> PIL.Image.Image:
    """Decode one value of an `Image(decode=False)` column (a PIL image passes through); `ValueError` names the row.

    An image larger than `max_pixels` (width x height) is refused from its header, before it is decoded; a `path`
    must name a regular file; grey images deeper than 8 bits are converted by `to_eight_bit`.
    """
    if isinstance(value, PIL.Image.Image):
        return value
    where = f"row index={index} of split {split!r}"
    if value.get("bytes") is None and value.get("path") is not None:
        check_regular_file(value["path"], where)  # before opening: a FIFO would block
    try:
        if value.get("bytes") is not None:
            image = PIL.Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path") is not None:
            image = PIL.Image.open(value["path"])
        else:
            raise ValueError("the row has neither image bytes nor an image path")
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise _ImageTooLarge(
                f"the image of {where} is {image.width}x{image.height} = {image.width * image.height:,} pixels, "
                f"above the limit of {max_pixels:,} (--max_image_pixels)"
            )
        image.load()
    except _ImageTooLarge as error:
        raise ValueError(str(error)) from None
    except Exception as error:  # PIL raises OSError, SyntaxError, struct.error, ... for broken files
        raise ValueError(
            f"could not decode the image of row index={index} of split {split!r}: {type(error).__name__}: {error}"
        ) from error
    if image.getexif().get(PIL.Image.ExifTags.Base.Orientation) is not None:  # as datasets' Image feature does
        image = PIL.ImageOps.exif_transpose(image)
    return to_eight_bit(image, where)


class _ImageTooLarge(Exception):
    """An image above the pixel limit, raised inside `decode_image`'s guarded block."""


def decode_to_tensor(
    value: Any, index: int, split: str = "train", max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """`decode_image`, then convert to an 8-bit RGB `(3, H, W)` tensor."""
    return v2.functional.pil_to_tensor(to_rgb(decode_image(value, index, split, max_pixels)))
