"""Tests of calibrated and selective predictions in the model, the config fields that carry them, and the
`hierarchical-image-classification` pipeline saved with the model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from configuration_hierarchical import HierarchicalEfficientNetV2Config
from conftest import HANG_TIMEOUT_S, PROJECT_DIR, small_config
from hierarchical.evaluation.calibration import evaluate_calibration, hierarchical_scores
from hierarchical.evaluation.metrics import selective_scores
from modeling_hierarchical import (
    HierarchicalEfficientNetV2ForImageClassification,
    build_image_processor,
    hierarchical_log_probabilities,
    hierarchical_probabilities,
    selective_answers,
)


@pytest.fixture(scope="module")
def calibrated_model_dir(tmp_path_factory, model) -> Path:
    """A saved model with temperatures and a selective threshold in its config, and its image processor."""
    path = tmp_path_factory.mktemp("calibrated") / "model"
    model.config.fine_temperature, model.config.coarse_temperature = 0.5, 0.25
    model.config.selective_threshold = 0.04
    model.config.selective_target_accuracy, model.config.selective_confidence = 0.9, 0.95
    try:
        model.save_pretrained(path)
    finally:
        model.config.fine_temperature = model.config.coarse_temperature = 1.0
        model.config.selective_threshold = model.config.selective_target_accuracy = None
        model.config.selective_confidence = None
    build_image_processor(model.config).save_pretrained(path)
    return path


def spread_logits(config: HierarchicalEfficientNetV2Config) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """One image whose best class lies outside its most probable superclass: the probability is spread over the
    classes of superclass `spread`, while one class of superclass `single` scores highest. Returns the logits, and
    `spread` and `single`."""
    spread, single = 10, 9
    logits, coarse_logits = torch.zeros(1, config.num_labels), torch.zeros(1, config.num_coarse_labels)
    logits[0, config.coarse_children(spread)] = 3.0
    logits[0, config.coarse_children(single)[0]] = 4.2
    return logits, coarse_logits, spread, single


def head_model(config: HierarchicalEfficientNetV2Config, logits: torch.Tensor, coarse_logits: torch.Tensor):
    """A model whose heads return `logits` and `coarse_logits` (one row each) whatever the image."""
    model = HierarchicalEfficientNetV2ForImageClassification(config).eval()
    with torch.no_grad():
        for head, bias in ((model.fine_classifier, logits[0]), (model.coarse_classifier, coarse_logits[0])):
            head.weight.zero_()
            head.bias.copy_(bias)
    return model


def crafted_logits(config: HierarchicalEfficientNetV2Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Three images: one sure of its class (0), one sure only of the superclass of classes 1.., one unsure."""
    logits, coarse_logits = torch.zeros(3, config.num_labels), torch.zeros(3, config.num_coarse_labels)
    logits[0, 0], coarse_logits[0, config.fine_to_coarse[0]] = 12.0, 12.0
    siblings = config.coarse_children(config.fine_to_coarse[1])
    logits[1, siblings] = 8.0  # every class of one superclass alike
    coarse_logits[1, config.fine_to_coarse[1]] = 12.0
    return logits, coarse_logits


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fine_temperature": 0.0}, "fine_temperature must be a finite number > 0"),
        ({"fine_temperature": float("nan")}, "fine_temperature must be a finite number > 0"),
        ({"coarse_temperature": float("inf")}, "coarse_temperature must be a finite number > 0"),
        ({"coarse_temperature": -1.0}, "coarse_temperature must be a finite number > 0"),
        ({"coarse_temperature": True}, "coarse_temperature must be a finite number > 0"),
        ({"selective_threshold": 0.0}, r"selective_threshold must be None or in \(0, 1\]"),
        ({"selective_threshold": 1.5}, r"selective_threshold must be None or in \(0, 1\]"),
        ({"selective_threshold": float("nan")}, r"selective_threshold must be None or in \(0, 1\]"),
        ({"selective_target_accuracy": 1.0}, r"selective_target_accuracy must be None or in \(0, 1\)"),
        ({"selective_confidence": float("nan")}, r"selective_confidence must be None or in \(0, 1\)"),
    ],
)
def test_config_rejects_bad_calibration_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_config(**kwargs)


