"""Two-level datasets other than CIFAR-100: folder trees, label columns, hierarchy files, models of other classes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from transformers import pipeline

from configuration_hierarchical import CIFAR100_FINE_LABELS, HierarchicalEfficientNetV2Config
from conftest import encode_image, make_image_array, small_config, tiny_args
from data_utils import DataArguments, HierarchicalCollator, load_raw_datasets, prepare_datasets
from hierarchical.data.device_preprocess import DevicePreprocessor
from hierarchical.data.hierarchy import (
    Hierarchy,
    balanced_class_weights,
    discover_hierarchy,
    set_class_weights,
)
from hierarchical.data.hierarchy_files import read_hierarchy_file
from hierarchical.evaluation.metrics import compute_hierarchy_metrics
from hierarchical.evaluation.report import write_eval_report
from hierarchical.training.arguments import ModelArguments
from hierarchical.training.model_loading import load_model
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification
from run_classification import main

# Unbalanced superclasses (3, 1 and 7 classes) with spaces, unicode and a class named like a split.
TREE = {
    "Säugetiere": ["grey fox", "Hund", "katze 🐈"],
    "véhicules": ["train"],
    "plants & trees": ["oak", "pine", "rose", "tulip", "palm", "fern", "moss"],
}
PARENT = {fine: coarse for coarse, fines in TREE.items() for fine in fines}
FINE = sorted(PARENT)
COARSE = sorted(TREE)


def write_tree(root: Path, per_class: int = 2, splits: tuple[str, ...] = ()) -> Path:
    """`root/[split/]superclass/class/<i>.png` for every class of `TREE`."""
    rng = np.random.default_rng(0)
    for split in splits or ("",):
        for label, fine in enumerate(FINE):
            folder = root / split / PARENT[fine] / fine
            folder.mkdir(parents=True)
            for i in range(per_class):
                PIL.Image.fromarray(make_image_array(label, rng)).save(folder / f"{i}.png")
    return root


def write_parquet(path: Path, fine: list, coarse: list | None, features: dict | None = None, seed: int = 1) -> Path:
    """A parquet file with `img`, `fine_label` and (unless None) `coarse_label` columns; images drawn with `seed`."""
    rng = np.random.default_rng(seed)
    columns = {"img": [{"bytes": encode_image(PIL.Image.fromarray(make_image_array(i, rng))), "path": None}
                       for i in range(len(fine))], "fine_label": fine}  # fmt: skip
    feature_map = {"img": datasets.Image(), "fine_label": datasets.Value("string")}
    if coarse is not None:
        columns["coarse_label"] = coarse
        feature_map["coarse_label"] = datasets.Value("string")
    feature_map.update(features or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=datasets.Features(feature_map)).to_parquet(str(path))
    return path


def rows() -> list[str]:
    """Fine names of the generated rows: every class, the last superclass's classes twice."""
    return FINE + [name for name in FINE if PARENT[name] == "plants & trees"]


def discover(tmp_path: Path, source: Path | str, **kwargs) -> tuple[Hierarchy | None, DataArguments]:
    args = DataArguments(dataset_name=str(source), cache_dir=str(tmp_path / "cache"), train_val_split=0.0, **kwargs)
    return discover_hierarchy(load_raw_datasets(args), args), args


def assert_rows_follow_names(prepared: datasets.DatasetDict, config: HierarchicalEfficientNetV2Config) -> None:
    """Every row's coarse label is the parent of its fine label, by name."""
    for split in prepared.values():
        columns = split.with_format("numpy")[:]
        for fine, coarse in zip(columns["labels"], columns["coarse_labels"], strict=True):
            assert config.coarse_label_names[coarse] == PARENT[config.id2label[int(fine)]]


@pytest.mark.parametrize("splits", [(), ("train", "test")])
def test_folder_tree_gives_the_hierarchy_and_both_labels(tmp_path, splits):
    root = write_tree(tmp_path / "tree", splits=splits)
    hierarchy, args = discover(tmp_path, root)
    assert hierarchy.fine_names == tuple(FINE) and hierarchy.coarse_names == tuple(COARSE)
    assert Counter(hierarchy.fine_to_coarse) == Counter({COARSE.index(c): len(f) for c, f in TREE.items()})
    config = small_config(**hierarchy.config_kwargs())
    prepared = prepare_datasets(args, config, seed=0)
    assert sorted(prepared) == sorted(splits or ("train",))
    assert all(len(split) == 2 * len(FINE) for split in prepared.values())
    assert_rows_follow_names(prepared, config)
    assert prepared["train"].features["labels"].names == FINE


