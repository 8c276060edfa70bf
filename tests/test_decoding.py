"""One decoder for training, evaluation and serving: every accepted PIL mode gives the same model input through
training's evaluation transform, the evaluation batches, the saved image processor and both pipelines; the pixel
limit is read from the header everywhere; large images are reduced while decoded."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from transformers import AutoImageProcessor, pipeline

from conftest import encode_image, make_parquet_dataset, small_config
from hierarchical.data.augmentation import build_eval_transform
from hierarchical.data.decoding import decode_image, decode_to_tensor
from hierarchical.data.device_preprocess import DevicePreprocessor
from hierarchical.training import saved_model
from image_processing_hierarchical import decode_rgb, decoded_side_bound

CONFIG = small_config()  # 32 px: images above 64 px on a side are reduced while decoded
# Every mode the project reads: PIL's image modes that an image file can hold.
MODES = ("1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I;16B", "I;16L", "I", "F", "LAB", "LA", "PA", "YCbCr", "HSV")
MODES += ("RGBX",)


@pytest.fixture(scope="module")
def serving(saved_model_dir: Path) -> dict:
    """The saved model's image processor and both pipelines, loaded as a user loads them."""
    directory = str(saved_model_dir)
    return {
        "image processor": AutoImageProcessor.from_pretrained(directory, trust_remote_code=True),
        "image-classification": pipeline("image-classification", model=directory, trust_remote_code=True),
        "hierarchical-image-classification": pipeline(
            "hierarchical-image-classification", model=directory, trust_remote_code=True
        ),
    }


def random_image(mode: str, size: tuple[int, int], rng: np.random.Generator, top: float) -> PIL.Image.Image:
    """An image of `mode` and `size` with random values; "I" and "F" values in [0, `top`) (16-bit data or 8-bit in
    "I", [0, 1] or [0, 255] in "F")."""
    shape = size[::-1]
    if mode.startswith("I;16"):
        values = rng.integers(0, 65536, shape, dtype=np.uint16)
        return PIL.Image.frombytes(mode, size, values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    if mode == "I":
        return PIL.Image.fromarray(rng.integers(0, int(top), shape).astype(np.int32))
    if mode == "F":
        return PIL.Image.fromarray((rng.random(shape) * top).astype(np.float32))
    if mode == "1":
        return PIL.Image.fromarray(rng.random(shape) < 0.5)
    image = PIL.Image.new(mode, size)
    image.frombytes(rng.integers(0, 256, size[0] * size[1] * len(image.getbands()), dtype=np.uint8).tobytes())
    if mode in ("P", "PA"):
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return image


SIDES = st.integers(1, 80)


@st.composite
def images(draw: st.DrawFn, modes: tuple[str, ...] = MODES, sides: st.SearchStrategy[int] = SIDES) -> PIL.Image.Image:
    """A small image in one of `modes`, its sides drawn from `sides` (above twice the model size, 64 px: reduced
    while decoded), with values over the whole range its mode stands for."""
    mode = draw(st.sampled_from(modes))
    size = (draw(sides), draw(sides))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    top = {"I": draw(st.sampled_from([256, 65536])), "F": draw(st.sampled_from([1.0, 255.0]))}.get(mode, 0)
    return random_image(mode, size, rng, top)


@given(image=images())
def test_every_path_gives_the_model_the_same_pixels(serving, image):
    expected = build_eval_transform(CONFIG)(image)  # training's evaluation transform, (3, 32, 32)
    batch = {"pixel_values": decode_to_tensor(image, 0, "test", image_size=CONFIG.image_size)[None]}
    paths = {"evaluation batches": DevicePreprocessor(CONFIG)(batch)["pixel_values"][0]}
    paths["image processor"] = serving["image processor"](image, return_tensors="pt")["pixel_values"][0]
    for task in ("image-classification", "hierarchical-image-classification"):
        paths[task] = serving[task].preprocess(image)["pixel_values"][0]
    for name, pixels in paths.items():
        assert torch.equal(pixels, expected), f"{image.mode} {image.size}: {name} differs from the evaluation transform"


# What each file format can hold, of the modes above (GIF and BMP hold no EXIF orientation).
FILE_MODES = {
    "PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"),
    "TIFF": ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "LAB", "YCbCr", "I;16", "I;16B", "I", "F"),
    "JPEG": ("L", "RGB", "CMYK"),
    "GIF": ("L", "P"),
    "BMP": ("1", "L", "P", "RGB"),
}
EXIF_FORMATS = ("PNG", "TIFF", "JPEG")


@st.composite
def image_files(draw: st.DrawFn) -> tuple[str, PIL.Image.Image, int]:
    """A format, an image in a mode it holds, its sides either small or at least 4 x the model size (a JPEG that
    large could be decoded at half scale), and an EXIF orientation (1 to 8; 1 is upright) where the format holds
    one."""
    format = draw(st.sampled_from(sorted(FILE_MODES)))
    image = draw(images(FILE_MODES[format], sides=st.integers(1, 48) | st.integers(128, 300)))
    orientation = draw(st.integers(1, 8)) if format in EXIF_FORMATS else 1
    return format, image, orientation