def test_saved_config_carries_the_calibration_and_the_pipeline(calibrated_model_dir):
    assert (calibrated_model_dir / "pipeline_hierarchical.py").is_file()
    assert (calibrated_model_dir / "image_processing_hierarchical.py").is_file()
    saved = json.loads((calibrated_model_dir / "config.json").read_text())
    assert saved["custom_pipelines"] == {
        "hierarchical-image-classification": {
            "impl": "pipeline_hierarchical.HierarchicalImageClassificationPipeline",
            "pt": ["AutoModelForImageClassification"],
            "type": "image",
        },
        "image-classification": {
            "impl": "pipeline_hierarchical.DecodingImageClassificationPipeline",
            "pt": ["AutoModelForImageClassification"],
            "type": "image",
        },
    }
    assert (saved["fine_temperature"], saved["coarse_temperature"], saved["selective_threshold"]) == (0.5, 0.25, 0.04)
    reloaded = HierarchicalEfficientNetV2Config.from_pretrained(calibrated_model_dir)
    assert (reloaded.selective_target_accuracy, reloaded.selective_confidence) == (0.9, 0.95)
    assert small_config().fine_temperature == 1.0 and small_config().selective_threshold is None


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def test_log_probabilities_match_and_stay_finite(model):
    generator = torch.Generator().manual_seed(0)
    logits, coarse_logits = torch.randn(64, 100, generator=generator) * 3, torch.randn(64, 20, generator=generator)
    fine_probs, coarse_probs = hierarchical_probabilities(logits, coarse_logits, model.fine_to_coarse, 2.0, 0.5)
    log_fine, log_coarse = hierarchical_log_probabilities(logits, coarse_logits, model.fine_to_coarse, 2.0, 0.5)
    torch.testing.assert_close(log_fine.exp(), fine_probs)
    torch.testing.assert_close(coarse_probs, fine_probs @ model.hierarchy)
    # extreme logits: probabilities underflow to 0, their logarithms stay finite (for likelihoods)
    log_fine, log_coarse = hierarchical_log_probabilities(logits * 1e3, coarse_logits * 1e3, model.fine_to_coarse)
    assert torch.isfinite(log_fine).all() and torch.isfinite(log_coarse).all()


def test_selective_answers_on_crafted_logits(model):
    logits, coarse_logits = crafted_logits(model.config)
    prediction = model.predict_from_logits(logits, coarse_logits, min_confidence=0.8)
    assert prediction.answer_levels == ["fine", "coarse", "abstain"]
    superclass = model.config.coarse_label_names[model.config.fine_to_coarse[1]]
    assert prediction.answer_labels == [model.config.id2label[0], superclass, "unknown"]
    assert prediction.answer_ids.tolist() == [0, model.config.fine_to_coarse[1], -1]
    assert prediction.answer_scores[0] >= 0.8 and prediction.answer_scores[1] >= 0.8 > prediction.answer_scores[2]
    assert prediction.min_confidence == 0.8
    everything_fine = model.predict_from_logits(logits, coarse_logits, min_confidence=1e-6)
    assert everything_fine.answer_levels == ["fine"] * 3
    assert model.predict_from_logits(logits, coarse_logits).answer_levels is None  # no threshold: as before


def test_predictions_use_the_configs_temperatures_and_threshold(model):
    logits, coarse_logits = crafted_logits(model.config)
    plain = model.predict_from_logits(logits, coarse_logits)
    model.config.fine_temperature, model.config.coarse_temperature = 4.0, 4.0
    model.config.selective_threshold = 0.8
    try:
        hot = model.predict_from_logits(logits, coarse_logits)
        loose = model.predict_from_logits(logits, coarse_logits, consistent=False)
    finally:
        model.config.fine_temperature = model.config.coarse_temperature = 1.0
        model.config.selective_threshold = None
    expected, _ = hierarchical_probabilities(logits, coarse_logits, model.fine_to_coarse, 4.0, 4.0)
    torch.testing.assert_close(hot.fine_scores, expected.max(-1).values)
    assert (hot.fine_scores[:2] < plain.fine_scores[:2]).all()  # flatter
    assert torch.equal(hot.fine_ids[:2], plain.fine_ids[:2])
    assert hot.answer_levels is not None and hot.min_confidence == 0.8  # the stored threshold
    torch.testing.assert_close(loose.fine_scores, (logits / 4.0).softmax(-1).max(-1).values)