@pytest.mark.parametrize("layout", ["superclass/class/image", "class/image"])
def test_image_folder_named_by_a_relative_path_is_read(tmp_path, monkeypatch, layout):
    """`--dataset_name my_tree`, given relative to the working folder, as the README writes it."""
    root = write_tree(tmp_path / "my_tree")
    options = {}
    if layout == "class/image":  # the classes' folders moved up; their superclasses from a hierarchy file
        for superclass in COARSE:
            for folder in (root / superclass).iterdir():
                folder.rename(root / folder.name)
            (root / superclass).rmdir()
        (tmp_path / "hierarchy.json").write_text(json.dumps(PARENT))
        options["hierarchy_file"] = "hierarchy.json"
    monkeypatch.chdir(tmp_path)
    args = DataArguments(dataset_name="my_tree", cache_dir="cache", train_val_split=0.0, **options)
    hierarchy = discover_hierarchy(load_raw_datasets(args), args)
    train = prepare_datasets(args, small_config(**hierarchy.config_kwargs()), seed=0)["train"]
    assert len(train) == 2 * len(FINE) and train[0]["image"].size == (32, 32)


def test_folder_tree_with_mixed_depths_is_refused(tmp_path):
    root = write_tree(tmp_path / "tree", per_class=1)
    (root / "Säugetiere" / "Hund" / "old").mkdir()
    PIL.Image.new("RGB", (32, 32)).save(root / "Säugetiere" / "Hund" / "old" / "stray.png")
    with pytest.raises(ValueError, match="mixes layouts"):
        discover(tmp_path, root)


def test_class_label_columns_give_the_hierarchy_in_their_order(tmp_path):
    fine_names, coarse_names = FINE[::-1], COARSE[::-1]  # not sorted: the ClassLabel order is kept
    names = rows()
    features = {
        "fine_label": datasets.ClassLabel(names=fine_names),
        "coarse_label": datasets.ClassLabel(names=coarse_names),
    }
    fine = [fine_names.index(n) for n in names]
    coarse = [coarse_names.index(PARENT[n]) for n in names]
    write_parquet(tmp_path / "data" / "train.parquet", fine, coarse, features)
    hierarchy, args = discover(tmp_path, tmp_path / "data")
    assert hierarchy.fine_names == tuple(fine_names) and hierarchy.coarse_names == tuple(coarse_names)
    config = small_config(**hierarchy.config_kwargs())
    prepared = prepare_datasets(args, config, seed=0)
    assert_rows_follow_names(prepared, config)
    assert Counter(prepared["train"]["labels"]) == Counter(fine)


def test_string_columns_across_splits_give_the_hierarchy(tmp_path):
    names = rows()
    write_parquet(tmp_path / "data" / "train.parquet", names, [PARENT[n] for n in names])
    write_parquet(tmp_path / "data" / "test.parquet", FINE[:3], [PARENT[n] for n in FINE[:3]], seed=2)
    hierarchy, args = discover(tmp_path, tmp_path / "data")
    assert hierarchy.fine_names == tuple(FINE) and dict(hierarchy.parents) == PARENT
    config = small_config(**hierarchy.config_kwargs())
    assert_rows_follow_names(prepare_datasets(args, config, seed=0), config)


@pytest.mark.parametrize("form", ["json", "json_grouped", "csv"])
def test_integer_labels_with_a_hierarchy_file(tmp_path, form):
    ids = [FINE.index(n) for n in rows()]
    write_parquet(tmp_path / "data" / "train.parquet", ids, None, {"fine_label": datasets.Value("int64")})
    mapping = {str(i): PARENT[name] for i, name in enumerate(FINE)}
    file = tmp_path / f"hierarchy.{form.split('_')[0]}"
    if form == "json":
        file.write_text(json.dumps(mapping, ensure_ascii=False), encoding="utf-8")
    elif form == "json_grouped":
        grouped = {coarse: [i for i, c in mapping.items() if c == coarse] for coarse in TREE}
        file.write_text(json.dumps(grouped, ensure_ascii=False), encoding="utf-8")
    else:
        file.write_text("fine,coarse\n" + "".join(f'{i},"{c}"\n' for i, c in mapping.items()), encoding="utf-8")
    assert read_hierarchy_file(str(file), set(mapping)) == mapping or form == "json_grouped"
    hierarchy, args = discover(tmp_path, tmp_path / "data", hierarchy_file=str(file))
    assert dict(hierarchy.parents) == mapping
    config = small_config(**hierarchy.config_kwargs())
    columns = prepare_datasets(args, config, seed=0)["train"].with_format("numpy")[:]
    names = [config.id2label[int(i)] for i in columns["labels"]]
    assert names == [str(i) for i in ids]
    assert [config.coarse_label_names[c] for c in columns["coarse_labels"]] == [mapping[n] for n in names]


def test_hierarchy_file_missing_a_class_names_it(tmp_path):
    write_parquet(tmp_path / "data" / "train.parquet", FINE, None)
    file = tmp_path / "h.json"
    file.write_text(json.dumps({name: PARENT[name] for name in FINE[1:]}), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"1 classes .* not in --hierarchy_file .*'{FINE[0]}'"):
        discover(tmp_path, tmp_path / "data", hierarchy_file=str(file))


