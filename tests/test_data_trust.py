"""Data that would otherwise give a silently wrong model: label names, dataset layout, leaks, deep pixels, bombs,
paths and files that are not what they claim."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
from pathlib import Path

import datasets
import numpy as np
import pandas
import PIL.Image
import pyarrow
import pyarrow.parquet
import pytest
from transformers import HfArgumentParser

from configuration_hierarchical import (
    CIFAR100_COARSE_LABELS,
    CIFAR100_FINE_LABELS,
    CIFAR100_FINE_TO_COARSE,
)
from conftest import (
    NUM_FINE,
    data_args,
    encode_image,
    make_image_array,
    make_parquet_dataset,
    small_config,
    write_cifar_python,
)
from data_utils import (
    DataArguments,
    apply_transforms,
    decode_image,
    load_raw_datasets,
    prepare_datasets,
)
from hierarchical.options import PROJECT_LOGGER

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct


IMAGE_STRUCT = [("bytes", pyarrow.binary()), ("path", pyarrow.string())]


def column(split: datasets.Dataset, name: str) -> np.ndarray:
    return split.with_format("numpy")[:][name]


def png_images(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct 32 px PNG images; image i has the class colour of class i % 100."""
    rng = np.random.default_rng(seed)
    return [encode_image(PIL.Image.fromarray(make_image_array(i % NUM_FINE, rng))) for i in range(count)]


def write_named_parquet(
    path: Path, fine_names: list[str], coarse_names: list[str], class_order: list[str], split: str = "train"
) -> Path:
    """One image per class of `class_order`, with `ClassLabel` features named `fine_names` / `coarse_names`."""
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=fine_names),
            "coarse_label": datasets.ClassLabel(names=coarse_names),
        }
    )
    coarse_of = {
        name: CIFAR100_COARSE_LABELS[CIFAR100_FINE_TO_COARSE[i]] for i, name in enumerate(CIFAR100_FINE_LABELS)
    }
    coarse_of["cra"] = coarse_of["crab"]
    rows = {
        "img": [{"bytes": content, "path": None} for content in png_images(len(class_order))],
        "fine_label": [fine_names.index(name) for name in class_order],
        "coarse_label": [
            coarse_names.index(coarse_of[name]) if coarse_of.get(name) in coarse_names else 0 for name in class_order
        ],
    }
    path.mkdir(parents=True, exist_ok=True)
    file = path / f"{split}-00000-of-00001.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(file))
    return file


# ---------------------------------------------------------------------------------------------------------------
# Label names
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["parquet", "save_to_disk"])
def test_permuted_class_label_names_are_mapped_by_name(tmp_path, source):
    fine_names = CIFAR100_FINE_LABELS[::-1]  # "apple" is id 99 in this dataset
    coarse_names = CIFAR100_COARSE_LABELS[5:] + CIFAR100_COARSE_LABELS[:5]
    file = write_named_parquet(tmp_path / "data", fine_names, coarse_names, CIFAR100_FINE_LABELS)
    name = tmp_path / "data"
    if source == "save_to_disk":
        name = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_parquet(str(file))}).save_to_disk(str(name))
    train = prepare_datasets(data_args(tmp_path, name, train_val_split=0.0), small_config(), seed=0)["train"]
    np.testing.assert_array_equal(column(train, "labels"), np.arange(NUM_FINE))  # class i of the model is row i
    np.testing.assert_array_equal(column(train, "coarse_labels"), CIFAR100_FINE_TO_COARSE)


def test_cifar_python_meta_names_are_mapped_by_name(tmp_path):
    folder = write_cifar_python(tmp_path / "cifar-100-python", list(range(NUM_FINE)), [0, 1])
    permutation = np.random.default_rng(0).permutation(NUM_FINE)  # file id j is the class CIFAR100_FINE_LABELS[p[j]]
    meta = pickle.loads((folder / "meta").read_bytes())
    meta[b"fine_label_names"] = [CIFAR100_FINE_LABELS[p].encode() for p in permutation]
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=4))
    file_id = {int(p): j for j, p in enumerate(permutation)}  # model class -> id in the files
    for split in ("train", "test"):
        content = pickle.loads((folder / split).read_bytes())
        content[b"fine_labels"] = [file_id[label] for label in content[b"fine_labels"]]
        (folder / split).write_bytes(pickle.dumps(content, protocol=4))
    train = prepare_datasets(data_args(tmp_path, folder, train_val_split=0.0), small_config(), seed=0)["train"]
    np.testing.assert_array_equal(column(train, "labels"), np.arange(NUM_FINE))


