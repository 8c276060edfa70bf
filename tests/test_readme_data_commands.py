"""The README's commands for one's own data run as written on tiny data with the usual column names (only options
that make the run short are added), and the run summary says which columns were read."""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import datasets
import PIL.Image
import pytest

from conftest import PROJECT_DIR, small_config
from data_utils import load_raw_datasets, prepare_datasets
from hierarchical.data.hierarchy import discover_hierarchy
from hierarchical.data.label_columns import data_columns
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification
from run_classification import main, parse_args

TREE = {"kitchen": ["mug", "pan"], "garden": ["rake", "hose"]}
PARENT = {fine: coarse for coarse, fines in TREE.items() for fine in fines}
FAST = ["--image_size", "32", "--max_steps", "1", "--batch_size", "4", "--report_to", "none", "--disable_tqdm",
        "true", "--dataloader_pin_memory", "false", "--train_val_split", "0.25", "--calibrate", "false"]  # fmt: skip


def readme_data_commands() -> list[list[str]]:
    """The `run_classification.py` commands of the README section on one's own two-level dataset, as argv lists."""
    text = (PROJECT_DIR / "README.md").read_text(encoding="utf-8")
    section = text.split("### Your own two-level dataset", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    commands = [shlex.split(line) for line in block.splitlines() if line.startswith("python run_classification.py")]
    return [command[2:] for command in commands]


def image_bytes(colour: int) -> dict:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8), (colour * 40 % 256, 20, 200)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def write_usual_data(folder: Path, with_model: bool = True) -> None:
    """The data each README command names, with the column names such data usually has."""
    for split_index, split in enumerate(("train", "test")):
        for i, (fine, coarse) in enumerate(PARENT.items()):
            for copy in range(2):
                path = folder / "my_tree" / split / coarse / fine / f"{copy}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                PIL.Image.new("RGB", (8, 8), (i * 50, copy * 90, 30 + split_index * 100)).save(path)
    rows = [fine for fine in PARENT for _ in range(2)]
    images = [image_bytes(i) for i in range(len(rows))]
    products = {"image": images, "subcategory": rows, "category": [PARENT[fine] for fine in rows]}
    features = {
        "image": datasets.Image(),
        "subcategory": datasets.Value("string"),
        "category": datasets.Value("string"),
    }
    datasets.Dataset.from_dict(products, features=datasets.Features(features)).to_parquet(
        str(folder / "products.parquet")
    )
    labelled = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    (folder / "data").mkdir()
    datasets.Dataset.from_dict({"image": images, "label": rows}, features=labelled).to_parquet(
        str(folder / "data/train.parquet")
    )
    (folder / "hierarchy.csv").write_text("class,superclass\n" + "".join(f"{f},{c}\n" for f, c in PARENT.items()))
    if with_model:  # the CIFAR-100 model the transfer command starts from
        HierarchicalEfficientNetV2ForImageClassification(small_config()).save_pretrained(
            folder / "outputs" / "effnetv2s-cifar100"
        )


def test_readme_data_commands_read_their_data_by_the_usual_column_names(tmp_path, monkeypatch):
    """Each command's options, parsed by the script, load the data, find its columns and its hierarchy."""
    write_usual_data(tmp_path, with_model=False)
    monkeypatch.chdir(tmp_path)
    for command in readme_data_commands():
        _, data_args, training_args = parse_args(command)
        raw = load_raw_datasets(data_args)
        columns = data_columns(raw["train"], data_args)
        assert columns.describe().startswith(EXPECTED_COLUMNS[data_args.dataset_name])
        hierarchy = discover_hierarchy(raw, data_args)
        assert hierarchy.parents == PARENT
        config = small_config(**hierarchy.config_kwargs())
        for split in prepare_datasets(data_args, config, seed=training_args.seed, raw=raw).values():
            for fine, coarse in zip(split["labels"], split["coarse_labels"], strict=True):
                assert config.coarse_label_names[coarse] == PARENT[config.id2label[fine]]


# The columns the run summary names for each README data source.
EXPECTED_COLUMNS = {
    "my_tree": "images 'img', classes 'fine_label', superclasses 'coarse_label'",
    "products.parquet": "images 'image', classes 'subcategory', superclasses 'category'",
    "data/": "images 'image', classes 'label', superclasses none",
}


@pytest.mark.slow
def test_readme_data_commands_run_as_written_on_data_with_the_usual_names(tmp_path, monkeypatch, caplog):
    commands = readme_data_commands()
    assert len(commands) == 4 and any("--hierarchy_file" in command for command in commands)
    write_usual_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    for command in commands:
        caplog.clear()
        fast = FAST if "--model_name_or_path" in command else [*FAST, "--backbone_weights", "none"]
        with caplog.at_level("INFO"):
            metrics = main([*command, *fast])
        assert "train_loss" in metrics and ("eval_fine_accuracy" in metrics or "--do_eval" not in command)
        summary = caplog.text[caplog.text.index("Run summary") :]
        dataset = command[command.index("--dataset_name") + 1]
        assert f"columns:        {EXPECTED_COLUMNS[dataset]}" in summary, summary