def test_class_under_two_superclasses_is_named_with_counts(tmp_path):
    names = rows()
    coarse = [PARENT[n] for n in names]
    write_parquet(tmp_path / "data" / "train.parquet", names + ["Hund"] * 2, coarse + ["Säugetiere"] * 2)
    write_parquet(tmp_path / "data" / "test.parquet", ["Hund"] * 3, ["véhicules"] * 3, seed=2)
    message = r"the class 'Hund' .* under 2 superclasses .*'Säugetiere' \(3 rows\) and 'véhicules' \(3 rows\)"
    with pytest.raises(ValueError, match=message):
        discover(tmp_path, tmp_path / "data")


def test_cifar100_data_keeps_the_cifar100_config(tiny_parquet_dir, tmp_path):
    hierarchy, _ = discover(tmp_path, tiny_parquet_dir)  # ClassLabel columns with the official names
    assert hierarchy == Hierarchy.from_config(HierarchicalEfficientNetV2Config(backbone_weights=None))
    write_parquet(tmp_path / "ints" / "train.parquet", [3, 4], [8, 0], {"fine_label": datasets.Value("int64"),
                  "coarse_label": datasets.Value("int64")})  # fmt: skip
    assert discover(tmp_path, tmp_path / "ints")[0] is None  # plain integers: the model's config decides
    write_parquet(tmp_path / "unnamed" / "train.parquet", [3, 4], [8, 0], {"fine_label": datasets.ClassLabel(
                  num_classes=100), "coarse_label": datasets.Value("int64")})  # fmt: skip
    assert discover(tmp_path, tmp_path / "unnamed")[0] is None  # a ClassLabel without names is plain integers
    write_parquet(tmp_path / "names" / "train.parquet", ["bear", "beaver"], None)
    assert discover(tmp_path, tmp_path / "names")[0].fine_names == tuple(CIFAR100_FINE_LABELS)


@pytest.fixture(scope="module")
def cifar_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cifar_model")
    HierarchicalEfficientNetV2ForImageClassification(small_config()).save_pretrained(folder)
    return folder


def test_model_of_another_hierarchy_is_refused_or_gets_new_heads(cifar_model_dir):
    hierarchy = Hierarchy.from_pairs(list(PARENT.items()))
    args = ModelArguments(model_name_or_path=str(cifar_model_dir))
    with pytest.raises(
        ValueError, match=r"trained for other classes: .*11 classes in 3 superclasses.*reinitialize_heads"
    ):
        load_model(args, hierarchy=hierarchy)
    saved = HierarchicalEfficientNetV2ForImageClassification.from_pretrained(cifar_model_dir)
    model = load_model(
        ModelArguments(model_name_or_path=str(cifar_model_dir), reinitialize_heads=True), None, hierarchy
    )
    assert model.config.id2label == dict(enumerate(FINE)) and model.config.coarse_label_names == COARSE
    assert model.fine_classifier.out_features == 11 and model.coarse_classifier.out_features == 3
    assert model.fine_classifier.in_features == 1280 + 3
    for name, value in saved.features.state_dict().items():
        torch.testing.assert_close(model.features.state_dict()[name], value, msg=name)
    with torch.no_grad():
        output = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 10]))
    assert output.logits.shape == (2, 11) and torch.isfinite(output.loss)
    same = load_model(args, hierarchy=Hierarchy.cifar100())  # the model's own classes: loaded as saved
    assert same.config.num_labels == 100


def test_collator_mixes_soft_targets_of_any_hierarchy():
    hierarchy = Hierarchy.from_pairs(list(PARENT.items()))
    config = small_config(**hierarchy.config_kwargs())
    examples = [
        {"pixel_values": torch.randn(3, 32, 32), "labels": i % 11, "coarse_labels": config.fine_to_coarse[i % 11],
         "index": i, "epoch": 0}
        for i in range(6)
    ]  # fmt: skip
    batch = DevicePreprocessor(config)(HierarchicalCollator(config, mixup_alpha=1.0, seed=0)(examples))
    assert batch["labels"].shape == (6, 11) and batch["coarse_labels"].shape == (6, 3)
    torch.testing.assert_close(batch["coarse_labels"], batch["labels"] @ config.hierarchy_matrix())
    torch.testing.assert_close(batch["coarse_labels"].sum(1), torch.ones(6))