@pytest.mark.parametrize(
    ("column", "index", "unknown"), [("fine_label", 3, "dragon"), ("coarse_label", 0, "sea_monsters")]
)
def test_unknown_class_label_name_is_refused(tmp_path, column, index, unknown):
    names = {"fine_label": list(CIFAR100_FINE_LABELS), "coarse_label": list(CIFAR100_COARSE_LABELS)}
    names[column][index] = unknown
    write_named_parquet(tmp_path / "data", names["fine_label"], names["coarse_label"], names["fine_label"])
    with pytest.raises(ValueError, match=rf"1 class names in '{column}' .* \['{unknown}'\]"):
        prepare_datasets(data_args(tmp_path, tmp_path / "data"), small_config(), seed=0)


def test_coarse_ids_are_checked_by_name(tmp_path):
    """Coarse ids that would be right in the model's order are wrong under the dataset's own (rotated) names."""
    coarse_names = CIFAR100_COARSE_LABELS[1:] + CIFAR100_COARSE_LABELS[:1]
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=CIFAR100_FINE_LABELS),
            "coarse_label": datasets.ClassLabel(names=coarse_names),
        }
    )
    rows = {
        "img": [{"bytes": content, "path": None} for content in png_images(NUM_FINE)],
        "fine_label": list(range(NUM_FINE)),
        "coarse_label": list(CIFAR100_FINE_TO_COARSE),
    }
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data" / "train.parquet"))
    with pytest.raises(ValueError, match=r"100 of 100 rows .* disagrees with config.fine_to_coarse"):
        prepare_datasets(data_args(tmp_path, tmp_path / "data"), small_config(), seed=0)


def test_hub_misspelling_cra_is_read_as_crab(tmp_path):
    fine_names = list(CIFAR100_FINE_LABELS)
    fine_names[26] = "cra"  # as in the uoft-cs/cifar100 metadata
    write_named_parquet(tmp_path / "data", fine_names, CIFAR100_COARSE_LABELS, fine_names)
    train = prepare_datasets(data_args(tmp_path, tmp_path / "data", train_val_split=0.0), small_config(), seed=0)[
        "train"
    ]
    np.testing.assert_array_equal(column(train, "labels"), np.arange(NUM_FINE))
    assert train.features["labels"].names[26] == "crab"


def test_placeholder_class_label_names_keep_integer_meaning(tmp_path):
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(num_classes=NUM_FINE)})
    labels = list(range(NUM_FINE))[::-1]
    rows = {"img": [{"bytes": content, "path": None} for content in png_images(NUM_FINE)], "fine_label": labels}
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data" / "train.parquet"))
    train = prepare_datasets(data_args(tmp_path, tmp_path / "data", train_val_split=0.0), small_config(), seed=0)[
        "train"
    ]
    np.testing.assert_array_equal(column(train, "labels"), labels)


# ---------------------------------------------------------------------------------------------------------------
# Dataset layout and leaks
# ---------------------------------------------------------------------------------------------------------------


def test_backup_subfolder_is_not_read_and_files_are_logged(tmp_path, caplog):
    train = make_parquet_dataset(tmp_path / "data", split="train", seed=0)
    make_parquet_dataset(tmp_path / "data", split="test", seed=1)
    (tmp_path / "data" / "backup").mkdir()
    (tmp_path / "data" / "backup" / train.name).write_bytes(train.read_bytes())
    with caplog.at_level(logging.INFO, logger=PROJECT_LOGGER):
        raw = load_raw_datasets(data_args(tmp_path, tmp_path / "data"))
    assert {split: len(dataset) for split, dataset in raw.items()} == {"train": NUM_FINE, "test": NUM_FINE}
    assert f"as split 'train': ['{train}']" in caplog.text
    assert "Not reading 1 .parquet files" in caplog.text and "['backup']" in caplog.text


def test_split_folders_are_read_as_splits(tmp_path):
    make_parquet_dataset(tmp_path / "data" / "train", file_name="part-0.parquet", seed=0)
    make_parquet_dataset(tmp_path / "data" / "test", file_name="part-0.parquet", seed=1)
    make_parquet_dataset(tmp_path / "data" / "old" / "train", file_name="part-0.parquet", seed=2)
    raw = load_raw_datasets(data_args(tmp_path, tmp_path / "data"))
    assert {split: len(dataset) for split, dataset in raw.items()} == {"train": NUM_FINE, "test": NUM_FINE}


def _leaky_dataset(folder: Path) -> None:
    """Train images of seed 0; the test split repeats train rows 7 and 30 as its rows 5 and 60."""
    train_images = png_images(NUM_FINE, seed=0)
    make_parquet_dataset(folder, split="train", image_bytes=dict(enumerate(train_images)))
    make_parquet_dataset(folder, split="test", seed=1, image_bytes={5: train_images[7], 60: train_images[30]})


