"""The model card written into the output folder: Hub metadata with model-index results, a usage snippet that runs
as written, the training setup as it was (no enum names, the epochs actually trained), and evaluation-only cards."""

import json
import re

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from configuration_hierarchical import HierarchicalEfficientNetV2Config
from conftest import small_config
from hierarchical.evaluation.selective_threshold import guarantee_text
from hierarchical.training.model_card import build_model_card, write_model_card
from run_classification import parse_args

RESULTS = {
    "eval_fine_accuracy": 0.61234,
    "eval_coarse_accuracy": 0.72,
    "test_fine_accuracy": 0.6,
    "test_consistency": 0.9,
}


@pytest.fixture
def output_dir(tmp_path):
    folder = tmp_path / "my-run"
    folder.mkdir()
    (folder / "all_results.json").write_text(json.dumps(RESULTS))
    return folder


def card_for(output_dir, *options, **kwargs) -> ModelCard:
    _, _, args = parse_args(["--output_dir", str(output_dir), "--do_train", *options])
    config = small_config()
    write_model_card(str(output_dir), config, args, kwargs.pop("dataset_name", "uoft-cs/cifar100"), **kwargs)
    return ModelCard.load(output_dir / "README.md")


def test_card_metadata_names_the_hub_dataset_and_the_results(output_dir):
    card = card_for(output_dir, trained_epochs=3.0)
    metadata = yaml.safe_load(card.content.split("---")[1])
    assert metadata["datasets"] == ["uoft-cs/cifar100"]
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-classification"
    results = card.data.eval_results
    by_split = {(r.dataset_split, r.metric_name.rsplit(", ", 1)[0]): r for r in results}
    fine = by_split[("validation", "Class accuracy (100 classes, top-1)")]
    assert fine.metric_value == 0.6123 and fine.metric_type == "accuracy" and fine.dataset_type == "uoft-cs/cifar100"
    assert by_split[("test", "Class prediction inside the predicted superclass")].metric_value == 0.9
    assert len(results) == len(RESULTS)


def test_local_data_is_never_named_as_a_dataset(output_dir, tmp_path):
    card = card_for(output_dir, dataset_name=str(tmp_path), trained_epochs=1.0)
    metadata = yaml.safe_load(card.content.split("---")[1])
    assert "datasets" not in metadata
    assert str(tmp_path) not in card.content.split("---")[1]
    assert "a local copy of CIFAR-100" in card.text


def test_snippet_loads_the_hub_repository_or_a_placeholder_never_a_path(output_dir):
    card = card_for(output_dir, trained_epochs=1.0)
    assert 'model_id = "your-name/your-model"' in card.text
    assert "Replace `your-name/your-model` with the Hub id of this model" in card.text
    assert str(output_dir) not in card.content and "my-run" not in card.content
    card = card_for(output_dir, trained_epochs=1.0, repo_id="me/cifar100-hierarchical")
    assert 'model_id = "me/cifar100-hierarchical"' in card.text and "your-name/your-model" not in card.text
    assert 'pipeline("image-classification", model=model_id, trust_remote_code=True)' in card.text
    assert str(output_dir) not in card.content


def test_setup_shows_option_values_and_the_epochs_trained(output_dir):
    text = card_for(output_dir, "--lr_scheduler_type", "cosine", "--epochs", "10", trained_epochs=1.0).text
    assert "| scheduler | cosine, warmup 0.05 |" in text and "SchedulerType" not in text
    assert "| epochs trained | 1.0 |" in text


def test_evaluation_only_card_says_so_and_takes_the_setup_from_the_model_folder(output_dir, tmp_path):
    source = tmp_path / "trained"
    source.mkdir()
    (source / "run_options.json").write_text(json.dumps({"lr_scheduler_type": "linear", "lr_conv": 0.01, "seed": 7}))
    (source / "trainer_state.json").write_text(json.dumps({"epoch": 2.0}))
    text = card_for(output_dir, "--epochs", "10", source_model=str(source)).text
    assert "This run evaluated a saved model" in text and "it did not train the model" in text
    assert str(source) not in text
    assert "| epochs trained | 2.0 |" in text and "| scheduler | linear" in text and "| seed | 7 |" in text
    assert "| epochs trained | 10" not in text


def test_build_model_card_does_not_write(output_dir):
    _, _, args = parse_args(["--output_dir", str(output_dir), "--do_train"])
    config = small_config()
    card = build_model_card(str(output_dir), config, args, "uoft-cs/cifar100", trained_epochs=1.0)
    assert isinstance(card, ModelCard) and not (output_dir / "README.md").exists()