def test_metrics_and_report_with_few_classes_and_many_superclasses(tmp_path):
    few = compute_hierarchy_metrics(np.eye(3), np.eye(3)[:, :2], np.arange(3), np.array([0, 1, 1]), [0, 1, 1])
    assert "fine_top5_accuracy" not in few and few["fine_accuracy"] == 1.0
    num_coarse, num_fine = 45, 90  # two classes per superclass
    fine_to_coarse = [i // 2 for i in range(num_fine)]
    config = HierarchicalEfficientNetV2Config(
        backbone_weights=None,
        id2label={i: f"class {i} with a rather long name ünïcode" for i in range(num_fine)},
        fine_to_coarse=fine_to_coarse,
        coarse_label_names=[f"superclass {c}" for c in range(num_coarse)],
    )
    rng = np.random.default_rng(0)
    labels = rng.integers(0, num_fine, 400)
    written = write_eval_report(
        tmp_path, rng.normal(size=(400, num_fine)), rng.normal(size=(400, num_coarse)), labels,
        np.asarray(fine_to_coarse)[labels], config,
    )  # fmt: skip
    report = Path(written["report"]).read_text()
    assert "## Most confused superclasses" in report and "## Superclass confusion matrix" not in report
    support = np.bincount(labels, minlength=num_fine)
    assert f"| 7 | {config.id2label[7]} | superclass 3 | {support[7]} |" in report
    assert f"min {support.min()}, median" in report
    assert {"superclass_accuracy", "superclass_confusion", "confused_pairs"} <= set(written)


def test_class_weights_weigh_both_losses_and_are_saved(tmp_path):
    assert balanced_class_weights(np.array([0, 0, 0, 1]), 3) == pytest.approx([4 / 6, 2.0, 1.0])
    hierarchy = Hierarchy.from_pairs(list(PARENT.items()))
    config = small_config(**hierarchy.config_kwargs())
    model = HierarchicalEfficientNetV2ForImageClassification(config).eval()
    fine_weights, coarse_weights = [float(i + 1) for i in range(11)], [0.5, 1.0, 3.0]
    set_class_weights(model, fine_weights, coarse_weights)
    model.save_pretrained(tmp_path)
    reloaded = HierarchicalEfficientNetV2ForImageClassification.from_pretrained(tmp_path).eval()
    pixels, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 7, 10])
    coarse = reloaded.fine_to_coarse[labels]
    with torch.no_grad():
        output = reloaded(pixels, labels=labels)
    expected = torch.nn.functional.cross_entropy(output.logits, labels, weight=torch.tensor(fine_weights))
    expected += torch.nn.functional.cross_entropy(output.coarse_logits, coarse, weight=torch.tensor(coarse_weights))
    torch.testing.assert_close(output.loss, expected)
    with pytest.raises(ValueError, match="fine_class_weights must hold 11"):
        set_class_weights(model, [1.0] * 10, coarse_weights)


@pytest.mark.slow
def test_training_on_a_new_hierarchy_end_to_end(tmp_path):
    """Folder tree with split folders -> train, evaluate, report, save; the pipeline answers with the new names."""
    root = write_tree(tmp_path / "tree", per_class=2, splits=("train", "test"))
    output_dir = tmp_path / "out"
    extra = ["--do_train", "--do_eval", "--do_predict", "--train_val_split", "0.25", "--mixup_alpha", "0.2"]
    extra += ["--class_weights", "balanced"]
    metrics = main(tiny_args(root, output_dir, *extra))
    assert metrics["test_num_samples"] == 2 * len(FINE) and 0.0 <= metrics["test_fine_accuracy"] <= 1.0
    config = json.loads((output_dir / "config.json").read_text(encoding="utf-8"))
    assert list(config["id2label"].values()) == FINE and config["coarse_label_names"] == COARSE
    assert len(config["fine_class_weights"]) == 11 and len(config["coarse_class_weights"]) == 3
    report = (output_dir / "reports" / "test" / "eval_report.md").read_text(encoding="utf-8")
    assert (
        "11 classes in 3 superclasses" in report and f"| {FINE.index('katze 🐈')} | katze 🐈 | Säugetiere |" in report
    )
    assert "11 classes" in (output_dir / "README.md").read_text(encoding="utf-8")
    classifier = pipeline("image-classification", model=str(output_dir), trust_remote_code=True)
    result = classifier(PIL.Image.open(root / "test" / "véhicules" / "train" / "0.png"), top_k=11)
    assert sorted(entry["label"] for entry in result) == FINE


def test_data_whose_superclasses_differ_from_the_model_is_refused(tmp_path):
    write_parquet(tmp_path / "data" / "train.parquet", ["apple", "bear"], None)
    file = tmp_path / "h.json"
    file.write_text(json.dumps({"apple": "trees", "bear": "large_carnivores"}), encoding="utf-8")
    args = DataArguments(dataset_name=str(tmp_path / "data"), hierarchy_file=str(file), train_val_split=0.0)
    with pytest.raises(ValueError, match=r"1 classes belong to another superclass: 'apple' under 'trees' in the data"):
        prepare_datasets(args, small_config(), seed=0)