def test_images_shared_by_train_and_test_are_refused(tmp_path):
    _leaky_dataset(tmp_path / "data")
    message = r"2 of 100 test images are exact copies .* test row index=5 equals train row index=7.*--drop_duplicate"
    with pytest.raises(ValueError, match=message):
        prepare_datasets(data_args(tmp_path, tmp_path / "data", train_val_split=0.0), small_config(), seed=0)


def test_drop_duplicate_images_drops_them_from_evaluation(tmp_path, caplog):
    _leaky_dataset(tmp_path / "data")
    args = data_args(tmp_path, tmp_path / "data", train_val_split=0.0, drop_duplicate_images=True)
    with caplog.at_level(logging.INFO, logger=PROJECT_LOGGER):
        prepared = prepare_datasets(args, small_config(), seed=0)
    assert len(prepared["train"]) == NUM_FINE
    assert column(prepared["test"], "index").tolist() == [i for i in range(NUM_FINE) if i not in (5, 60)]
    assert "Dropped 2 of 100 test images" in caplog.text and "Duplicate-image check: 200 images hashed" in caplog.text


def test_duplicates_carved_into_validation_are_found(tmp_path):
    images = png_images(2 * NUM_FINE)
    for label in range(10):  # both rows of classes 0-9 hold the same bytes; the stratified halves part them
        images[2 * label + 1] = images[2 * label]
    make_parquet_dataset(tmp_path / "data", rows_per_class=2, image_bytes=dict(enumerate(images)))
    with pytest.raises(ValueError, match="10 of 100 validation images are exact copies"):
        prepare_datasets(data_args(tmp_path, tmp_path / "data", train_val_split=0.5), small_config(), seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [
        ("color_jitter", float("nan")),
        ("rotation_degrees", float("nan")),
        ("rotation_degrees", float("inf")),
        ("mixup_alpha", float("inf")),
        ("cutmix_alpha", float("nan")),
        ("random_erasing", float("nan")),
        ("mix_prob", float("nan")),
        ("cutmix_switch_prob", float("inf")),
        ("train_val_split", float("nan")),
        ("max_train_samples", float("inf")),
        ("max_image_pixels", 0),
    ],
)
def test_data_arguments_reject_non_finite_and_out_of_range_values(option, value):
    with pytest.raises(ValueError, match=rf"{option} must be .*{value!r}"):
        DataArguments(**{option: value})


def test_nan_on_the_command_line_names_the_option():
    parser = HfArgumentParser(DataArguments)
    with pytest.raises(ValueError, match="color_jitter must be a finite number, got nan"):
        parser.parse_args_into_dataclasses(["--color_jitter", "nan"])


# ---------------------------------------------------------------------------------------------------------------
# Deep pixels, bombs and paths
# ---------------------------------------------------------------------------------------------------------------


def _decoded(image: PIL.Image.Image, format: str) -> np.ndarray:
    """The grey level of `image` saved in `format` and decoded (to RGB, three equal channels)."""
    decoded = decode_image({"bytes": encode_image(image, format), "path": None}, index=3, split="test")
    pixels = np.asarray(decoded)
    assert decoded.mode == "RGB" and (pixels == pixels[..., :1]).all()
    return pixels[..., 0]


def test_float_images_in_unit_range_are_scaled_not_black():
    image = PIL.Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32))
    assert image.mode == "F"
    np.testing.assert_array_equal(_decoded(image, "TIFF"), np.full((8, 8), 128, dtype=np.uint8))


def test_float_images_in_eight_bit_range_are_kept():
    image = PIL.Image.fromarray(np.full((8, 8), 200.0, dtype=np.float32))
    np.testing.assert_array_equal(_decoded(image, "TIFF"), np.full((8, 8), 200, dtype=np.uint8))


def test_sixteen_bit_images_are_scaled_by_their_mode_not_their_values():
    image = PIL.Image.fromarray(np.full((8, 8), 200 * 257, dtype=np.uint16))
    dark = PIL.Image.fromarray(np.full((8, 8), 200, dtype=np.uint16))  # nearly black in 16 bits
    assert dark.mode == "I;16"
    np.testing.assert_array_equal(_decoded(image, "PNG"), np.full((8, 8), 200, dtype=np.uint8))
    np.testing.assert_array_equal(_decoded(dark, "PNG"), np.full((8, 8), 1, dtype=np.uint8))