UPRIGHT_TIFF = ("TIFF", PIL.Image.fromarray(np.arange(6, dtype=np.uint8).reshape(2, 3)), 6)  # mapped from its path


@given(file=image_files())
@example(file=UPRIGHT_TIFF)
@example(file=("JPEG", PIL.Image.new("RGB", (300, 200), (40, 90, 200)), 1))  # decoded at 1/2 scale from its path
def test_a_file_gives_the_same_pixels_however_it_is_handed_over(serving, tmp_path_factory, file):
    """Its path, its bytes, `PIL.Image.open` of it (loaded or not), to the training data, training's evaluation
    transform, the image processor and both pipelines: one model input (EXIF orientation applied alike)."""
    format, image, orientation = file
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = orientation
    path = tmp_path_factory.mktemp("file") / f"image.{format.lower()}"
    image.save(path, format, **({"exif": exif.tobytes()} if format in EXIF_FORMATS else {}))

    def opened() -> PIL.Image.Image:
        return PIL.Image.open(path)

    def loaded() -> PIL.Image.Image:
        image = PIL.Image.open(path)
        image.load()
        return image

    def training_data(stored: dict) -> torch.Tensor:  # a row of an `Image(decode=False)` column, as evaluated
        pixels = decode_to_tensor(stored, 0, "test", image_size=CONFIG.image_size)[None]
        return DevicePreprocessor(CONFIG)({"pixel_values": pixels})["pixel_values"][0]

    expected = training_data({"bytes": None, "path": str(path)})
    paths = {"training data, bytes": training_data({"bytes": path.read_bytes(), "path": None})}
    processor = serving["image processor"]
    # Pillow 13 maps an uncompressed TIFF opened by its path into memory and scrambles it when its EXIF orientation
    # swaps the sides: such an image object is wrong before any code of ours sees it (the path and bytes are not)
    user_opened = [] if format == "TIFF" and orientation >= 5 else [("opened", opened), ("loaded", loaded)]
    for how, given_as in user_opened:
        paths[f"evaluation transform, {how}"] = build_eval_transform(CONFIG)(given_as())
        paths[f"image processor, {how}"] = processor(given_as(), return_tensors="pt")["pixel_values"][0]
    paths["image processor, path"] = processor(str(path), return_tensors="pt")["pixel_values"][0]
    for task in ("image-classification", "hierarchical-image-classification"):
        paths[f"{task}, path"] = serving[task].preprocess(str(path))["pixel_values"][0]
        for how, given_as in user_opened:
            paths[f"{task}, {how}"] = serving[task].preprocess(given_as())["pixel_values"][0]
    for name, pixels in paths.items():
        assert torch.equal(pixels, expected), f"{format} {image.mode} {image.size} {orientation}: {name} differs"


