"""Tests of the configuration and the model: shapes, losses, freezing, validation, save/load, Hub code, pipeline."""

import json
import os
import pickle
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.models import efficientnet_v2_s
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

import modeling_hierarchical
from configuration_hierarchical import CIFAR100_FINE_LABELS, HierarchicalEfficientNetV2Config
from conftest import HANG_TIMEOUT_S, PROJECT_DIR, small_config
from modeling_hierarchical import (
    HierarchicalEfficientNetV2ForImageClassification,
    build_image_processor,
    hierarchical_probabilities,
)


def test_default_config_is_the_official_cifar100_table():
    config = HierarchicalEfficientNetV2Config()
    coarse_of = {config.id2label[f]: config.coarse_label_names[c] for f, c in enumerate(config.fine_to_coarse)}
    assert coarse_of["beaver"] == coarse_of["whale"] == "aquatic_mammals"
    assert coarse_of["maple_tree"] == "trees"
    assert coarse_of["crab"] == "non-insect_invertebrates"
    assert coarse_of["lawn_mower"] == coarse_of["rocket"] == "vehicles_2"
    assert config.id2label[26] == "crab" and config.label2id["crab"] == 26
    assert list(config.id2label.values()) == sorted(CIFAR100_FINE_LABELS)
    assert np.bincount(config.fine_to_coarse).tolist() == [5] * 20
    assert config.num_frozen_stages == 4 and config.backbone_weights == "imagenet"
    assert config.hierarchy_matrix().sum(0).tolist() == [5.0] * 20
    assert config.fine_to_coarse_tensor().tolist() == config.fine_to_coarse


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fine_to_coarse": [0] * 99}, "fine_to_coarse has 99 entries"),
        ({"fine_to_coarse": [20] + [i % 20 for i in range(1, 100)]}, r"fine_to_coarse\[0\] = 20"),
        ({"fine_to_coarse": [-1] + [i % 20 for i in range(1, 100)]}, r"fine_to_coarse\[0\] = -1"),
        ({"fine_to_coarse": [i % 19 for i in range(100)]}, "superclass 19 .* has no fine class"),
        ({"coarse_label_names": ["a"] * 20}, "coarse_label_names has duplicate names"),
        ({"coarse_label_names": ["a", "b"]}, r"fine_to_coarse\[\d+\] = \d+ is not a superclass index in \[0, 2\)"),
        ({"id2label": {0: "a", 1: "b"}}, "fine_to_coarse has 100 entries but there are 2 fine labels"),
        ({"num_frozen_stages": 9}, "num_frozen_stages must be in"),
        ({"dropout": 1.5}, "dropout must be in"),
        ({"label_smoothing": -0.1}, "label_smoothing must be in"),
        ({"image_size": 8}, "image_size must be"),
        ({"image_std": [0.2, 0.2]}, "image_std must hold 3 values"),
        ({"backbone_weights": "weights.txt"}, "backbone_weights must be"),
        ({"per_layer_config": {0: {"dropout": 0.1}}}, "per_layer_config is not supported"),
    ],
)
def test_config_rejects_inconsistent_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HierarchicalEfficientNetV2Config(**kwargs)


def test_config_attribute_reads_need_no_aliases():
    # The config reads attributes directly, which is only right while the class maps no attribute names.
    config = HierarchicalEfficientNetV2Config()
    assert type(config).attribute_map == {} and not config.is_heterogeneous
    config.image_size = 64
    assert config.image_size == 64 and config.to_dict()["image_size"] == 64 and config.id2label[26] == "crab"


def test_custom_hierarchy_builds_matching_heads():
    config = small_config(
        fine_to_coarse=[0, 0, 1, 1, 1], id2label={i: f"c{i}" for i in range(5)}, coarse_label_names=["x", "y"]
    )
    model = HierarchicalEfficientNetV2ForImageClassification(config).eval()
    outputs = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 4]))
    assert outputs.logits.shape == (2, 5) and outputs.coarse_logits.shape == (2, 2)
    assert model.fine_classifier.in_features == 1280 + 2


def test_forward_outputs(model):
    pixel_values = torch.randn(3, 3, 32, 32)
    outputs = model(pixel_values)
    assert outputs.loss is None
    assert outputs.logits.shape == (3, 100) and outputs.coarse_logits.shape == (3, 20)
    logits, coarse_logits = model(pixel_values, return_dict=False)
    torch.testing.assert_close(logits, outputs.logits)
    torch.testing.assert_close(coarse_logits, outputs.coarse_logits)
    assert model(torch.randn(1, 3, 48, 40)).logits.shape == (1, 100)  # any size the backbone takes