def test_thirty_two_bit_integer_images_in_sixteen_bit_range_are_scaled():
    image = PIL.Image.fromarray(np.full((8, 8), 1000, dtype=np.int32))
    assert image.mode == "I"
    np.testing.assert_array_equal(_decoded(image, "TIFF"), np.full((8, 8), round(1000 / 257), dtype=np.uint8))


@pytest.mark.parametrize(
    "array, refused",
    [
        (np.full((8, 8), 100_000, dtype=np.int32), r"32-bit integer pixels in \[100000, 100000\]"),
        (np.full((8, 8), -5, dtype=np.int32), r"32-bit integer pixels in \[-5, -5\]"),
        (
            np.full((8, 8), 300.0, dtype=np.float32),
            r"float pixels in \[300, 300\], neither in \[0, 1\] nor in \[0, 255\]",
        ),
        (np.full((8, 8), np.nan, dtype=np.float32), "float pixels include NaN or infinity"),
    ],
)
def test_deep_pixels_out_of_any_range_are_refused_naming_the_row(array, refused):
    with pytest.raises(ValueError, match=rf"row index=3 of split 'test': {refused}"):
        _decoded(PIL.Image.fromarray(array), "TIFF")


def test_huge_image_is_refused_from_its_header():
    bomb = encode_image(PIL.Image.new("1", (8000, 8000)))  # 64 megapixels in a few KB
    assert len(bomb) < 20_000
    with pytest.raises(ValueError, match=r"row index=7 of split 'train' is 8000x8000 = 64,000,000 pixels"):
        decode_image({"bytes": bomb, "path": None}, index=7, split="train")


def test_max_image_pixels_reaches_the_transforms(tiny_parquet_dir, tmp_path):
    args = data_args(tmp_path, tiny_parquet_dir, train_val_split=0.0, max_image_pixels=32 * 32 - 1)
    config = small_config()
    transformed = apply_transforms(prepare_datasets(args, config, seed=0), config, args, seed=0)
    for split in ("train", "test"):
        with pytest.raises(ValueError, match=rf"row index=0 of split '{split}' is 32x32 = 1,024 pixels.*1,023"):
            transformed[split][0]


class _HollowArray:
    """Pickles as an array of a million (N, 3072) rows of zero-size items, rebuilt from an empty buffer."""

    def __reduce__(self):
        return _reconstruct, (np.ndarray, (0,), b"b"), (1, (1_000_000, 3072), np.dtype("V0"), False, b"")


def test_cifar_pickle_array_larger_than_its_file_is_refused(tmp_path):
    folder = write_cifar_python(tmp_path / "cifar-100-python", [0, 1], [0])
    content = pickle.loads((folder / "train").read_bytes())
    content[b"data"] = _HollowArray()
    (folder / "train").write_bytes(pickle.dumps(content, protocol=4))
    with pytest.raises(ValueError, match=r"train: b'data' is not a CIFAR image array: dtype \|V0 .*strides"):
        load_raw_datasets(data_args(tmp_path, folder))


def test_cifar_pickle_labels_must_match_the_rows(tmp_path):
    folder = write_cifar_python(tmp_path / "cifar-100-python", [0, 1, 2], [0])
    content = pickle.loads((folder / "train").read_bytes())
    content[b"fine_labels"] = [0, 1]
    (folder / "train").write_bytes(pickle.dumps(content, protocol=4))
    with pytest.raises(ValueError, match=r"train: b'fine_labels' must be a list of 3 labels .* got 2"):
        load_raw_datasets(data_args(tmp_path, folder))


def _write_path_rows(folder: Path, paths: list[str]) -> None:
    """A train shard whose rows give their images as paths only (no bytes), one per class in order."""
    images = pyarrow.array([{"bytes": None, "path": path} for path in paths], pyarrow.struct(IMAGE_STRUCT))
    folder.mkdir(parents=True, exist_ok=True)
    table = pyarrow.table({"img": images, "fine_label": list(range(len(paths)))})
    pyarrow.parquet.write_table(table, str(folder / "train.parquet"))


def test_relative_image_paths_resolve_against_the_dataset_folder(tmp_path, monkeypatch):
    (tmp_path / "data" / "images").mkdir(parents=True)
    for i, content in enumerate(png_images(3)):
        (tmp_path / "data" / "images" / f"{i}.png").write_bytes(content)
    _write_path_rows(tmp_path / "data", [f"images/{i}.png" for i in range(3)])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    args = data_args(tmp_path, tmp_path / "data", train_val_split=0.0)
    config = small_config()
    transformed = apply_transforms(prepare_datasets(args, config, seed=0), config, args, seed=0)
    assert transformed["train"][2]["pixel_values"].shape == (3, 32, 32)