def test_model_rule_and_metrics_agree(model):
    """The numpy counts behind the threshold choice and the metrics equal the model's own selective answers."""
    generator = torch.Generator().manual_seed(1)
    logits, coarse_logits = (
        torch.randn(300, 100, generator=generator) * 3,
        torch.randn(300, 20, generator=generator) * 3,
    )
    labels = torch.randint(0, 100, (300,), generator=generator)
    coarse_labels = model.fine_to_coarse[labels]
    scores = hierarchical_scores(logits, coarse_logits, labels, coarse_labels, model.config)
    for threshold in (0.05, 0.3, 0.6, 0.9):
        prediction = model.predict_from_logits(logits, coarse_logits, min_confidence=threshold)
        levels = np.array(prediction.answer_levels)
        answers = prediction.answer_ids
        right = np.where(levels == "fine", (answers == labels).numpy(), (answers == coarse_labels).numpy())
        expected = {
            "selective_fine_coverage": np.mean(levels == "fine"),
            "selective_coarse_coverage": np.mean(levels == "coarse"),
            "selective_abstention_rate": np.mean(levels == "abstain"),
        }
        if (levels != "abstain").any():
            expected["selective_accuracy"] = right[levels != "abstain"].mean()
        got = selective_scores(
            scores.fine_confidence, scores.fine_correct, scores.coarse_confidence, scores.coarse_correct, threshold
        )
        assert got == pytest.approx(expected), threshold


def test_bad_min_confidence_is_rejected(model):
    logits, coarse_logits = crafted_logits(model.config)
    for value in (0.0, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match=rf"min_confidence must be in \(0, 1\], got {re.escape(repr(value))}"):
            model.predict_from_logits(logits, coarse_logits, min_confidence=value)


def test_predict_hierarchical_from_images(model):
    prediction = model.predict_hierarchical(torch.randn(4, 3, 32, 32), min_confidence=0.02)
    assert len(prediction.answer_levels) == 4 and set(prediction.answer_levels) <= {"fine", "coarse", "abstain"}
    assert all(
        label == "unknown"
        if level == "abstain"
        else label in model.config.label2id or label in model.config.coarse_label_names
        for level, label in zip(prediction.answer_levels, prediction.answer_labels, strict=True)
    )


def test_selective_answers_function_levels():
    fine_probs = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.4, 0.0, 0.35, 0.25], [0.3, 0.3, 0.2, 0.2]])
    coarse_probs = torch.tensor([[1.0, 0.0], [0.4, 0.6], [0.6, 0.4]])  # classes 0, 1 in superclass 0; 2, 3 in 1
    levels, ids, scores = selective_answers(fine_probs, coarse_probs, 0.6)
    assert levels.tolist() == [0, 1, 1] and ids.tolist() == [0, 1, 0]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.6, 0.6]))
    levels, ids, _ = selective_answers(fine_probs, coarse_probs, 0.95)
    assert levels.tolist() == [1, 2, 2] and ids.tolist() == [0, -1, -1]


# ----------------------------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------------------------


