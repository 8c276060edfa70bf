"""Tests of the evaluation report: files, numbers, figures, the no-matplotlib path and the training-script wiring."""

from __future__ import annotations

import json
import re
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

import eval_report
import run_classification
from conftest import small_config
from hierarchical.data.label_columns import printed_form
from hierarchical.evaluation import report
from hierarchical.evaluation.metrics import compute_hierarchy_metrics
from hierarchical.evaluation.report_data import compute_report_data
from hierarchical.evaluation.report_markdown import FIGURE_NAMES, render_markdown
from hierarchical.training import saved_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HIERARCHY_METRICS = {
    "fine_accuracy", "fine_top5_accuracy", "coarse_accuracy", "coarse_from_fine_accuracy",
    "consistency", "both_correct", "mistake_severity", "num_samples",
}  # fmt: skip
FIGURES = tuple(FIGURE_NAMES.values())


@pytest.fixture(scope="module")
def predictions() -> dict[str, np.ndarray]:
    """Synthetic head outputs for 300 images: better than chance, with mistakes inside and across superclasses."""
    rng = np.random.default_rng(0)
    fine_to_coarse = np.asarray(small_config().fine_to_coarse)
    labels = rng.integers(0, 100, 300)
    coarse_labels = fine_to_coarse[labels]
    logits = rng.normal(size=(300, 100))
    logits[np.arange(300), labels] += 2.0
    coarse_logits = rng.normal(size=(300, 20))
    coarse_logits[np.arange(300), coarse_labels] += 2.0
    return {"logits": logits, "coarse_logits": coarse_logits, "labels": labels, "coarse_labels": coarse_labels}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(300)]


def report_table(text: str, header: str) -> dict[str, float]:
    """The `| name | value |` rows of the first table after `## header` in a markdown report."""
    section = text.split(f"## {header}\n\n", 1)[1]
    table = section.split("\n\n", 1)[0]  # the table ends at the first blank line
    rows = re.findall(r"^\| (\w+) \| ([-\d.]+) \|$", table, flags=re.MULTILINE)
    return {name: float(value) for name, value in rows}


def assert_report_matches(text: str, expected: dict[str, float]) -> None:
    table = report_table(text, "Hierarchy metrics")
    assert set(table) == set(expected) & HIERARCHY_METRICS
    for name, value in table.items():
        assert value == pytest.approx(expected[name], abs=5.1e-5), name


def test_report_files_exist(tmp_path, predictions, images):
    written = report.write_eval_report(tmp_path, **predictions, config=small_config(), images=images)
    assert set(written) == {
        "report", "superclass_accuracy", "superclass_confusion", "confused_pairs", "misclassified",
        "reliability", "risk_coverage",
    }  # fmt: skip
    assert {Path(path).name for path in written.values()} == {"eval_report.md", *FIGURES}
    assert all(Path(path).is_file() and Path(path).parent == tmp_path for path in written.values())
    text = (tmp_path / "eval_report.md").read_text()
    assert text.startswith("# Evaluation report: test split")
    for figure in FIGURES:
        assert f"]({figure})" in text