@st.composite
def arrays(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """An `(H, W)`, `(H, W, 1)`, `(H, W, 3)` or `(H, W, 4)` array of 8-bit values, as uint8, as float in [0, 1] or
    as float in [0, 255]; and its 8-bit values (the channel of 1 dropped)."""
    channels = draw(st.sampled_from([(), (1,), (3,), (4,)]))
    shape = (draw(st.integers(1, 40)), draw(st.integers(1, 40)), *channels)
    values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, shape, dtype=np.uint8)
    kind = draw(st.sampled_from(["uint8", "unit float", "float"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    if kind == "float":
        values.flat[0] = 255  # above 1: read as [0, 255]
    array = {"uint8": values, "unit float": values / dtype(255), "float": values.astype(dtype)}[kind]
    return array, values[..., 0] if channels == (1,) else values


@given(given=arrays())
def test_arrays_and_tensors_give_the_pixels_of_their_values(serving, given):
    """An array, the `(C, H, W)` tensor of it and the 8-bit image of its values give one model input (float by the
    rule of float images, rounded, never wrapped or truncated)."""
    array, values = given
    expected = serving["image processor"](PIL.Image.fromarray(values), return_tensors="pt")["pixel_values"][0]
    tensor = torch.from_numpy(array)
    tensor = tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor
    paths = {
        "image processor, array": serving["image processor"](array, return_tensors="pt")["pixel_values"][0],
        "image processor, tensor": serving["image processor"](tensor, return_tensors="pt")["pixel_values"][0],
    }
    for task in ("image-classification", "hierarchical-image-classification"):
        paths[f"{task}, array"] = serving[task].preprocess(array)["pixel_values"][0]
        paths[f"{task}, tensor"] = serving[task].preprocess(tensor)["pixel_values"][0]
    for name, pixels in paths.items():
        assert torch.equal(pixels, expected), f"{array.shape} {array.dtype}: {name} differs"


@pytest.mark.parametrize(
    ("image", "refused"),
    [
        (torch.full((3, 8, 8), 300.0), r"float pixels in \[300, 300\], neither in \[0, 1\] nor in \[0, 255\]"),
        (np.full((8, 8, 3), -0.5), r"float pixels in \[-0.5, -0.5\]"),
        (np.full((8, 8, 3), np.nan, dtype=np.float32), "float pixels include NaN or infinity"),
        (np.zeros((8, 8, 3), dtype=np.uint16), r"an array of shape \(8, 8, 3\) and type uint16 is not an image"),
        (np.zeros((3, 8, 8), dtype=np.uint8), r"an array of shape \(3, 8, 8\) and type uint8 is not an image"),
    ],
)
def test_arrays_and_tensors_out_of_range_or_shape_are_refused(serving, image, refused):
    for name in ("image processor", "hierarchical-image-classification"):
        with pytest.raises(ValueError, match=refused):
            serving[name](image)


def with_exif_chunk(png: bytes, exif: bytes) -> bytes:
    """`png` with an `eXIf` chunk holding `exif`, right after its header chunk."""
    chunk = b"eXIf" + exif
    header_end = 8 + 25  # the signature, then IHDR: length, type, 13 bytes, CRC
    return (
        png[:header_end]
        + struct.pack(">I", len(exif))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + png[header_end:]
    )


@given(exif=st.binary(max_size=64) | st.builds(lambda tail: b"MM\x00*" + tail, st.binary(max_size=60)))
@example(exif=b"\x00\x01\x02\x03garbage")  # PIL: SyntaxError, not a TIFF file
def test_any_exif_data_is_read_or_refused_naming_the_row(exif):
    png = with_exif_chunk(encode_image(PIL.Image.new("RGB", (20, 10), (40, 90, 200))), exif)
    try:
        decoded = decode_image({"bytes": png, "path": None}, 5, "train", image_size=CONFIG.image_size)
    except ValueError as error:
        assert "row index=5 of split 'train'" in str(error)
    else:
        assert decoded.mode == "RGB" and sorted(decoded.size) == [10, 20]


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(serving):
    grey = PIL.Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32))  # mid-grey in [0, 1]
    deep = PIL.Image.fromarray(np.full((32, 32), 32896, dtype=np.uint16))  # 128 x 257
    for image in (grey, deep):
        pixels = serving["image-classification"].preprocess(image)["pixel_values"][0]
        torch.testing.assert_close(pixels, build_eval_transform(CONFIG)(PIL.Image.new("RGB", (32, 32), (128,) * 3)))


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12,000 x 12,000 1-bit PNG of a few KB: 144 megapixels, above the default limit of 50 million."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    PIL.Image.new("1", (12_000, 12_000)).save(path)
    assert path.stat().st_size < 100_000
    return path


HUGE_MESSAGE = r"12000x12000 = 144,000,000 pixels, above the limit of 50,000,000 \(--max_image_pixels\)"


@pytest.mark.parametrize("task", ["image-classification", "hierarchical-image-classification"])
def test_pipelines_refuse_an_image_above_the_limit_from_its_header(serving, huge_png, task):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=HUGE_MESSAGE):
        serving[task](str(huge_png))
    assert time.perf_counter() - start < 1.0  # decoding it would take seconds and 576 MB as RGB


def test_image_processor_refuses_an_image_above_the_limit_from_its_header(serving, huge_png):
    with pytest.raises(ValueError, match=HUGE_MESSAGE):
        serving["image processor"](str(huge_png))


def test_eval_report_refuses_an_image_above_the_limit_from_its_header(saved_model_dir, huge_png, tmp_path):
    data = tmp_path / "data"
    make_parquet_dataset(data, split="test", image_bytes={1: huge_png.read_bytes()})
    start = time.perf_counter()
    with pytest.raises(ValueError, match="row index=1 of split 'test' is " + HUGE_MESSAGE):
        saved_model.evaluate_saved_model(saved_model_dir, str(data), split="test", output_dir=tmp_path / "report")
    assert time.perf_counter() - start < 30.0
    assert not (tmp_path / "report" / "eval_report.md").exists()


@pytest.mark.parametrize("task", ["image-classification", "hierarchical-image-classification"])
def test_pipelines_name_a_file_that_is_not_an_image(serving, tmp_path, task):
    path = tmp_path / "notes.png"
    path.write_text("not a picture\n")
    with pytest.raises(ValueError, match=f"the file '{path}' is not an image"):
        serving[task](str(path))


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_large_images_are_reduced_while_decoded(format):
    ramp = np.arange(3000, dtype=np.uint8)  # wraps: stripes of 256 levels
    image = PIL.Image.fromarray(np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], ramp[:, None]), -1))
    encoded = encode_image(image, format)
    bound = decoded_side_bound(CONFIG.image_size)  # 4 x 32 - 1 = 127 px a side
    decoded = decode_image({"bytes": encoded, "path": None}, 0, "train", image_size=CONFIG.image_size)
    assert decoded.mode == "RGB" and max(decoded.size) <= bound and min(decoded.size) >= 2 * CONFIG.image_size
    tall = decode_rgb(encode_image(PIL.Image.new("L", (70, 3000)), format), CONFIG.image_size)
    assert tall.size[0] == 70 and 64 <= tall.size[1] <= bound  # each side on its own
    assert decode_rgb(io.BytesIO(encoded).getvalue()).size == (3000, 3000)  # no model size: the source size
