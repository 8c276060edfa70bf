"""Strict readers: label columns, hierarchy files and folder trees load to the same hierarchy every way they can be
written, or are refused with a message naming the file (or column) and the problem."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import unicodedata
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import small_config, write_cifar_python
from data_utils import SPLITS, DataArguments, load_raw_datasets, prepare_datasets
from hierarchical.data.checks import standardise_split
from hierarchical.data.hierarchy import discover_hierarchy
from hierarchical.data.hierarchy_files import HIDDEN_PREFIXES, read_hierarchy_file
from hierarchical.data.label_columns import DataColumns, data_columns, normalise_name, printed_form
from hierarchical.data.sources import glob_files

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


@pytest.mark.parametrize("other", [CAFE_NFD, CAFE_NFC + " ", CAFE_NFC + "\u200b", "\u200e" + CAFE_NFC])
def test_a_class_label_with_one_name_written_two_ways_is_refused(tmp_path, other):
    source = write_label_parquet(
        tmp_path / "data",
        {"fine_label": [0, 1], "coarse_label": ["drinks"] * 2},
        {"fine_label": datasets.ClassLabel(names=[CAFE_NFC, other]), "coarse_label": datasets.Value("string")},
    )
    args = arguments(tmp_path, source)
    with pytest.raises(ValueError, match=r"ClassLabel of column 'fine_label' .* the same name written two ways"):
        discover_hierarchy(load_raw_datasets(args), args)


def test_names_that_differ_by_spaces_are_one_class_and_by_invisible_characters_refused(tmp_path):
    """Surrounding spaces go (as in CSV cells); a zero-width character would make two classes that print the same.
    Case is kept: `Mug` and `mug` are two classes."""
    strings = {"fine_label": datasets.Value("string"), "coarse_label": datasets.Value("string")}
    source = write_label_parquet(
        tmp_path / "spaces", {"fine_label": ["mug", " mug ", "Mug"], "coarse_label": ["kitchen "] * 3}, strings
    )
    args = arguments(tmp_path, source)
    raw = load_raw_datasets(args)
    hierarchy = discover_hierarchy(raw, args)
    assert hierarchy.parents == {"Mug": "kitchen", "mug": "kitchen"}
    train = standardise_split(raw["train"], args, small_config(**hierarchy.config_kwargs()), "train")
    assert [hierarchy.fine_names[i] for i in train["labels"]] == ["mug", "mug", "Mug"]
    source = write_label_parquet(
        tmp_path / "invisible", {"fine_label": ["mug", "mug\u200b"], "coarse_label": ["kitchen"] * 2}, strings
    )
    args = arguments(tmp_path, source)
    message = r"column 'fine_label' of split 'train' lists 'mug' and 'mug\\u200b', the same name written two ways"
    with pytest.raises(ValueError, match=message):
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


def test_plain_integer_fine_and_coarse_columns_that_disagree_with_cifar100_say_how_they_were_read(tmp_path):
    ints = {"fine_label": datasets.Value("int64"), "coarse_label": datasets.Value("int64")}
    source = write_label_parquet(tmp_path / "data", {"fine_label": [0, 1, 2, 3], "coarse_label": [0, 0, 1, 1]}, ints)
    args = arguments(tmp_path, source)
    raw = load_raw_datasets(args)
    assert discover_hierarchy(raw, args) is None  # the CIFAR-100 tables, with a warning
    message = (
        r"the columns 'fine_label' and 'coarse_label' of split 'train' hold plain integers that name no classes, so "
        r"they are read as class and superclass ids of the CIFAR-100 tables, and they disagree with them: 4 of 4 rows"
        r".* row 0 has fine label 0 \(apple\).*give them names \(a ClassLabel or strings\), or pass a --hierarchy_file"
    )
    with pytest.raises(ValueError, match=message):
        standardise_split(raw["train"], args, small_config(), "train")


@pytest.mark.parametrize(
    ("values", "feature", "message"),
    [
        ([0.0, 1.0, 3.5], "float64", r"must hold class ids or class names, got Value\('float64'\): row 2 holds 3.5"),
        ([0.0, float("nan")], "float64", r"got Value\('float64'\): row 1 holds nan \(a missing label, as pandas"),
        ([0.0, 3.0], "float32", r"got Value\('float32'\): all are whole numbers: store them as integers"),
        ([True, False, True], "bool", r"must hold class ids or class names, got Value\('bool'\)"),
        ([0, -1, 2], "int64", r"must be in \[0, 100\), got -1 at row 1"),
    ],
)
def test_label_column_of_floats_bools_or_negative_ids_is_refused_naming_it(tmp_path, values, feature, message):
    source = write_label_parquet(tmp_path / "data", {"fine_label": values}, {"fine_label": datasets.Value(feature)})
    args = arguments(tmp_path, source)
    raw = load_raw_datasets(args)
    with pytest.raises(ValueError, match=rf"column 'fine_label' of split 'train' .*{message}"):
        discover_hierarchy(raw, args)
        standardise_split(raw["train"], args, small_config(), "train")


# ----------------------------------------------------------------------------------------------------------------
# Hierarchy files
# ----------------------------------------------------------------------------------------------------------------

SPLIT_FOLDERS = SPLITS  # the default source split names: folders read as splits

# Names as users write them: any letters, digits, punctuation (commas, quotes), spaces inside, emoji; no control
# characters, no surrounding spaces (CSV cells are stripped), never a hidden-file or path-like name.
NAME = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="/\\\x00"),
    min_size=1,
    max_size=6,
).filter(lambda name: name == name.strip() and not name.startswith(".") and name not in SPLIT_FOLDERS)


@st.composite
def hierarchies(draw: st.DrawFn) -> dict[str, str]:
    """`{class: superclass}` with 1-5 classes in 1-3 superclasses; names that print differently after
    normalisation, classes and superclasses apart (a folder tree cannot tell them apart otherwise)."""
    names = draw(st.lists(NAME, min_size=2, max_size=8, unique_by=printed_form))
    split = draw(st.integers(1, min(3, len(names) - 1)))
    coarse, fine = names[:split], names[split:]
    return {name: draw(st.sampled_from(coarse)) for name in fine}


def normal(mapping: dict[str, str]) -> dict[str, str]:
    return {normalise_name(fine): normalise_name(coarse) for fine, coarse in mapping.items()}


def csv_text(mapping: dict[str, str], header: tuple[str, str] | None, line_end: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=line_end)
    writer.writerows(([header] if header else []) + list(mapping.items()))
    return buffer.getvalue()


WRITTEN_FORMS = {  # ways of writing one name that read as that name
    "as is": lambda name: name,
    "NFD": lambda name: unicodedata.normalize("NFD", name),
    "padded": lambda name: f" {name}  ",
}


@given(
    mapping=hierarchies(),
    shape=st.sampled_from(["csv", "json_flat", "json_grouped"]),
    bom=st.booleans(),
    header=st.one_of(st.none(), st.tuples(NAME, NAME)),
    line_end=st.sampled_from(["\n", "\r\n"]),
    form=st.sampled_from(sorted(WRITTEN_FORMS)),
)
def test_hierarchy_file_loads_the_same_every_way_it_is_written(
    tmp_path_factory, mapping, shape, bom, header, line_end, form
):
    superclasses = set(normal(mapping).values())
    assume(header is None or normalise_name(header[0]) not in normal(mapping))
    assume(header is None or normalise_name(header[1]) not in superclasses)  # else the header row is ambiguous
    expected = normal(mapping)
    written = WRITTEN_FORMS[form]
    mapping = {written(fine): written(coarse) for fine, coarse in mapping.items()}
    folder = tmp_path_factory.mktemp("hierarchy")
    if shape == "csv":
        text = csv_text(mapping, header, line_end)
    elif shape == "json_flat":
        text = json.dumps(mapping, ensure_ascii=False)
    else:
        grouped: dict[str, list[str]] = {}
        for fine, coarse in mapping.items():
            grouped.setdefault(coarse, []).append(fine)
        text = json.dumps(grouped, ensure_ascii=False)
    path = folder / f"h.{shape.split('_')[0]}"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    assert read_hierarchy_file(str(path), set(expected)) == expected


ENCODINGS_REFUSED = {  # encoding -> what the refusal says
    "utf-16": "is UTF-16 text",
    "utf-32": "is UTF-32 text",
    "utf-16-le": "holds NUL bytes .* UTF-16 or UTF-32 text without a byte-order mark",
    "utf-16-be": "holds NUL bytes .* UTF-16 or UTF-32 text without a byte-order mark",
    "utf-32-le": "holds NUL bytes .* UTF-16 or UTF-32 text without a byte-order mark",
    "latin-1": r"is not UTF-8 text \(byte 0x",
    "cp1252": r"is not UTF-8 text \(byte 0x",
}


@given(
    mapping=hierarchies(),
    shape=st.sampled_from(["csv", "json"]),
    encoding=st.sampled_from(sorted(ENCODINGS_REFUSED)),
    accent=st.sampled_from(["é", "ü", "ñ"]),
)
def test_hierarchy_file_in_another_encoding_is_refused_naming_it(tmp_path_factory, mapping, shape, encoding, accent):
    mapping = {f"{fine}{accent}": coarse for fine, coarse in mapping.items()}  # a letter outside ASCII in each
    if encoding in ("latin-1", "cp1252"):
        assume(all(char < "\u0100" for pair in mapping.items() for name in pair for char in name))
    text = csv_text(mapping, ("class", "superclass"), "\n") if shape == "csv" else json.dumps(mapping)
    path = tmp_path_factory.mktemp("encoding") / f"hierarchy.{shape}"
    path.write_bytes(text.encode(encoding))
    with pytest.raises(ValueError, match=rf"--hierarchy_file '{path}' {ENCODINGS_REFUSED[encoding]}.*save it as UTF-8"):
        read_hierarchy_file(str(path), set(normal(mapping)))


INVISIBLE = st.sampled_from(["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u200e", "\u202e"])


@given(mapping=hierarchies(), shape=st.sampled_from(["csv", "json"]), invisible=INVISIBLE, data=st.data())
def test_hierarchy_file_with_names_that_print_the_same_is_refused(tmp_path_factory, mapping, shape, invisible, data):
    """A class (or superclass) given again with an invisible character added would be a second class that prints
    the same: refused, naming the file."""
    fine = data.draw(st.sampled_from(sorted(mapping)))
    position = data.draw(st.integers(0, len(fine)))
    twin = fine[:position] + invisible + fine[position:]
    rows = [("class", "superclass"), *mapping.items(), (twin, mapping[fine])]
    if data.draw(st.booleans()):  # the twin is a superclass instead
        coarse = mapping[fine]
        rows[-1] = (twin + "-other", coarse[:position] + invisible + coarse[position:])
    if shape == "csv":
        text = csv_text(dict(rows[1:]), tuple(rows[0]), "\n")
    else:
        text = json.dumps(dict(rows[1:]), ensure_ascii=False)
    path = tmp_path_factory.mktemp("twins") / f"hierarchy.{shape}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"--hierarchy_file '{path}' \((super)?classes\) lists .* written two ways"):
        read_hierarchy_file(str(path), set(normal(mapping)))


def test_hierarchy_csv_first_row_that_is_neither_header_nor_class_is_refused(tmp_path, caplog):
    """`sofa` has no rows in the data: its row cannot be told from a header, since `kitchen` is a superclass of
    other rows. A first row like it under a header is a class; a header of any names is a header."""
    path = tmp_path / "hierarchy.csv"
    path.write_text("sofa,kitchen\nmug,kitchen\npan,kitchen\n", encoding="utf-8")
    message = rf"--hierarchy_file '{path}': the first row \['sofa', 'kitchen'\] names no class of the data"
    with pytest.raises(ValueError, match=message):
        read_hierarchy_file(str(path), {"mug", "pan"})
    path.write_text("class,superclass\nsofa,kitchen\nmug,kitchen\n", encoding="utf-8")
    assert read_hierarchy_file(str(path), {"mug"}) == {"sofa": "kitchen", "mug": "kitchen"}
    path.write_text("class,superclass\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"holds no rows after its header \['class', 'superclass'\]"):
        read_hierarchy_file(str(path), {"mug"})


@pytest.mark.parametrize(
    ("text", "value"),
    [('{"mug": NaN}', "NaN"), ('{"mug": 3}', "3"), ('{"kitchen": ["mug", null]}', r'\["mug", null\]'),
     ('{"mug": "kitchen", "bath": ["tub"]}', r'\["tub"\]')],
)  # fmt: skip
def test_hierarchy_json_value_of_another_type_is_named(tmp_path, text, value):
    path = tmp_path / "hierarchy.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(
        ValueError, match=rf"--hierarchy_file '{path}': the values must .* the value of '\w+' is {value}"
    ):
        read_hierarchy_file(str(path), {"mug", "tub"})


@pytest.mark.parametrize("text", ['{"a": "x", "b": "y", "a": "z"}', '{"x": ["a"], "x": ["b"]}'])
def test_hierarchy_json_with_a_duplicate_key_is_refused(tmp_path, text):
    path = tmp_path / "hierarchy.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"--hierarchy_file '{path}' has the key '[ax]' twice"):
        read_hierarchy_file(str(path), {"a", "b"})


def test_hierarchy_csv_header_of_any_names_is_not_a_class(tmp_path):
    path = tmp_path / "hierarchy.csv"
    path.write_bytes(b"\xef\xbb\xbfproduct,department\r\nmug,kitchen\r\npan,kitchen\r\n")
    assert read_hierarchy_file(str(path), {"mug", "pan"}) == {"mug": "kitchen", "pan": "kitchen"}


def test_hierarchy_file_classes_absent_from_the_data_are_named(tmp_path, caplog):
    source = write_label_parquet(tmp_path / "data", {"label": ["mug", "pan"]}, {"label": datasets.Value("string")})
    path = tmp_path / "hierarchy.json"
    path.write_text(json.dumps({"mug": "kitchen", "pan": "kitchen", "sofa": "living"}), encoding="utf-8")
    args = arguments(tmp_path, source, label_column_name="label", hierarchy_file=str(path))
    raw = load_raw_datasets(args)
    with caplog.at_level("WARNING"):
        hierarchy = discover_hierarchy(raw, args)
        discover_hierarchy(raw, args)  # a run reads it twice: for the model's heads, then to check the splits
    assert hierarchy.fine_names == ("mug", "pan", "sofa")
    assert f"1 classes of --hierarchy_file {str(path)!r} have no rows in the data: 'sofa'" in caplog.text
    assert caplog.text.count("have no rows in the data") == 1


@given(mapping=hierarchies(), form=st.sampled_from(["strings", "class_labels", "strings_nfd"]), data=st.data())
@settings(max_examples=12)
def test_label_columns_load_to_their_hierarchy(tmp_path_factory, mapping, form, data):
    rows = data.draw(st.lists(st.sampled_from(sorted(mapping)), min_size=len(mapping), max_size=12))
    rows = sorted(mapping) + rows[len(mapping) :]  # every class at least once
    fines, coarses = sorted(mapping), sorted(set(mapping.values()))
    if form == "class_labels":
        assume(fines != [str(i) for i in range(len(fines))])  # ClassLabel(num_classes=n)'s names: plain ids
        columns = {
            "fine_label": [fines.index(n) for n in rows],
            "coarse_label": [coarses.index(mapping[n]) for n in rows],
        }
        features = {"fine_label": datasets.ClassLabel(names=fines), "coarse_label": datasets.ClassLabel(names=coarses)}
    else:
        form_of = (lambda name: unicodedata.normalize("NFD", name)) if form == "strings_nfd" else (lambda name: name)
        columns = {"fine_label": [form_of(n) for n in rows], "coarse_label": [mapping[n] for n in rows]}
        features = {"fine_label": datasets.Value("string"), "coarse_label": datasets.Value("string")}
    features = datasets.Features({"img": datasets.Image(), **features})
    raw = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"img": [png_struct()] * len(rows), **columns}, features=features)}
    )
    args = arguments(tmp_path_factory.getbasetemp(), Path("unused"))
    hierarchy = discover_hierarchy(raw, args)
    assert hierarchy.parents == normal(mapping)
    train = standardise_split(raw["train"], args, small_config(**hierarchy.config_kwargs()), "train")
    assert [hierarchy.fine_names[i] for i in train["labels"]] == [normalise_name(n) for n in rows]


# ----------------------------------------------------------------------------------------------------------------
# Folder trees
# ----------------------------------------------------------------------------------------------------------------


def write_folder_tree(
    root: Path, mapping: dict[str, str], linked: set[str] = frozenset(), hidden: bool = False
) -> None:
    """`root/superclass/class/0.png` for every class of `mapping`; the folders of `linked` classes live outside
    `root` and are reached through a link; `hidden` adds `.DS_Store`, an AppleDouble `._0.png` and `__MACOSX/`."""
    for index, (fine, coarse) in enumerate(mapping.items()):
        folder = root / coarse / fine
        if fine in linked:
            target = root.parent / f"elsewhere-{index}"
            tiny_png(target / "0.png")
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.symlink_to(target, target_is_directory=True)
        else:
            tiny_png(folder / "0.png")
        if hidden:
            (folder / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
            (root / coarse / ".DS_Store").write_bytes(b"\x00")
    if hidden:
        tiny_png(root / "__MACOSX" / next(iter(mapping.values())) / "._x.png")


def tree_pairs(root: Path, tmp_path: Path) -> set[tuple[str, str]]:
    """The (class, superclass) pairs of the rows that reading `root` as a dataset gives."""
    args = arguments(tmp_path, root)
    train = load_raw_datasets(args)["train"]
    return set(zip(train["fine_label"], train["coarse_label"], strict=True))


@given(mapping=hierarchies(), data=st.data())
@settings(max_examples=15)
def test_folder_tree_loads_its_hierarchy_with_links_and_hidden_files(tmp_path_factory, mapping, data):
    linked = set(data.draw(st.lists(st.sampled_from(sorted(mapping)), unique=True, max_size=2)))
    hidden = data.draw(st.booleans())
    base = tmp_path_factory.mktemp("tree")
    write_folder_tree(base / "root", mapping, linked, hidden)
    assert tree_pairs(base / "root", base) == set(normal(mapping).items())


@given(mapping=hierarchies(), place=st.sampled_from(["class subfolder", "superclass folder"]), data=st.data())
@settings(max_examples=15)
def test_folder_tree_image_out_of_place_is_refused_naming_it(tmp_path_factory, mapping, place, data):
    """An image in a subfolder of a class folder, or directly inside a superclass folder, is never dropped."""
    assume(len(mapping) >= 2)
    fine = data.draw(st.sampled_from(sorted(mapping)))
    base = tmp_path_factory.mktemp("misplaced")
    write_folder_tree(base / "root", mapping, hidden=data.draw(st.booleans()))
    if place == "class subfolder":
        odd = Path(mapping[fine], fine, "more", "1.png")
        expected = f"the image {str(odd)!r} is in a subfolder of the class folder {str(Path(mapping[fine], fine))!r}"
    else:
        odd = Path(mapping[fine], "stray.png")
        expected = f"the image {str(odd)!r} is directly inside the superclass folder {mapping[fine]!r}"
    tiny_png(base / "root" / odd)
    with pytest.raises(ValueError) as error:
        load_raw_datasets(arguments(base, base / "root"))
    assert expected in str(error.value)


def test_empty_class_folders_non_images_and_folders_read_twice_are_named_and_the_walk_logged_once(tmp_path, caplog):
    write_folder_tree(tmp_path / "root", {"cat": "animal", "car": "vehicle"}, hidden=True)
    (tmp_path / "root" / "animal" / "owl").mkdir()
    (tmp_path / "root" / "vehicle" / "car" / "Thumbs.db").write_bytes(b"\x00")
    (tmp_path / "root" / "vehicle" / "cat2").symlink_to(tmp_path / "root" / "animal" / "cat", target_is_directory=True)
    with caplog.at_level("INFO", logger="hierarchical"):
        train = load_raw_datasets(arguments(tmp_path, tmp_path / "root"))["train"]
    assert len(train) == 3
    assert "1 folders of" in caplog.text and "read twice: e.g. 'vehicle/cat2' and 'animal/cat'" in caplog.text
    assert "1 folders of" in caplog.text and "hold no files (they give no class): 'animal/owl'" in caplog.text
    assert "Not reading 1 files of" in caplog.text and "'vehicle/car/Thumbs.db'" in caplog.text
    assert caplog.text.count("Skipped 6 hidden files and folders") == 1  # cat2/._0.png too


def test_hidden_and_appledouble_files_are_skipped_at_load_with_a_count(tmp_path, caplog):
    write_folder_tree(tmp_path / "root", {"cat": "animal", "car": "vehicle"}, hidden=True)
    with caplog.at_level("WARNING"):
        train = load_raw_datasets(arguments(tmp_path, tmp_path / "root"))["train"]
    assert len(train) == 2 and all(image.size == (2, 2) for image in train["img"])
    assert "Skipped 5 hidden files and folders" in caplog.text and "e.g. 'animal/cat/._0.png'" in caplog.text


@pytest.mark.parametrize(
    ("how", "name"), [("path column", "._0.png"), ("path column", "notes.png"), ("class folder", "notes.png")]
)
def test_a_file_that_is_no_image_is_named_when_the_data_is_loaded(tmp_path, how, name):
    """An AppleDouble file given by a path column, or any file with an image's name that holds no image, is
    refused by `prepare_datasets`, before training (a class folder's own `._*` files are skipped as hidden)."""
    mapping = {"cat": "animal", "dog": "animal", "car": "vehicle"}
    root = tmp_path / "root"
    write_folder_tree(root, mapping)
    odd = root / "animal" / "cat" / name
    odd.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    if how == "path column":
        paths = sorted(str(path) for path in root.rglob("*.png"))
        rows = {
            "image": paths,
            "label": [Path(p).parent.name for p in paths],
            "coarse": [mapping[Path(p).parent.name] for p in paths],
        }
        source = tmp_path / "paths"
        source.mkdir()
        datasets.Dataset.from_dict(rows).to_parquet(str(source / "train.parquet"))
        args = arguments(tmp_path, source, coarse_label_column_name="coarse")
    else:
        args = arguments(tmp_path, root)
    config = small_config(**discover_hierarchy(load_raw_datasets(args), args).config_kwargs())
    expected = "a macOS AppleDouble file" if name.startswith("._") else "is not an image"
    with pytest.raises(
        ValueError, match=rf"the image of row index=\d+ of split 'train'.*{re.escape(str(odd))}'.*{expected}"
    ):
        prepare_datasets(args, config, seed=0)


@pytest.mark.parametrize("layout", ["tree", "classes"])
def test_linked_class_folder_is_read_by_every_reader(tmp_path, layout):
    root = tmp_path / "root"
    prefix = ("animal",) if layout == "tree" else ()
    tiny_png(root.joinpath(*prefix, "cat", "0.png"))
    tiny_png(tmp_path / "dogs" / "0.png")
    tiny_png(tmp_path / "dogs" / "1.png")
    root.joinpath(*prefix, "dog").symlink_to(tmp_path / "dogs", target_is_directory=True)
    train = load_raw_datasets(arguments(tmp_path, root))["train"]
    column = "fine_label" if layout == "tree" else "label"
    names = train[column] if layout == "tree" else [train.features["label"].int2str(i) for i in train["label"]]
    assert sorted(names) == ["cat", "dog", "dog"]


def test_link_to_a_containing_folder_is_refused_naming_it(tmp_path):
    root = tmp_path / "root"
    tiny_png(root / "animal" / "cat" / "0.png")
    (root / "animal" / "cat" / "again").symlink_to(root, target_is_directory=True)
    with pytest.raises(ValueError, match=r"'.*cat/again' is a link to .* a folder that contains it"):
        load_raw_datasets(arguments(tmp_path, root))


def test_images_in_a_subfolder_of_a_class_folder_are_refused_naming_one(tmp_path):
    root = tmp_path / "root"
    for name in ("cat", "dog", "owl"):
        tiny_png(root / name / "0.png")
    tiny_png(root / "cat" / "kittens" / "1.png")
    message = r"the image 'cat/kittens/1.png' is in a subfolder of the class folder 'cat'"
    with pytest.raises(ValueError, match=message):
        load_raw_datasets(arguments(tmp_path, root))


def test_image_directly_inside_a_superclass_folder_is_named(tmp_path):
    root = tmp_path / "root"
    for fine, coarse in (("cat", "animal"), ("dog", "animal"), ("car", "vehicle")):
        tiny_png(root / coarse / fine / "0.png")
    tiny_png(root / "animal" / "stray.png")
    with pytest.raises(ValueError, match=r"the image 'animal/stray.png' is directly inside the superclass folder"):
        load_raw_datasets(arguments(tmp_path, root))


# ----------------------------------------------------------------------------------------------------------------
# Data file patterns (--dataset_name 'folder/**/*.parquet')
# ----------------------------------------------------------------------------------------------------------------

PATH_PART = st.sampled_from(["a", "b", "train", "test", "x.parquet", "y.arrow", "._x.parquet", "__MACOSX"])
PATTERN = st.sampled_from(
    ["*.parquet", "**/*.parquet", "*/*.parquet", "**", "train*/**/*.parquet", "[ab]/*", "**/x.parquet", "*/*/*"]
)


@given(files=st.lists(st.lists(PATH_PART, min_size=1, max_size=3), min_size=1, max_size=6), pattern=PATTERN)
@settings(max_examples=20)
def test_data_file_pattern_matches_what_glob_matches_but_hidden_names(tmp_path_factory, files, pattern):
    """The pattern reader walks folders as every reader does, and matches what `glob` matches in the visible files."""
    root = tmp_path_factory.mktemp("pattern")
    for parts in files:
        path = root.joinpath(*parts)
        if any(parent.is_file() for parent in path.parents) or path.is_dir():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    expected = sorted(
        found
        for found in glob.glob(f"{root}/{pattern}", recursive=True)
        if os.path.isfile(found)
        and not any(part.startswith(HIDDEN_PREFIXES) for part in Path(found).relative_to(root).parts)
    )
    assert glob_files(f"{root}/{pattern}") == expected


def test_data_file_pattern_through_a_link_loop_is_refused_naming_the_link(tmp_path):
    """`glob` itself would walk a link to a containing folder until the path is too long (minutes); the reader
    refuses it at once."""
    root = tmp_path / "data"
    write_label_parquet(root / "train", {"label": ["a"]}, {"label": datasets.Value("string")})
    (root / "train" / "again").symlink_to(root, target_is_directory=True)
    with pytest.raises(ValueError, match=r"'.*train/again' is a link to .* a folder that contains it"):
        load_raw_datasets(arguments(tmp_path, Path(f"{root}/**/*.parquet")))


# ----------------------------------------------------------------------------------------------------------------
# cifar-100-python files
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["np.save", "text"])
def test_cifar_python_file_that_is_no_pickle_is_named(tmp_path, how):
    folder = write_cifar_python(tmp_path / "cifar-100-python", train_labels=[0, 1], test_labels=[2])
    content = {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [2], b"coarse_labels": [4]}
    if how == "np.save":
        with open(folder / "test", "wb") as file:  # np.save would append .npy to a path without it
            np.save(file, content, allow_pickle=True)
        message = r"cifar-100-python/test: a numpy .npy file \(written with numpy.save\), not a pickle"
    else:
        (folder / "test").write_text("fine_labels,coarse_labels\n2,4\n")
        message = r"cifar-100-python/test: not a valid cifar-100-python file \(not a pickle"
    with pytest.raises(ValueError, match=message):
        load_raw_datasets(arguments(tmp_path, folder))