def test_report_numbers_match_compute_hierarchy_metrics(tmp_path, predictions):
    config = small_config()
    report.write_eval_report(tmp_path, **predictions, config=config, split="validation")
    text = (tmp_path / "eval_report.md").read_text()
    expected = compute_hierarchy_metrics(**predictions, fine_to_coarse=config.fine_to_coarse)
    assert_report_matches(text, expected)
    assert "| fine_accuracy | " + f"{expected['fine_accuracy']:.4f} |" in text

    per_superclass = re.findall(r"^\| (\d+) \| ([\w-]+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.MULTILINE)
    assert [name for _, name, *_ in per_superclass] == config.coarse_label_names
    assert sum(int(count) for _, _, count, _, _ in per_superclass) == 300
    fine_correct = predictions["logits"].argmax(1) == predictions["labels"]
    people = predictions["coarse_labels"] == 14
    assert float(per_superclass[14][3]) == pytest.approx(fine_correct[people].mean(), abs=5.1e-5)

    confusion = text.split("## Superclass confusion matrix\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in confusion.splitlines() if re.match(r"^\| \d+ ", line)]
    matrix = np.array([[int(cell) for cell in row.strip("|").split("|")[1:]] for row in rows])
    assert matrix.shape == (20, 20) and matrix.sum() == 300
    assert np.trace(matrix) == round(expected["coarse_accuracy"] * 300)


def test_given_metrics_are_reported_as_given(tmp_path, predictions, caplog):
    # The Trainer's numbers win over the ones recomputed from the predictions (a disagreement is logged); the
    # metrics it did not give are computed.
    config = small_config()
    computed = compute_hierarchy_metrics(**predictions, fine_to_coarse=config.fine_to_coarse)
    given = {"fine_accuracy": 0.1234, "consistency": 0.9876}
    assert all(abs(computed[name] - value) > 0.01 for name, value in given.items())
    trainer_metrics = {f"test_{name}": value for name, value in given.items()} | {"test_loss": 4.25, "epoch": 1.0}
    with caplog.at_level("WARNING"):
        report.write_eval_report(tmp_path, **predictions, config=config, metrics=trainer_metrics)
    text = (tmp_path / "eval_report.md").read_text()
    assert_report_matches(text, computed | given)
    assert "| fine_accuracy | 0.1234 |" in text and "| consistency | 0.9876 |" in text
    assert "| loss | 4.2500 |" in text and "| epoch | 1.0000 |" in text
    assert f"fine_accuracy = 0.1234 in the given metrics but {computed['fine_accuracy']}" in caplog.text


def test_figures_are_valid_pngs(tmp_path, predictions, images):
    report.write_eval_report(tmp_path, **predictions, config=small_config(), images=images)
    for name in FIGURES:
        path = tmp_path / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        assert path.stat().st_size < 300_000, name
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and 300 <= image.width <= 4000 and 300 <= image.height <= 4000, name


def test_misclassified_grid_reads_a_transformed_dataset_and_is_skipped_without_images(tmp_path, predictions, images):
    dataset = Dataset.from_dict({"image": images}).with_transform(
        lambda batch: {"pixel_values": [0] * len(batch["image"])}
    )
    written = report.write_eval_report(tmp_path, **predictions, config=small_config(), images=dataset)
    assert "misclassified" in written
    written = report.write_eval_report(tmp_path, **predictions, config=small_config(), overwrite=True)
    assert "misclassified" not in written
    assert not (tmp_path / "misclassified.png").exists()  # the replaced report's grid is gone
    assert "misclassified.png" not in (tmp_path / "eval_report.md").read_text()


def test_the_grid_decodes_images_within_the_evaluation_limit(tmp_path, predictions, images):
    config = small_config()
    with pytest.raises(ValueError, match=r"evaluated images is 32x32 = 1,024 pixels, above the limit of 1,000"):
        report.write_eval_report(tmp_path, **predictions, config=config, images=images, max_image_pixels=1000)
    large = [Image.new("1", (7100, 7100))] * len(images)  # 50.4 megapixels: above the default limit, as allowed
    written = report.write_eval_report(
        tmp_path, **predictions, config=config, images=large, overwrite=True, max_image_pixels=60_000_000
    )
    assert "misclassified" in written


def test_without_matplotlib_the_markdown_is_still_written(tmp_path, predictions, images, monkeypatch):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    written = report.write_eval_report(tmp_path, **predictions, config=small_config(), images=images)
    assert set(written) == {"report"}
    text = (tmp_path / "eval_report.md").read_text()
    assert "pip install matplotlib" in text
    assert ".png" not in text and not list(tmp_path.glob("*.png"))
    assert "## Hierarchy metrics" in text and "## Superclass confusion matrix" in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"logits": np.zeros((300, 10))}, r"logits must have shape \(300, 100\)"),
        ({"coarse_labels": np.zeros(299, dtype=int)}, r"coarse_labels must have shape \(300,\)"),
        (
            {"labels": np.full(300, 100)},
            r"labels must be in \[0, 100\), got 100 at row 0 \(300 of 300 rows out of range\)",
        ),
    ],
)
def test_inconsistent_predictions_are_rejected(tmp_path, predictions, change, message):
    with pytest.raises(ValueError, match=message):
        report.write_eval_report(tmp_path, **(predictions | change), config=small_config())


