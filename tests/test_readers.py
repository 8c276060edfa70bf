"""Strict readers: label columns, hierarchy files and folder trees load to the same hierarchy every way they can be
written, or are refused with a message naming the file (or column) and the problem."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import datasets
import PIL.Image
import pytest

from conftest import small_config
from data_checks import standardise_split
from data_utils import DataArguments, load_raw_datasets
from hierarchy_data import discover_hierarchy

CAFE_NFC = unicodedata.normalize("NFC", "café")
CAFE_NFD = unicodedata.normalize("NFD", "café")


def tiny_png(path: Path) -> None:
    """A 2x2 PNG at `path` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", (2, 2), (200, 10, 10)).save(path)


def png_struct() -> dict:
    """A 2x2 PNG as an `Image` feature value."""
    import io

    buffer = io.BytesIO()
    PIL.Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def write_label_parquet(folder: Path, columns: dict[str, list], features: dict[str, object]) -> Path:
    """`folder/train.parquet` with an `img` column and the given label columns."""
    rows = len(next(iter(columns.values())))
    feature_map = datasets.Features({"img": datasets.Image(), **features})
    folder.mkdir(parents=True, exist_ok=True)
    dataset = datasets.Dataset.from_dict({"img": [png_struct()] * rows, **columns}, features=feature_map)
    dataset.to_parquet(str(folder / "train.parquet"))
    return folder


def arguments(tmp_path: Path, source: Path, **kwargs) -> DataArguments:
    return DataArguments(dataset_name=str(source), cache_dir=str(tmp_path / "cache"), train_val_split=0.0, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Label columns
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int64", "string"])
def test_label_column_with_a_null_names_the_column_and_row(tmp_path, dtype):
    values = [0, 1, None, 2] if dtype == "int64" else ["a", "b", None, "c"]
    coarse = [0, 1, 1, 2] if dtype == "int64" else ["x", "y", "y", "x"]
    source = write_label_parquet(
        tmp_path / "data",
        {"fine_label": values, "coarse_label": coarse},
        {"fine_label": datasets.Value(dtype), "coarse_label": datasets.Value(dtype)},
    )
    args = arguments(tmp_path, source)
    raw = load_raw_datasets(args)
    message = r"column 'fine_label' of split 'train' has 1 rows without a label \(null\); first: row 2"
    with pytest.raises(ValueError, match=message):
        discover_hierarchy(raw, args)
    with pytest.raises(ValueError, match=message):
        standardise_split(raw["train"], args, small_config(), "train")


def test_a_name_in_two_unicode_forms_is_one_class(tmp_path):
    names = [CAFE_NFC, CAFE_NFD, "tea", CAFE_NFD]
    source = write_label_parquet(
        tmp_path / "data",
        {"fine_label": names, "coarse_label": ["drinks"] * 4},
        {"fine_label": datasets.Value("string"), "coarse_label": datasets.Value("string")},
    )
    args = arguments(tmp_path, source)
    raw = load_raw_datasets(args)
    hierarchy = discover_hierarchy(raw, args)
    assert hierarchy.fine_names == (CAFE_NFC, "tea")
    train = standardise_split(raw["train"], args, small_config(**hierarchy.config_kwargs()), "train")
    assert train["labels"] == [0, 0, 1, 0]


def test_a_class_label_with_one_name_in_two_unicode_forms_is_refused(tmp_path):
    source = write_label_parquet(
        tmp_path / "data",
        {"fine_label": [0, 1], "coarse_label": ["drinks"] * 2},
        {"fine_label": datasets.ClassLabel(names=[CAFE_NFC, CAFE_NFD]), "coarse_label": datasets.Value("string")},
    )
    args = arguments(tmp_path, source)
    with pytest.raises(ValueError, match=r"ClassLabel of column 'fine_label' .* the same name in two Unicode forms"):
        discover_hierarchy(load_raw_datasets(args), args)


def test_misspelt_cra_is_corrected_only_in_the_cifar100_table_by_both_readers(tmp_path):
    """A table of one's own that holds `cra` keeps it, in the hierarchy and in the rows alike."""
    source = write_label_parquet(
        tmp_path / "data",
        {"fine_label": [0, 1], "coarse_label": ["sea", "sea"]},
        {"fine_label": datasets.ClassLabel(names=["cra", "crab"]), "coarse_label": datasets.Value("string")},
    )
    args = arguments(tmp_path, source)
    raw = load_raw_datasets(args)
    hierarchy = discover_hierarchy(raw, args)
    assert hierarchy.fine_names == ("cra", "crab")
    train = standardise_split(raw["train"], args, small_config(**hierarchy.config_kwargs()), "train")
    assert train["labels"] == [0, 1]
    only_crab = small_config(id2label={0: "crab"}, fine_to_coarse=[0], coarse_label_names=["sea"])
    with pytest.raises(ValueError, match=r"class names in 'fine_label' of split 'train' .*\['cra'\]"):
        standardise_split(raw["train"], args, only_crab, "train")


def test_plain_integer_labels_without_superclasses_say_they_are_read_as_cifar100(tmp_path, caplog):
    source = write_label_parquet(tmp_path / "data", {"label": [0, 3, 4, 3]}, {"label": datasets.Value("int64")})
    args = arguments(tmp_path, source, label_column_name="label")
    with caplog.at_level("WARNING"):
        assert discover_hierarchy(load_raw_datasets(args), args) is None
    assert "column 'label' of split 'train' holds plain integers (3 distinct)" in caplog.text
    assert "CIFAR-100 class ids" in caplog.text and "--hierarchy_file" in caplog.text