def test_loss_derives_coarse_targets_from_the_mapping():
    torch.manual_seed(0)
    model = HierarchicalEfficientNetV2ForImageClassification(small_config()).eval()
    with torch.no_grad():  # a fresh head is near-uniform: make wrong coarse targets visibly costlier
        model.coarse_classifier.bias.copy_(torch.randn(20) * 3)
    pixel_values, labels = torch.randn(4, 3, 32, 32), torch.tensor([4, 95, 47, 26])
    derived = model(pixel_values, labels=labels).loss
    explicit = model(pixel_values, labels=labels, coarse_labels=torch.tensor([0, 0, 17, 13])).loss
    wrong = model(pixel_values, labels=labels, coarse_labels=torch.tensor([1, 1, 1, 1])).loss
    torch.testing.assert_close(derived, explicit)
    assert not torch.isclose(derived, wrong)
    outputs = model(pixel_values)
    fine = torch.nn.functional.cross_entropy(outputs.logits, labels)
    coarse = torch.nn.functional.cross_entropy(outputs.coarse_logits, torch.tensor([0, 0, 17, 13]))
    torch.testing.assert_close(derived, fine + model.config.coarse_loss_weight * coarse)


def test_soft_targets_equal_hard_targets_when_one_hot(model):
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.tensor([3, 77])
    soft = torch.nn.functional.one_hot(labels, 100).float()
    torch.testing.assert_close(model(pixel_values, labels=soft).loss, model(pixel_values, labels=labels).loss)


def test_label_smoothing_and_coarse_weight_enter_the_loss():
    torch.manual_seed(0)
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.tensor([3, 77])
    coarse_labels = torch.tensor([8, 13])
    base = HierarchicalEfficientNetV2ForImageClassification(small_config()).eval()
    with torch.no_grad():  # confident heads, so that smoothing makes a difference
        base.coarse_classifier.bias.copy_(torch.randn(20) * 3)
        base.fine_classifier.bias.copy_(torch.randn(100) * 3)
    outputs = base(pixel_values)
    ce = torch.nn.functional.cross_entropy
    for kwargs in ({"label_smoothing": 0.1}, {"coarse_loss_weight": 0.0}, {"coarse_loss_weight": 0.3}):
        variant = HierarchicalEfficientNetV2ForImageClassification(small_config(**kwargs)).eval()
        variant.load_state_dict(base.state_dict())
        smoothing, weight = variant.config.label_smoothing, variant.config.coarse_loss_weight
        expected = ce(outputs.logits, labels, label_smoothing=smoothing) + weight * ce(
            outputs.coarse_logits, coarse_labels, label_smoothing=smoothing
        )
        torch.testing.assert_close(variant(pixel_values, labels=labels).loss, expected)
    assert not torch.isclose(ce(outputs.logits, labels, label_smoothing=0.1), ce(outputs.logits, labels))


def test_gradients_reach_every_trainable_parameter_and_no_frozen_one():
    torch.manual_seed(0)
    model = HierarchicalEfficientNetV2ForImageClassification(small_config()).train()
    model(torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    frozen = {f"features.{i}." for i in range(model.config.num_frozen_stages)}
    for name, parameter in model.named_parameters():
        is_frozen = any(name.startswith(prefix) for prefix in frozen)
        assert parameter.requires_grad is not is_frozen, name
        if is_frozen:
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert sum(not p.requires_grad for p in model.parameters()) > 0


def test_frozen_batchnorm_statistics_survive_a_training_step():
    torch.manual_seed(0)
    model = HierarchicalEfficientNetV2ForImageClassification(small_config()).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    optimizer.step()
    after = model.state_dict()
    frozen = tuple(f"features.{i}." for i in range(model.config.num_frozen_stages))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the trainable stages' BatchNorm statistics should update"
    assert not {k for k in changed if k.startswith(frozen)}
    assert all(not m.training for stage in model.frozen_stages() for m in stage.modules())
    assert model.features[-1].training and model.training


@pytest.mark.parametrize(
    ("pixel_values", "labels", "message"),
    [
        (torch.randn(3, 32, 32), None, r"pixel_values must be a \(batch, 3, height, width\) tensor"),
        (torch.randn(2, 1, 32, 32), None, "must have 3 channels"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), None, "floating-point"),
        (torch.randn(2, 3, 32, 32), torch.tensor([0, 100]), r"labels must be in \[0, 100\)"),
        (torch.randn(2, 3, 32, 32), torch.tensor([-1, 3]), r"labels must be in \[0, 100\)"),
        (torch.randn(2, 3, 32, 32), torch.tensor([1, 2, 3]), r"labels must have shape \(2,\)"),
        (torch.randn(2, 3, 32, 32), torch.rand(2, 10), r"soft labels must have shape \(2, 100\)"),
    ],
)
def test_forward_rejects_bad_input(model, pixel_values, labels, message):
    with pytest.raises(ValueError, match=message):
        model(pixel_values, labels=labels)