@pytest.mark.slow
def test_evaluate_saved_model(saved_model_dir, tiny_parquet_dir, tmp_path):
    data = tmp_path / "data"  # the test split of tiny_parquet_dir, and a training split that fails when read
    shutil.copytree(tiny_parquet_dir, data)
    (data / "train-00000-of-00001.parquet").write_bytes(b"not a parquet file")
    metrics = saved_model.evaluate_saved_model(
        saved_model_dir, str(data), split="test", output_dir=tmp_path / "report", max_samples=48
    )
    assert metrics["num_samples"] == 48
    assert 0.0 <= metrics["fine_accuracy"] <= metrics["fine_top5_accuracy"] <= 1.0
    text = (tmp_path / "report" / "eval_report.md").read_text()
    assert text.startswith("# Evaluation report: test split")
    assert_report_matches(text, metrics)
    assert (tmp_path / "report" / "superclass_accuracy.png").is_file()
    assert (tmp_path / "report" / "misclassified.png").is_file()  # a random model makes mistakes

    # the command line, on the validation split carved from train, writes into the model's reports/validation
    model_dir = tmp_path / "model"
    shutil.copytree(saved_model_dir, model_dir)
    argv = [str(model_dir), "--dataset_name", str(tiny_parquet_dir), "--split", "validation", "--max_samples", "16"]
    assert eval_report.main(argv)["num_samples"] == 16
    report = model_dir / "reports" / "validation" / "eval_report.md"
    assert report.read_text().startswith("# Evaluation report: validation split")
    assert not (model_dir / "eval_report.md").exists()

    # a second report of the same split is refused, before any prediction, unless --overwrite
    report.write_text("the first report")
    with pytest.raises(ValueError, match=r"reports/validation/eval_report.md already exists.*--overwrite"):
        eval_report.main(argv)
    assert report.read_text() == "the first report"
    assert eval_report.main([*argv, "--overwrite"])["num_samples"] == 16
    assert report.read_text().startswith("# Evaluation report: validation split")


def test_a_report_already_there_is_refused_with_one_error_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "reports" / "test").mkdir(parents=True)
    (tmp_path / "reports" / "test" / "superclass_accuracy.png").write_bytes(b"a figure of another run")
    monkeypatch.setattr(sys, "argv", ["eval_report.py", str(tmp_path), "--dataset_name", str(tmp_path / "no-data")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(eval_report.__file__, run_name="__main__")  # the command line, in this process
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'reports' / 'test' / 'superclass_accuracy.png'} already exists: a report is not "
        "replaced without --overwrite (overwrite=True); pass --overwrite, or another --output_dir\n"
    )
    assert (tmp_path / "reports" / "test" / "superclass_accuracy.png").read_bytes() == b"a figure of another run"


def test_evaluate_saved_model_applies_max_image_pixels(saved_model_dir, tiny_parquet_dir, tmp_path):
    with pytest.raises(ValueError, match=r"above the limit of 1,000 \(--max_image_pixels\)"):  # 32 x 32 = 1,024
        saved_model.evaluate_saved_model(
            saved_model_dir, str(tiny_parquet_dir), output_dir=tmp_path, max_samples=4, max_image_pixels=1000
        )
    assert not (tmp_path / "eval_report.md").exists()