def test_pipeline_loads_in_a_fresh_process_and_returns_both_levels(calibrated_model_dir, tmp_path):
    """The saved folder alone: another directory, the project not importable, only trust_remote_code."""
    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("L", (40, 50), 90)]
    for index, image in enumerate(images):
        image.save(tmp_path / f"{index}.png")
    script = f"""
import json, sys
from transformers import pipeline
assert not any(p and "{PROJECT_DIR}" in p for p in sys.path)
classifier = pipeline("hierarchical-image-classification", model={str(calibrated_model_dir)!r}, trust_remote_code=True)
assert type(classifier).__module__.startswith("transformers_modules"), type(classifier).__module__
standard = pipeline("image-classification", model={str(calibrated_model_dir)!r}, trust_remote_code=True)
results = {{
    "stored": classifier(["0.png", "1.png"]),
    "strict": classifier("0.png", min_confidence=0.99),
    "standard": standard("0.png", top_k=1),
    "standard_type": type(standard).__name__,
}}
json.dump(results, open("results.json", "w"))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    reloaded = HierarchicalEfficientNetV2ForImageClassification.from_pretrained(calibrated_model_dir).eval()
    processor = build_image_processor(reloaded.config)
    expected = reloaded.predict_hierarchical(processor(images, return_tensors="pt")["pixel_values"])
    for index, output in enumerate(results["stored"]):
        assert (
            output["label"] == expected.fine_labels[index] and output["coarse_label"] == expected.coarse_labels[index]
        )
        assert output["score"] == pytest.approx(float(expected.fine_scores[index]), abs=1e-5)
        assert output["coarse_score"] == pytest.approx(float(expected.coarse_scores[index]), abs=1e-5)
        assert output["answer_level"] == expected.answer_levels[index]
        assert output["answer_label"] == expected.answer_labels[index]
        assert output["min_confidence"] == 0.04  # from config.json
    assert results["strict"]["answer_level"] == "abstain" and results["strict"]["answer_label"] == "unknown"
    assert results["standard_type"] == "DecodingImageClassificationPipeline"  # the model's decoder, standard output
    logits = reloaded(processor(images[:1], return_tensors="pt")["pixel_values"]).logits
    assert results["standard"][0]["label"] == reloaded.config.id2label[int(logits.argmax())]


def test_pipeline_without_a_stored_threshold(tmp_path, model):
    model.save_pretrained(tmp_path)
    build_image_processor(model.config).save_pretrained(tmp_path)
    classifier = pipeline("hierarchical-image-classification", model=str(tmp_path), trust_remote_code=True)
    image = Image.new("RGB", (32, 32), (10, 200, 30))
    plain = classifier(image)
    assert set(plain) == {"label", "score", "coarse_label", "coarse_score", "parent_of_label"}
    assert plain["label"] in model.config.label2id and plain["coarse_label"] in model.config.coarse_label_names
    assert classifier(image, min_confidence=0.5)["answer_level"] in ("coarse", "abstain")
    loose = classifier(image, consistent=False)
    assert loose["coarse_score"] == pytest.approx(1 / 20, abs=0.01)  # the random coarse head alone: about uniform


# ----------------------------------------------------------------------------------------------------------------
# One superclass rule, top_k, the default batch
# ----------------------------------------------------------------------------------------------------------------


def test_the_superclass_is_the_most_probable_one_in_every_field(model):
    config = model.config
    logits, coarse_logits, spread, single = spread_logits(config)
    fine_probs, coarse_probs = hierarchical_probabilities(logits, coarse_logits, model.fine_to_coarse)
    assert config.fine_to_coarse[int(fine_probs.argmax())] == single != spread == int(coarse_probs.argmax())
    prediction = model.predict_from_logits(logits, coarse_logits, min_confidence=float(coarse_probs.max()) - 0.01)
    assert prediction.coarse_ids.tolist() == [spread] and prediction.parent_ids.tolist() == [single]
    assert prediction.coarse_labels == [config.coarse_label_names[spread]] == prediction.answer_labels
    assert prediction.parent_labels == [config.coarse_label_names[single]]
    assert prediction.answer_levels == ["coarse"]
    torch.testing.assert_close(prediction.coarse_scores, coarse_probs.max(-1).values)
    torch.testing.assert_close(prediction.answer_scores, prediction.coarse_scores)
    # the metric that scores "the superclass the model returns" reads the same rule
    labels, coarse_labels = torch.tensor([config.coarse_children(spread)[0]]), torch.tensor([spread])
    metrics = evaluate_calibration(logits, coarse_logits, labels, coarse_labels, config)
    assert metrics["coarse_combined_accuracy"] == 1.0 and metrics["coarse_consistent_accuracy"] == 0.0


def test_pipeline_names_one_superclass_and_the_parent_of_the_class(tmp_path):
    config = small_config()
    logits, coarse_logits, spread, single = spread_logits(config)
    head_model(config, logits, coarse_logits).save_pretrained(tmp_path)
    build_image_processor(config).save_pretrained(tmp_path)
    classifier = pipeline("hierarchical-image-classification", model=str(tmp_path), trust_remote_code=True)
    output = classifier(Image.new("RGB", (32, 32)), min_confidence=0.3)
    names = config.coarse_label_names
    assert output["coarse_label"] == names[spread] == output["answer_label"]
    assert output["answer_level"] == "coarse" and output["answer_score"] == pytest.approx(output["coarse_score"])
    assert output["parent_of_label"] == names[single] == names[config.fine_to_coarse[config.label2id[output["label"]]]]


def test_pipeline_top_k_reads_the_same_distribution_as_its_labels(tmp_path):
    config = small_config()
    logits, coarse_logits, _, _ = spread_logits(config)
    coarse_logits[0, :3] = torch.tensor([2.0, 1.0, 0.5])
    model = head_model(config, logits, coarse_logits)
    model.save_pretrained(tmp_path)
    build_image_processor(config).save_pretrained(tmp_path)
    classifier = pipeline("hierarchical-image-classification", model=str(tmp_path), trust_remote_code=True)
    image = Image.new("RGB", (32, 32))
    for consistent in (True, False):
        output = classifier(image, top_k=3, consistent=consistent)
        expected = model.predict_from_logits(logits, coarse_logits, consistent=consistent)
        for key, probs, names in (
            ("top_labels", expected.fine_probs[0], config.id2label),
            ("top_coarse_labels", expected.coarse_probs[0], config.coarse_label_names),
        ):
            scores, ids = probs.topk(3)
            assert [entry["label"] for entry in output[key]] == [names[int(i)] for i in ids]
            assert [entry["score"] for entry in output[key]] == pytest.approx(scores.tolist(), abs=1e-6)
        assert output["top_labels"][0] == {"label": output["label"], "score": pytest.approx(output["score"])}
        top_coarse = output["top_coarse_labels"][0]
        assert top_coarse == {"label": output["coarse_label"], "score": pytest.approx(output["coarse_score"])}
    assert len(classifier(image, top_k=500)["top_coarse_labels"]) == config.num_coarse_labels
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="top_k must be a positive integer"):
            classifier(image, top_k=bad)


def test_pipeline_each_head_alone_gives_no_selective_answer(calibrated_model_dir):
    classifier = pipeline("hierarchical-image-classification", model=str(calibrated_model_dir), trust_remote_code=True)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    loose = classifier(image, consistent=False)
    model = HierarchicalEfficientNetV2ForImageClassification.from_pretrained(calibrated_model_dir).eval()
    pixel_values = build_image_processor(model.config)(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        outputs = model(pixel_values)
    fine = (outputs.logits / 0.5).softmax(-1)[0]  # the stored temperatures: 0.5 and 0.25
    coarse = (outputs.coarse_logits / 0.25).softmax(-1)[0]
    assert loose["score"] == pytest.approx(float(fine.max()), abs=1e-5)
    assert loose["coarse_score"] == pytest.approx(float(coarse.max()), abs=1e-5)
    assert "answer_score" not in loose  # the stored threshold applies to the consistent distribution only
    with pytest.raises(ValueError, match="consistent=False"):
        classifier(image, consistent=False, min_confidence=0.5)


def counted_pipeline(model_dir, monkeypatch) -> tuple[Any, list[int]]:
    """The hierarchical pipeline of `model_dir` and the list its model's forward appends each batch size to."""
    classifier = pipeline("hierarchical-image-classification", model=str(model_dir), trust_remote_code=True)
    sizes = []
    forward = classifier.model.forward
    monkeypatch.setattr(classifier.model, "forward", lambda **inputs: sizes.append(len(inputs["pixel_values"])) or
                        forward(**inputs))  # fmt: skip
    return classifier, sizes