def test_card_of_another_hierarchy_names_its_data_and_sizes(output_dir, tmp_path):
    data = tmp_path / "my products"
    data.mkdir()
    _, _, args = parse_args(["--output_dir", str(output_dir), "--do_train"])
    config = HierarchicalEfficientNetV2Config(
        backbone_weights=None,
        image_size=32,
        id2label={0: "mug", 1: "plate", 2: "chair", 3: "table", 4: "lamp"},
        fine_to_coarse=[0, 0, 1, 1, 2],
        coarse_label_names=["kitchen", "furniture", "lighting"],
    )
    write_model_card(str(output_dir), config, args, str(data), trained_epochs=1.0)
    card = ModelCard.load(output_dir / "README.md")
    assert "CIFAR" not in card.text and "my products" not in card.content
    assert "# Hierarchical EfficientNetV2-S (5 classes in 3 superclasses)" in card.text
    assert "Trained on a local image folder" in card.text
    assert "3 superclasses" in card.text and "5 classes" in card.text and "kitchen (2)" in card.text
    names = {r.metric_name.rsplit(", ", 1)[0] for r in card.data.eval_results}
    assert "Class accuracy (5 classes, top-1)" in names and "Superclass accuracy (3 superclasses, coarse head)" in names
    assert "hierarchical-image-classification" in card.text


def calibrated_run(output_dir, results: dict[str, float]) -> None:
    """The files a training run leaves: its results, a trainer state whose best checkpoint is an earlier one, the
    validation report."""
    (output_dir / "all_results.json").write_text(json.dumps(results))
    history = [
        {"step": 10, "epoch": 1.0, "eval_loss": 3.9, "eval_fine_accuracy": 0.41, "eval_coarse_accuracy": 0.55},
        {"step": 20, "epoch": 2.0, "eval_loss": 4.2, "eval_fine_accuracy": 0.38, "eval_coarse_accuracy": 0.52},
    ]
    state = {"global_step": 20, "epoch": 2.0, "best_model_checkpoint": str(output_dir / "checkpoint-10"),
             "best_global_step": 10, "log_history": history}  # fmt: skip
    (output_dir / "trainer_state.json").write_text(json.dumps(state))
    validation = output_dir / "reports" / "validation"
    validation.mkdir(parents=True)
    (validation / "eval_report.md").write_text("# Evaluation report: validation split\n")
    (validation / "superclass_accuracy.png").write_bytes(b"png")


def test_card_for_the_hub_names_weights_calibration_versions_and_data(output_dir):
    results = {"eval_fine_accuracy": 0.41, "eval_coarse_accuracy": 0.55, "eval_calibration_samples": 500.0}
    calibrated_run(output_dir, results)
    config = small_config(
        backbone_weights="imagenet",
        fine_temperature=1.25,
        coarse_temperature=0.8,
        selective_threshold=0.873,
        selective_target_accuracy=0.9,
        selective_confidence=0.95,
    )
    _, _, args = parse_args(["--output_dir", str(output_dir), "--do_train", "--load_best_model_at_end", "true"])
    path = write_model_card(str(output_dir), config, args, "/data/shop-photos", 2.0, None, "me/shop-classifier")
    card = ModelCard.load(path)
    text = card.text

    assert 'model_id = "me/shop-classifier"' in text and "/data/" not in card.content  # no path of this machine
    assert "min_confidence=0.5" not in text and "the stored threshold 0.873 is its default min_confidence" in text
    assert "fine 1.250, coarse 0.800, fitted on 500 validation images" in text
    assert "never changes its head's own argmax, but" in text and "can change the class and superclass" in text
    assert "Selective threshold 0.873" in text and "target accuracy of 0.9 at confidence 0.95" in text
    assert guarantee_text(0.9, 0.95) in text  # the one wording of the guarantee, as the log and the report give it
    assert "P(a threshold is chosen and it misses the target) <= 1 - confidence = 0.05" in text
    assert "best checkpoint of training, step 10, epoch 1.0 (training ran to step 20, epoch 2.0)" in text
    assert "fine_accuracy 0.4100, coarse_accuracy 0.5500, loss 3.9000" in text
    for framework in ("torch", "torchvision", "transformers", "datasets"):
        assert re.search(rf"^- {framework} \d+\.\d+", text, re.MULTILINE), framework
    assert "| backbone initialisation | ImageNet (torchvision IMAGENET1K_V1) |" in text and "| None |" not in text
    assert "shop-photos" not in card.content and "a local copy of CIFAR-100" in text  # CIFAR-100's classes
    assert "[validation report](reports/validation/eval_report.md)" in text
    assert "![Accuracy per superclass](reports/validation/superclass_accuracy.png)" in text
    assert "near chance" not in text

    # the Hub's metadata checks, offline: the YAML block parses into card data and model-index results
    metadata = metadata_load(path)
    assert ModelCardData(**metadata).to_dict() == metadata
    results_read = model_index_to_eval_results(metadata["model-index"])[1]
    assert {(r.dataset_split, r.metric_value) for r in results_read} == {("validation", 0.41), ("validation", 0.55)}


def test_card_without_a_threshold_says_why_and_warns_near_chance(output_dir):
    results = {"eval_fine_accuracy": 0.015, "eval_selective_target_accuracy": 0.9, "eval_selective_confidence": 0.9}
    (output_dir / "all_results.json").write_text(json.dumps(results))
    _, _, args = parse_args(["--output_dir", str(output_dir), "--do_train"])
    text = build_model_card(str(output_dir), small_config(), args, "uoft-cs/cifar100", 1.0).text
    assert "No selective threshold: none reached an accuracy of 0.9 with confidence 0.9" in text
    assert "(1 = not calibrated" in text and "| backbone initialisation | random |" in text
    assert "**This model is near chance**: its class accuracy on the validation split, 1.50%, is below 2 times" in text