# ----------------------------------------------------------------------------------------------------------------
# Which columns hold images and labels
# ----------------------------------------------------------------------------------------------------------------


def columns_of(columns: dict[str, list], features: dict[str, object], **options) -> DataColumns:
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    return data_columns(dataset, DataArguments(**options))


def test_columns_are_found_by_feature_and_by_usual_name():
    found = columns_of(
        {"photo": [png_struct()], "species": [0], "genus": ["x"]},
        {"photo": datasets.Image(), "species": datasets.ClassLabel(names=["a"]), "genus": datasets.Value("string")},
    )
    assert (found.image, found.label, found.coarse) == ("photo", "species", None)
    found = columns_of({"img": [png_struct()["bytes"]], "labels": ["a"], "coarse_labels": ["x"]},
                       {"img": datasets.Value("binary"), "labels": datasets.Value("string"),
                        "coarse_labels": datasets.Value("string")})  # fmt: skip
    assert (found.image, found.label, found.coarse) == ("img", "labels", "coarse_labels")
    assert "found: superclasses, images, classes" in found.describe()


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"image": "Image", "img": "Image", "label": "string"}, r"image column: \['image', 'img'\]; name one with "),
        (
            {"image": "Image", "label": "string", "fine_label": "string"},
            r"class label column: \['label', 'fine_label'\]",
        ),
        ({"image": "Image", "kind": "ClassLabel", "group": "ClassLabel"}, r"class label column: \['kind', 'group'\]"),
        ({"picture": "string", "label": "string"}, r"no image column among the columns \['picture', 'label'\]"),
    ],
)
def test_ambiguous_columns_are_refused_naming_the_candidates(columns, message):
    kinds = {
        "Image": datasets.Image(),
        "string": datasets.Value("string"),
        "ClassLabel": datasets.ClassLabel(names=["a"]),
    }
    values = {"Image": png_struct(), "string": "a", "ClassLabel": 0}
    with pytest.raises(ValueError, match=message):
        columns_of({n: [values[k]] for n, k in columns.items()}, {n: kinds[k] for n, k in columns.items()})


def test_explicit_column_options_are_taken_as_given():
    found = columns_of({"image": [png_struct()], "label": ["a"], "fine_label": ["b"]},
                       {"image": datasets.Image(), "label": datasets.Value("string"),
                        "fine_label": datasets.Value("string")}, label_column_name="fine_label")  # fmt: skip
    assert (found.label, found.found) == ("fine_label", ("images",))
