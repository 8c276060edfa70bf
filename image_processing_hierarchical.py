"""How an image becomes the model's input, the same way in training, evaluation and serving.

`decode_rgb` turns a file path, encoded bytes or a PIL image of any mode into the 8-bit RGB image every transform
starts from: an image above the pixel limit is refused from its header, before it is decoded; deeper pixels are
scaled to 8 bits by the range their mode stands for; an image much larger than the model's input is reduced while it
is decoded. `HierarchicalImageProcessor` (saved with every model as `preprocessor_config.json`) and both pipelines
decode through it; so do the training script's datasets (`hierarchical/data/decoding.py`).

Saved beside the model (`modeling_hierarchical.py` and `pipeline_hierarchical.py` import it by relative import), so
it imports only `configuration_hierarchical.py`, torch, torchvision, transformers and what they install (numpy, PIL).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from typing import Any, BinaryIO

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torchvision.transforms import v2
from transformers import ViTImageProcessor
from transformers.image_processing_utils import BatchFeature

try:  # loaded as a Hub module (trust_remote_code) or inside a package
    from .configuration_hierarchical import DEFAULT_MAX_IMAGE_PIXELS
except ImportError:  # imported from the project folder
    from configuration_hierarchical import DEFAULT_MAX_IMAGE_PIXELS

# A decoded image keeps at least this many times the model's image size on each side (when its source has it), so
# the crop, rotation and antialiased resize that follow still sample it finely; it is reduced by an integer factor
# per side down to that, which leaves each side below twice as much: under 4 x image_size.
DECODE_SIDE_PER_IMAGE_SIZE = 2
DEEP_MODES = ("I", "F")  # 32-bit integer and float pixels, scaled to 8 bits by `to_eight_bit`


def check_regular_file(path: str | os.PathLike, where: str) -> None:
    """`ValueError` naming `where` unless `path` is a regular file (a FIFO would block, a device never ends)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise ValueError(f"the image of {where} is the path {str(path)!r}, which cannot be read: {error}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"the image of {where} is the path {str(path)!r}, which is not a regular file")


def decoded_side_bound(image_size: int) -> int:
    """The longest side a decoded image can have for a model of `image_size`: below 2 x 2 x `image_size`."""
    return 2 * DECODE_SIDE_PER_IMAGE_SIZE * image_size - 1


def reduction_factors(size: tuple[int, int], image_size: int | None) -> tuple[int, int]:
    """Integer factors `(x, y)` that bring each side of `size` down to [`image_size` x 2, `image_size` x 4), sides
    already below `image_size` x 2 staying as they are; `(1, 1)` without an `image_size`."""
    if image_size is None:
        return 1, 1
    target = DECODE_SIDE_PER_IMAGE_SIZE * image_size
    return max(1, size[0] // target), max(1, size[1] // target)


def check_pixel_limit(image: PIL.Image.Image, where: str, max_pixels: int | None) -> None:
    """`ValueError` naming `where` when `image` (width x height, known from the header) is above `max_pixels`."""
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ValueError(
            f"the image of {where} is {image.width}x{image.height} = {image.width * image.height:,} pixels, "
            f"above the limit of {max_pixels:,} (--max_image_pixels)"
        )


def open_image(source: str | os.PathLike | bytes | BinaryIO, where: str, max_pixels: int | None) -> PIL.Image.Image:
    """Open (not decode) an encoded image: a file path, bytes or an open binary file; `ValueError` naming `where` for
    a file that is not an image or an image above `max_pixels` (width x height, read from the header)."""
    if isinstance(source, bytes | bytearray):
        stream: Any = io.BytesIO(source)
        named = "its bytes are"
    elif isinstance(source, str | os.PathLike):
        check_regular_file(source, where)  # before opening: a FIFO would block
        stream, named = source, f"the file {str(source)!r} is"
    else:
        stream, named = source, f"the file {getattr(source, 'name', '')!r} is"
    try:
        with warnings.catch_warnings():  # PIL's own size warning: the limit that applies is `max_pixels`
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(stream)
    except PIL.UnidentifiedImageError:
        raise ValueError(f"the image of {where}: {named} not an image (PIL cannot identify the format)") from None
    except Exception as error:  # OSError, PIL's DecompressionBombError, struct.error, ... for broken headers
        raise ValueError(f"the image of {where} cannot be read: {type(error).__name__}: {error}") from None
    try:
        check_pixel_limit(image, where, max_pixels)
    except ValueError:
        image.close()
        raise
    return image


def load_image(source: str | os.PathLike | bytes, where: str, max_pixels: int | None) -> PIL.Image.Image:
    """Decode an encoded image (file path or bytes) as PIL stores it; `ValueError` naming `where` for a file that
    cannot be read, is not an image or is broken, and for an image above `max_pixels` (width x height, from the
    header, before decoding)."""
    if isinstance(source, bytes | bytearray):
        image = open_image(source, where, max_pixels)
        load_pixels(image, where)
        return image
    check_regular_file(source, where)  # before opening: a FIFO would block
    try:
        # a file object, not the path: given a path PIL maps an uncompressed file into memory, and then (Pillow 13)
        # scrambles a TIFF whose EXIF orientation swaps its sides, where the file's bytes decode right
        file = open(source, "rb")  # noqa: SIM115 (closed by the `with` below)
    except OSError as error:
        raise ValueError(f"the image of {where} is the path {str(source)!r}, which cannot be read: {error}") from None
    with file:
        image = open_image(file, where, max_pixels)
        load_pixels(image, where)
    return image


def load_pixels(image: PIL.Image.Image, where: str) -> None:
    """Decode a PIL image opened from a file (nothing for one in memory); `ValueError` naming `where` when broken."""
    try:
        image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, struct.error, ... for broken files
        raise ValueError(f"could not decode the image of {where}: {type(error).__name__}: {error}") from error


def decode_rgb(
    source: str | os.PathLike | bytes | PIL.Image.Image,
    image_size: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    where: str = "the input",
) -> PIL.Image.Image:
    """The one decoder: a file path, encoded bytes or a PIL image of any mode -> an 8-bit RGB PIL image.

    Args:
        source (`str`, `os.PathLike`, `bytes` or `PIL.Image.Image`): the image.
        image_size (`int`, *optional*): the model's input size. Each side larger than 2 x `image_size` is reduced
            by an integer factor (`Image.reduce`, a box filter, right after the decoding) to [2 x, 4 x)
            `image_size`; `None` keeps the source size.
        max_pixels (`int`, *optional*, defaults to 50,000,000): larger images (width x height) are refused from
            their header, before decoding.
        where (`str`, *optional*): what error messages call the image (a row, a file).

    The pixels depend only on the image, never on how it is given: its path, its bytes and `PIL.Image.open` of it,
    loaded or not, decode alike (so no JPEG is decoded at a reduced scale with `Image.draft`, which only a file not
    yet loaded allows). EXIF orientation is applied. Modes: "1" and "L" become grey, "P", "PA", "LA", "RGBA", "CMYK",
    "LAB", "YCbCr", ... convert to RGB as PIL converts them (alpha dropped, palettes looked up); "I;16*" (16-bit) is
    divided by 257, "I" and "F" follow `to_eight_bit` (their range is read before the reduction). `ValueError` names
    `where`.
    """
    if isinstance(source, PIL.Image.Image):
        image = source
        check_pixel_limit(image, where, max_pixels)
        load_pixels(image, where)  # `PIL.Image.open` of a file, not loaded yet
    else:
        image = load_image(source, where, max_pixels)
    image = upright(image, where)
    scale = eight_bit_scale(image, where)  # from the whole source, before the reduction averages it
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode.startswith("I;16"):
        image = image.convert("I")  # exact; Image.reduce takes no 16-bit modes
    elif image.mode not in ("L", "RGB") + DEEP_MODES:
        image = image.convert("RGBA" if image.mode in ("P", "PA") else "RGB").convert("RGB")
    factors = reduction_factors(image.size, image_size)
    if factors != (1, 1):
        image = image.reduce(factors)
    if scale is not None:
        image = to_eight_bit(image, where, scale)
    return image if image.mode == "RGB" else image.convert("RGB")


def upright(image: PIL.Image.Image, where: str = "the image") -> PIL.Image.Image:
    """`image` turned as its EXIF orientation says (as `datasets`' Image feature turns it); `ValueError` naming
    `where` when its EXIF data cannot be read."""
    try:
        orientation = image.getexif().get(PIL.Image.ExifTags.Base.Orientation)
        return image if orientation is None else PIL.ImageOps.exif_transpose(image)
    except Exception as error:  # PIL raises SyntaxError, struct.error, ... for broken EXIF data
        raise ValueError(
            f"the EXIF data of the image of {where} cannot be read: {type(error).__name__}: {error}"
        ) from None


def eight_bit_scale(image: PIL.Image.Image, where: str = "the image") -> float | None:
    """The factor that brings a grey image deeper than 8 bits to [0, 255], by the range its mode stands for; `None`
    for 8-bit modes.

    "I;16*" (16-bit): 1 / 257. "I" (32-bit integers): 1 when every value is within [0, 255], 1 / 257 within
    [0, 65535], refused beyond. "F" (32-bit float): 255 for [0, 1], 1 for [0, 255]; negative, larger or non-finite
    values are refused. `ValueError` names `where`.
    """
    if image.mode.startswith("I;16"):
        return 1 / 257
    if image.mode not in DEEP_MODES:
        return None
    low, high = (float(value) for value in image.getextrema())
    if image.mode == "F":
        return float_scale(low, high, where)
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"{where}: {image.mode} pixels include NaN or infinity")
    if low < 0 or high > 65535:
        raise ValueError(
            f"{where}: 32-bit integer pixels in [{low:g}, {high:g}], beyond the 16-bit range [0, 65535]; "
            "convert the image to 8 or 16 bits"
        )
    return 1 / 257 if high > 255 else 1.0  # 16-bit data, or 8-bit data held in 32 bits


def float_scale(low: float, high: float, where: str = "the image") -> float:
    """The factor that brings float pixels from [`low`, `high`] to [0, 255]: 255 for [0, 1], 1 for [0, 255];
    `ValueError` naming `where` for NaN, infinity or values beyond."""
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"{where}: float pixels include NaN or infinity")
    if low < 0 or high > 255:
        raise ValueError(
            f"{where}: float pixels in [{low:g}, {high:g}], neither in [0, 1] nor in [0, 255]; "
            "convert the image to 8 bits"
        )
    return 255.0 if high <= 1.0 else 1.0