def test_forward_rejects_out_of_range_coarse_labels(model):
    with pytest.raises(ValueError, match=r"coarse_labels must be in \[0, 20\)"):
        model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1]), coarse_labels=torch.tensor([0, 20]))


def test_consistent_prediction_reads_one_distribution_that_respects_the_hierarchy(model):
    fine_to_coarse = model.fine_to_coarse
    generator = torch.Generator().manual_seed(0)
    logits, coarse_logits = (
        torch.randn(512, 100, generator=generator) * 4,
        torch.randn(512, 20, generator=generator) * 4,
    )
    fine_probs, coarse_probs = hierarchical_probabilities(logits, coarse_logits, fine_to_coarse)
    torch.testing.assert_close(fine_probs.sum(-1), torch.ones(512))
    torch.testing.assert_close(coarse_probs, fine_probs @ model.hierarchy)
    independent = fine_to_coarse[logits.argmax(-1)] != coarse_logits.argmax(-1)
    assert independent.any(), "random heads should disagree somewhere, or the test proves nothing"

    pixel_values = torch.randn(16, 3, 32, 32, generator=generator) * 3
    prediction = model.predict_hierarchical(pixel_values)
    assert torch.equal(fine_to_coarse[prediction.fine_ids], prediction.parent_ids)
    _, expected_coarse = hierarchical_probabilities(*model(pixel_values).to_tuple(), fine_to_coarse)
    assert torch.equal(prediction.coarse_ids, expected_coarse.argmax(-1))  # the most probable superclass
    assert (prediction.coarse_scores >= prediction.fine_scores).all()
    assert prediction.fine_labels[0] == model.config.id2label[int(prediction.fine_ids[0])]
    assert prediction.coarse_labels[0] == model.config.coarse_label_names[int(prediction.coarse_ids[0])]
    loose = model.predict_hierarchical(pixel_values, consistent=False)
    outputs = model(pixel_values)
    assert torch.equal(loose.fine_ids, outputs.logits.argmax(-1))
    assert torch.equal(loose.coarse_ids, outputs.coarse_logits.argmax(-1))


def test_channels_last_gives_the_same_outputs(model):
    variant = HierarchicalEfficientNetV2ForImageClassification(small_config(channels_last=True)).eval()
    variant.load_state_dict(model.state_dict())
    assert variant.features[1][0].block[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(variant(pixel_values).logits, model(pixel_values).logits, atol=1e-4, rtol=1e-4)


def test_save_and_reload_gives_identical_logits(saved_model_dir, model):
    files = set(os.listdir(saved_model_dir))
    assert {
        "config.json",
        "model.safetensors",
        "configuration_hierarchical.py",
        "modeling_hierarchical.py",
        "prediction_hierarchical.py",
        "pipeline_hierarchical.py",
    } <= files
    assert "preprocessor_config.json" in files
    config = json.loads((saved_model_dir / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_hierarchical.HierarchicalEfficientNetV2Config",
        "AutoModelForImageClassification": "modeling_hierarchical.HierarchicalEfficientNetV2ForImageClassification",
    }
    reloaded = AutoModelForImageClassification.from_pretrained(saved_model_dir).eval()
    assert isinstance(reloaded, HierarchicalEfficientNetV2ForImageClassification)
    assert torch.equal(reloaded.fine_to_coarse, model.fine_to_coarse)  # not saved: rebuilt from the config
    assert torch.equal(reloaded.hierarchy, model.hierarchy)
    pixel_values = torch.randn(2, 3, 32, 32)
    assert torch.equal(reloaded(pixel_values).logits, model(pixel_values).logits)
    assert torch.equal(reloaded(pixel_values).coarse_logits, model(pixel_values).coarse_logits)
    assert AutoImageProcessor.from_pretrained(saved_model_dir).size == {"height": 32, "width": 32}


def test_from_pretrained_never_loads_backbone_weights(tmp_path, model, monkeypatch):
    model.config.backbone_weights = "imagenet"
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.config.backbone_weights = None

    def refuse(source):
        raise AssertionError(f"from_pretrained tried to load backbone weights from {source}")

    monkeypatch.setattr(modeling_hierarchical, "load_backbone_state_dict", refuse)
    reloaded = HierarchicalEfficientNetV2ForImageClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.backbone_weights == "imagenet"
    for name, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[name]), name
    with pytest.raises(AssertionError, match="tried to load backbone weights"):
        HierarchicalEfficientNetV2ForImageClassification(reloaded.config)


def test_fresh_process_loads_with_trust_remote_code(saved_model_dir, model, tmp_path):
    """The saved folder works on its own: another directory, the project not importable."""
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(pixel_values, tmp_path / "x.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForImageClassification
assert not any(p and "{PROJECT_DIR}" in p for p in sys.path)
model = AutoModelForImageClassification.from_pretrained({str(saved_model_dir)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / "x.pt")!r})).logits, {str(tmp_path / "y.pt")!r})
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), model(pixel_values).logits)


