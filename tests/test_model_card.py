"""The model card written into the output folder: Hub metadata with model-index results, a usage snippet that runs
as written, the training setup as it was (no enum names, the epochs actually trained), and evaluation-only cards."""

import json

import pytest
import yaml
from huggingface_hub import ModelCard

from configuration_hierarchical import HierarchicalEfficientNetV2Config
from conftest import small_config
from model_card import build_model_card, write_model_card
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


def test_snippet_loads_the_folder_by_its_path_or_the_hub_repository(output_dir):
    card = card_for(output_dir, trained_epochs=1.0)
    assert f'model="{output_dir.resolve()}"' in card.text and 'model="my-run"' not in card.text
    card = card_for(output_dir, trained_epochs=1.0, repo_id="me/cifar100-hierarchical")
    assert 'pipeline("image-classification", model="me/cifar100-hierarchical", trust_remote_code=True)' in card.text
    assert str(output_dir) not in card.text


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
    assert f"This run evaluated `{source}`" in text and "it did not train the model" in text
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
    assert "CIFAR" not in card.text and "# Hierarchical EfficientNetV2-S for my products" in card.text
    assert "3 superclasses" in card.text and "5 classes" in card.text and "kitchen (2)" in card.text
    names = {r.metric_name.rsplit(", ", 1)[0] for r in card.data.eval_results}
    assert "Class accuracy (5 classes, top-1)" in names and "Superclass accuracy (3 superclasses, coarse head)" in names
    assert "hierarchical-image-classification" in card.text