def test_pipeline_batches_a_list_by_default_and_warns_only_without_a_threshold(saved_model_dir, monkeypatch, caplog):
    classifier, sizes = counted_pipeline(saved_model_dir, monkeypatch)
    images = [Image.new("RGB", (32, 32), (10 * i, 0, 0)) for i in range(5)]
    with caplog.at_level("WARNING"):
        batched = classifier(images, min_confidence=0.5)
        assert sizes == [5]
        assert "no selective_threshold" not in caplog.text  # min_confidence given: nothing is missing
        one_by_one = [classifier(image) for image in images]
        assert caplog.text.count("no selective_threshold") == 1
    assert [output["label"] for output in batched] == [output["label"] for output in one_by_one]
    assert [output["score"] for output in batched] == pytest.approx([output["score"] for output in one_by_one])
    sizes.clear()
    classifier(images, batch_size=2)
    assert sizes == [2, 2, 1]


def test_pipeline_batches_tuples_dataset_columns_and_datasets(saved_model_dir, monkeypatch):
    classifier, sizes = counted_pipeline(saved_model_dir, monkeypatch)
    images = [Image.new("RGB", (32, 32), (10 * i, 0, 0)) for i in range(5)]
    expected = [output["label"] for output in classifier(images, min_confidence=0.5)]
    data = datasets.Dataset.from_dict({"img": images, "label": list(range(5))}).cast_column("img", datasets.Image())
    for inputs in (tuple(images), data["img"], data, data.to_iterable_dataset()):
        sizes.clear()
        outputs = classifier(inputs, min_confidence=0.5)
        assert isinstance(outputs, list) == hasattr(inputs, "__len__")  # a streamed dataset stays lazy
        assert [output["label"] for output in outputs] == expected
        assert sizes == [5], type(inputs).__name__
    assert classifier([]) == [] and classifier(()) == []
    two = datasets.Dataset.from_dict({"img": images, "mask": images}, features=datasets.Features(
        {"img": datasets.Image(), "mask": datasets.Image()}))  # fmt: skip
    with pytest.raises(ValueError, match=r"exactly one Image column, got \['img', 'mask'\] .*dataset\['img'\]"):
        classifier(two)
    with pytest.raises(ValueError, match=r"exactly one Image column, got none among its columns \['label'\]"):
        classifier(data.remove_columns("img"))