def to_eight_bit(image: PIL.Image.Image, where: str = "the image", scale: float | None = None) -> PIL.Image.Image:
    """Grey images deeper than 8 bits -> 8-bit "L", multiplied by `scale` (by default `eight_bit_scale` of the
    image), rounded; others unchanged. `ValueError` names `where` for NaN or infinite pixels."""
    if scale is None:
        scale = eight_bit_scale(image, where)
    if scale is None:
        return image
    array = np.asarray(image, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: {image.mode} pixels include NaN or infinity")
    return PIL.Image.fromarray(np.clip(np.rint(array * scale), 0, 255).astype(np.uint8))


class ToNormalizedFloat(torch.nn.Module):
    """uint8 (3, H, W) tensor -> float32 `(x / 255 - mean) / std`: `v2.ToDtype(scale=True)` + `v2.Normalize`, fused.

    One multiply-add instead of four passes with their per-call dispatch, which dominate at 32 px: 32 against 212
    microseconds per 32 px image on one CPU thread.
    """

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        std_tensor = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale = 1.0 / (255.0 * std_tensor)
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_tensor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, image, self.scale)  # float32 by type promotion


def build_model_input_transform(
    image_size: int,
    image_mean: list[float],
    image_std: list[float],
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> v2.Compose:
    """An image (file path, encoded bytes or PIL image of any mode) -> the normalised `(3, S, S)` float tensor the
    model takes: [`decode_rgb`] (reduced for `image_size`), resize to `(image_size, image_size)` in 8 bits
    (bilinear, antialiased; nothing at that size) and normalisation with `image_mean` and `image_std`."""

    def decode(image: str | os.PathLike | bytes | PIL.Image.Image) -> PIL.Image.Image:
        return decode_rgb(image, image_size, max_pixels)

    return v2.Compose(
        [
            decode,
            v2.PILToTensor(),
            v2.Resize((image_size, image_size), antialias=True),
            ToNormalizedFloat(image_mean, image_std),
        ]
    )


class HierarchicalImageProcessor(ViTImageProcessor):
    r"""
    The image processor saved with every hierarchical model: each image goes through [`build_model_input_transform`],
    the steps of the training script's evaluation (one decoder for every PIL mode, the pixel limit, the reduction of
    large images, resize and normalisation), so a pipeline sees what evaluation saw.

    Args:
        max_image_pixels (`int`, *optional*, defaults to 50,000,000):
            Larger images (width x height) are refused from their header, before decoding; `None` for no limit.
        size (`dict`, *optional*): `{"height": S, "width": S}`, the model's image size.
        image_mean, image_std (`list[float]`, *optional*): normalisation.

    Images may be PIL images (any mode), file paths, encoded bytes, `(H, W)` or `(H, W, C)` arrays or `(C, H, W)`
    tensors (uint8, or float in [0, 1] or [0, 255]: [`array_image`]). Returns a `BatchFeature` with `pixel_values` `(batch, 3, S, S)` float32.

    Example:

    ```python
    >>> processor = HierarchicalImageProcessor(size={"height": 32, "width": 32})
    >>> processor(PIL.Image.new("I;16", (64, 48)), return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 3, 32, 32])
    ```
    """

    model_input_names = ["pixel_values"]

    def __init__(self, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, **kwargs: Any):
        super().__init__(**kwargs)
        if max_image_pixels is not None and (
            not isinstance(max_image_pixels, int) or isinstance(max_image_pixels, bool) or max_image_pixels < 1
        ):
            raise ValueError(f"max_image_pixels must be None or a positive integer, got {max_image_pixels!r}")
        self.max_image_pixels = max_image_pixels

    def preprocess(self, images: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        """`pixel_values` of one image or a list of images (see the class docstring)."""
        if kwargs:
            raise TypeError(f"HierarchicalImageProcessor takes only images and return_tensors, got {sorted(kwargs)}")
        images = list(images) if isinstance(images, list | tuple) else [images]
        image_size = max(self.size["height"], self.size["width"])
        transform = build_model_input_transform(image_size, self.image_mean, self.image_std, self.max_image_pixels)
        pixel_values = torch.stack([transform(as_decodable(image)) for image in images])  # (batch, 3, S, S)
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)


def as_decodable(image: Any, where: str = "the input") -> str | os.PathLike | bytes | PIL.Image.Image:
    """`image` as `decode_rgb` takes it: `(H, W)`/`(H, W, C)` arrays and `(C, H, W)` tensors become PIL images by
    [`array_image`], a `datasets` image as stored (`{"bytes": ..., "path": ...}`) its bytes, else its path
    (`ValueError` naming `where` without either); `TypeError` for anything else."""
    if isinstance(image, dict):
        source = image.get("bytes") if image.get("bytes") is not None else image.get("path")
        if source is None:
            raise ValueError(
                f"could not decode the image of {where}: the row has neither image bytes nor an image path"
            )
        return source
    if isinstance(image, torch.Tensor):  # read as the array it holds, by the same rules
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
        if image.ndim == 3:
            image = image.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if isinstance(image, np.ndarray):
        return array_image(image, where)
    if isinstance(image, str | os.PathLike | bytes | bytearray | PIL.Image.Image):
        return image
    raise TypeError(f"images must be PIL images, file paths, bytes, arrays or tensors, got {type(image).__name__}")


def array_image(array: np.ndarray, where: str = "the input") -> PIL.Image.Image:
    """An `(H, W)` or `(H, W, C)` array as a PIL image for `decode_rgb`: `(H, W, 1)` is `(H, W)`; a float colour
    image (C = 3 or 4) is brought to 8 bits by the rule of float images ([`float_scale`]: [0, 1] times 255, [0, 255]
    as it is, rounded; others refused); everything else as `PIL.Image.fromarray` reads it (grey float, 16-bit and
    32-bit integer images then follow `eight_bit_scale`). `ValueError` naming `where` for other shapes and types."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.dtype.kind == "f" and array.size:
        scale = float_scale(float(array.min()), float(array.max()), where)
        array = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    try:
        return PIL.Image.fromarray(array)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: an array of shape {array.shape} and type {array.dtype} is not an image; give (H, W) or "
            "(H, W, 3 or 4) values (uint8, or float in [0, 1] or [0, 255]; (H, W) also uint16 or int32), or a "
            "(C, H, W) tensor"
        ) from None


HierarchicalImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "HierarchicalImageProcessor",
    "ToNormalizedFloat",
    "array_image",
    "as_decodable",
    "build_model_input_transform",
    "check_regular_file",
    "decode_rgb",
    "decoded_side_bound",
    "eight_bit_scale",
    "float_scale",
    "reduction_factors",
    "to_eight_bit",
    "upright",
]