def test_pipeline_returns_cifar_names(tmp_path):
    # Fine-head biases 0, 0.1, ..., 9.9 outweigh the freshly initialised weights (logits near 1e-6): the three
    # most probable classes are 99, 98 and 97 for any image, with the softmax of the biases as their scores.
    model = HierarchicalEfficientNetV2ForImageClassification(small_config()).eval()
    with torch.no_grad():
        model.fine_classifier.bias.copy_(torch.arange(100) / 10)
    model.save_pretrained(tmp_path)
    build_image_processor(model.config).save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path), trust_remote_code=True)
    images = [
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)),
        Image.new("L", (50, 40), 128),  # grayscale, other size
    ]
    results = classifier(images, top_k=3)
    expected_scores = (torch.arange(100) / 10).softmax(0)[[99, 98, 97]].tolist()
    assert len(results) == 2
    for result in results:
        assert [r["label"] for r in result] == [CIFAR100_FINE_LABELS[i] for i in (99, 98, 97)]  # worm, woman, wolf
        assert [r["score"] for r in result] == pytest.approx(expected_scores, abs=1e-4)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_backbone_weights_from_a_local_torchvision_state_dict(tmp_path, suffix):
    torch.manual_seed(123)
    state_dict = efficientnet_v2_s().state_dict()
    path = tmp_path / f"efficientnet_v2_s{suffix}"
    if suffix == ".pth":
        torch.save(state_dict, path)
    else:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    torch.manual_seed(0)
    model = HierarchicalEfficientNetV2ForImageClassification(small_config(backbone_weights=str(path)))
    for name, value in model.features.state_dict().items():
        assert torch.equal(value, state_dict[f"features.{name}"]), name
    assert model.config.backbone_weights == str(path)


def test_backbone_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HierarchicalEfficientNetV2ForImageClassification(small_config(backbone_weights=str(tmp_path / "none.pth")))
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="does not match EfficientNetV2-S"):
        HierarchicalEfficientNetV2ForImageClassification(small_config(backbone_weights=str(wrong)))
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="no 'features.\\*' entries"):
        HierarchicalEfficientNetV2ForImageClassification(small_config(backbone_weights=str(other)))


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_backbone_weights_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as file:
        pickle.dump({"features.0.0.weight": _Payload(marker)}, file, protocol=2)
    with pytest.raises(ValueError, match="weights_only=True"):
        HierarchicalEfficientNetV2ForImageClassification(small_config(backbone_weights=str(path)))
    assert not marker.exists()


def test_imagenet_weights_offline_error_names_the_alternatives(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(
        modeling_hierarchical.EfficientNet_V2_S_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline
    )
    with pytest.raises(OSError, match="Could not download the ImageNet weights") as error:
        HierarchicalEfficientNetV2ForImageClassification(small_config(backbone_weights="imagenet"))
    assert "--backbone_weights" in str(error.value) and "efficientnet_v2_s-dd5fe13b.pth" in str(error.value)


def test_imagenet_weights_load_from_the_torch_hub_cache(tmp_path, monkeypatch):
    """With the weights file in the hub cache, "imagenet" loads it without any download."""
    previous_hub_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        weights = modeling_hierarchical.EfficientNet_V2_S_Weights.IMAGENET1K_V1
        torch.manual_seed(7)
        state_dict = efficientnet_v2_s().state_dict()
        cached = tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url)
        cached.parent.mkdir(parents=True)
        torch.save(state_dict, cached)
        monkeypatch.setattr(  # the real file's hash prefix cannot match a random model: skip only the hash check
            weights.__class__,
            "get_state_dict",
            lambda self, **kw: torch.hub.load_state_dict_from_url(self.url, **{**kw, "check_hash": False}),
        )
        model = HierarchicalEfficientNetV2ForImageClassification(small_config(backbone_weights="imagenet"))
        assert torch.equal(model.features[0][0].weight, state_dict["features.0.0.weight"])
    finally:
        torch.hub.set_dir(previous_hub_dir)