def test_evaluate_saved_model_refuses_a_folder_with_missing_tensors(saved_model_dir, tiny_parquet_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved_model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    del weights["fine_classifier.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing from the weights file.*fine_classifier.weight"):
        saved_model.evaluate_saved_model(folder, str(tiny_parquet_dir), output_dir=tmp_path / "report", max_samples=4)
    assert not (tmp_path / "report" / "eval_report.md").exists()


@pytest.mark.slow
def test_training_script_writes_the_report(tiny_parquet_dir, tmp_path):
    # fmt: off
    metrics = run_classification.main([
        "--dataset_name", str(tiny_parquet_dir), "--image_size", "32", "--backbone_weights", "none",
        "--max_train_samples", "64", "--max_predict_samples", "48",
        "--epochs", "1", "--batch_size", "32", "--do_train", "--do_eval", "--do_predict",
        "--save_strategy", "no", "--eval_strategy", "no", "--load_best_model_at_end", "false",
        "--report_to", "none", "--output_dir", str(tmp_path),
    ])
    # fmt: on
    eval_results = json.loads((tmp_path / "eval_results.json").read_text())
    test_results = json.loads((tmp_path / "test_results.json").read_text())
    assert {"eval_fine_accuracy", "eval_coarse_accuracy", "eval_loss", "epoch"} <= set(eval_results)
    assert metrics["eval_fine_accuracy"] == eval_results["eval_fine_accuracy"]
    assert eval_results["eval_num_samples"] == 20 and test_results["test_num_samples"] == 48  # 10% of 200 carved

    text = (tmp_path / "reports" / "test" / "eval_report.md").read_text()
    assert text.startswith("# Evaluation report: test split")
    assert_report_matches(text, {name.removeprefix("test_"): value for name, value in test_results.items()})
    assert f"| loss | {test_results['test_loss']:.4f} |" in text
    validation = (tmp_path / "reports" / "validation" / "eval_report.md").read_text()
    assert validation.startswith("# Evaluation report: validation split")  # kept beside the test report
    assert_report_matches(validation, {name.removeprefix("eval_"): value for name, value in eval_results.items()})
    figure = "reports/validation/superclass_accuracy.png"
    assert (tmp_path / figure).read_bytes()[:8] == PNG_SIGNATURE
    card = (tmp_path / "README.md").read_text()
    assert f"![Accuracy per superclass]({figure})" in card and "(reports/validation/eval_report.md)" in card


def table_shapes(text: str) -> list[tuple[int, list[int]]]:
    """Each table of the Markdown `text` as a CommonMark+GFM-table parser reads it: `(header cells, [row cells])`."""
    markdown_it = pytest.importorskip("markdown_it")
    tables, header, rows, cells = [], 0, [], 0
    for token in markdown_it.MarkdownIt("commonmark").enable("table").parse(text):
        if token.type == "table_open":
            header, rows = 0, []
        elif token.type == "tr_open":
            cells = 0
        elif token.type in ("th_open", "td_open"):
            cells += 1
        elif token.type == "tr_close":
            header, rows = (cells, rows) if not header else (header, [*rows, cells])
        elif token.type == "table_close":
            tables.append((header, rows))
    return tables


NAME_CHARACTERS = st.sampled_from(["a", "b", " ", "|", "\\", "\n", "\r", "`", "-", "*", "<", ":", "é"])
# names a config takes: not blank, and distinct once normalised (surrounding spaces and line ends are not part of one)
NAMES = st.text(NAME_CHARACTERS, min_size=1, max_size=8).filter(str.strip)


@given(
    fine_names=st.lists(NAMES, min_size=4, max_size=4, unique_by=printed_form),
    coarse_names=st.lists(NAMES, min_size=2, max_size=2, unique_by=printed_form),
)
def test_report_tables_keep_their_columns_whatever_the_class_names(fine_names, coarse_names):
    config = small_config(
        id2label=dict(enumerate(fine_names)), fine_to_coarse=[0, 0, 1, 1], coarse_label_names=coarse_names
    )
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 4
    logits, coarse_logits = rng.normal(size=(40, 4)), rng.normal(size=(40, 2))  # mistakes in every table
    data = compute_report_data(logits, coarse_logits, labels, labels // 2, config)
    text = render_markdown(data, config, "test", figures={})
    tables = table_shapes(text)
    assert len(tables) == text.count("\n| --- |")  # no table split or lost
    for header, rows in tables:
        assert rows and all(cells == header for cells in rows), (header, rows)
    class_rows = next(rows for header, rows in tables if header == 5 and len(rows) == 4)  # accuracy per class
    assert len(class_rows) == len(fine_names)


def test_misclassified_captions_show_the_prediction_the_model_returns(predictions):
    """With temperatures that let the coarse head outweigh the fine head, the consistent prediction differs from
    each head's argmax on some images: the captions name the consistent class and superclass."""
    from hierarchical.evaluation.calibration import hierarchical_scores
    from hierarchical.evaluation.report_data import compute_report_data
    from hierarchical.evaluation.report_figures import misclassified_captions

    config = small_config(fine_temperature=3.0, coarse_temperature=0.3)
    data = compute_report_data(**predictions, config=config)
    scores = hierarchical_scores(**predictions, config=config)
    fine, coarse = scores.log_fine.argmax(1), scores.log_coarse.argmax(1)
    assert (fine != predictions["logits"].argmax(1)).any(), "the two predictions must differ somewhere"
    captions = misclassified_captions(data, predictions["labels"], predictions["coarse_labels"], config)
    rows = [row for row, _, _ in captions]
    assert rows and all(fine[row] != predictions["labels"][row] for row in rows)
    assert list(scores.fine_confidence[rows]) == sorted(scores.fine_confidence[rows], reverse=True)
    names, coarse_names = config.id2label, config.coarse_label_names
    for row, caption, coarse_wrong in captions:
        predicted_class, predicted_superclass = caption.split("pred: ", 1)[1].split("\n")
        assert predicted_class == f"{names[int(fine[row])]} ({scores.fine_confidence[row]:.2f})"
        assert coarse_names[coarse[row]].startswith(predicted_superclass.rstrip("…"))  # long names are cut
        assert coarse_wrong == (coarse[row] != predictions["coarse_labels"][row])
    head_fine, head_coarse = predictions["logits"].argmax(1), predictions["coarse_logits"].argmax(1)
    assert any(fine[row] != head_fine[row] or coarse[row] != head_coarse[row] for row in rows), (
        "some caption must show a prediction that differs from the heads' own argmax, or the test proves nothing"
    )