@pytest.mark.parametrize("kind", ["fifo", "folder", "missing"])
def test_image_paths_that_are_not_regular_files_are_refused(tmp_path, kind):
    if kind == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    (tmp_path / "data").mkdir()
    good = tmp_path / "data" / "good.png"
    good.write_bytes(png_images(1)[0])
    bad = tmp_path / "data" / "bad.png"
    if kind == "fifo":
        os.mkfifo(bad)
    elif kind == "folder":
        bad.mkdir()
    _write_path_rows(tmp_path / "data", [str(good), str(bad)])
    with pytest.raises(ValueError, match=r"row index=1 of split 'train' is the path .*bad.png"):
        prepare_datasets(data_args(tmp_path, tmp_path / "data", train_val_split=0.0), small_config(), seed=0)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_decoding_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)

    def unblock() -> None:  # should decoding open the FIFO, a writer that closes at once ends the wait
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(10, unblock)
    timer.start()
    try:
        with pytest.raises(ValueError, match="row index=4 of split 'test' is the path .* not a regular file"):
            decode_image({"bytes": None, "path": str(fifo)}, index=4, split="test")
    finally:
        timer.cancel()


# ---------------------------------------------------------------------------------------------------------------
# Files that are not what they claim
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_parquet_shard_is_named(tmp_path, damage):
    make_parquet_dataset(tmp_path / "data", split="train", seed=0)
    shard = make_parquet_dataset(tmp_path / "data", split="test", seed=1)
    content = shard.read_bytes()
    shard.write_bytes(content[: len(content) // 2] if damage == "truncated" else b"not a parquet file" * 100)
    with pytest.raises(ValueError, match=rf"{shard.name}: not a readable parquet file, it is corrupt or truncated"):
        load_raw_datasets(data_args(tmp_path, tmp_path / "data"))


@pytest.mark.parametrize("writer", ["pyarrow_struct", "pyarrow_binary", "pandas"])
def test_parquet_without_datasets_metadata_loads(tmp_path, writer):
    images = png_images(NUM_FINE)
    labels = list(range(NUM_FINE))
    coarse = list(CIFAR100_FINE_TO_COARSE)
    (tmp_path / "data").mkdir()
    file = str(tmp_path / "data" / "train.parquet")
    if writer == "pandas":
        frame = pandas.DataFrame(
            {"img": [{"bytes": b, "path": None} for b in images], "fine_label": labels, "coarse_label": coarse}
        )
        frame.to_parquet(file)
    else:
        img = (
            pyarrow.array([{"bytes": b, "path": None} for b in images])
            if writer == "pyarrow_struct"
            else pyarrow.array(images, pyarrow.binary())
        )
        pyarrow.parquet.write_table(pyarrow.table({"img": img, "fine_label": labels, "coarse_label": coarse}), file)
    assert b"huggingface" not in (pyarrow.parquet.read_schema(file).metadata or {})
    args = data_args(tmp_path, tmp_path / "data", train_val_split=0.0)
    config = small_config()
    prepared = prepare_datasets(args, config, seed=0)
    np.testing.assert_array_equal(column(prepared["train"], "labels"), labels)
    transformed = apply_transforms(prepared, config, args, seed=0)
    assert transformed["train"][5]["pixel_values"].shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------------


def _image_folder(root: Path, class_names: list[str], per_class: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name in class_names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            label = CIFAR100_FINE_LABELS.index(name)
            PIL.Image.fromarray(make_image_array(label, rng)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("class_names", [["apple", "train", "crab"], ["train"]])
def test_image_folder_class_named_train_is_a_class(tmp_path, class_names):
    root = _image_folder(tmp_path / "images", class_names)
    prepared = prepare_datasets(data_args(tmp_path, root, train_val_split=0.0), small_config(), seed=0)
    assert list(prepared) == ["train"]
    expected = sorted(CIFAR100_FINE_LABELS.index(name) for name in class_names for _ in range(2))
    assert sorted(column(prepared["train"], "labels").tolist()) == expected


def test_image_folder_split_folders_hold_classes_named_like_splits(tmp_path):
    _image_folder(tmp_path / "images" / "train", ["train", "apple"])
    _image_folder(tmp_path / "images" / "test", ["train", "apple"], per_class=1, seed=1)
    prepared = prepare_datasets(data_args(tmp_path, tmp_path / "images", train_val_split=0.0), small_config(), seed=0)
    assert {split: len(dataset) for split, dataset in prepared.items()} == {"train": 4, "test": 2}
    train_class = CIFAR100_FINE_LABELS.index("train")
    assert sorted(column(prepared["test"], "labels").tolist()) == sorted([train_class, 0])
