"""The model card (`README.md`) that `run_classification.py` writes into its output folder and pushes to the Hub.

Built with `huggingface_hub.ModelCard`: YAML metadata (with `model-index` evaluation results, which the Hub shows
on the model page), the metrics at both levels of the hierarchy, a usage snippet that runs as written and the
training setup. A run that only evaluated a saved model says so, and takes the training setup from that folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PretrainedConfig, TrainingArguments

from configuration_hierarchical import CIFAR100_FINE_LABELS, CIFAR100_FINE_TO_COARSE
from data_sources import is_hub_dataset
from report_figures import FIGURE_NAMES
from report_markdown import FIGURE_TITLES
from run_summary import OPTIONS_FILE

METRICS = {  # key in all_results.json -> (model-index metric type, readable name; {fine}/{coarse}: head sizes)
    "fine_accuracy": ("accuracy", "Class accuracy ({fine} classes, top-1)"),
    "fine_top5_accuracy": ("top_5_accuracy", "Class accuracy ({fine} classes, top-5)"),
    "coarse_accuracy": ("accuracy", "Superclass accuracy ({coarse} superclasses, coarse head)"),
    "coarse_from_fine_accuracy": ("accuracy", "Superclass accuracy of the class prediction"),
    "consistency": ("consistency", "Class prediction inside the predicted superclass"),
    "both_correct": ("accuracy", "Class and superclass both correct"),
    "mistake_severity": ("mistake_severity", "Mean tree distance of wrong class predictions"),
}
SPLITS = {"eval": "validation", "test": "test"}  # results prefix -> split
MAX_SUPERCLASS_TEXT = 2000  # characters of the superclass list in the card's introduction


def is_cifar100(config: PretrainedConfig) -> bool:
    """Whether `config` holds the CIFAR-100 classes and superclasses (the default tables)."""
    return [config.id2label[i] for i in range(config.num_labels)] == CIFAR100_FINE_LABELS and list(
        config.fine_to_coarse
    ) == CIFAR100_FINE_TO_COARSE


def data_title(config: PretrainedConfig, dataset_name: str | None) -> str:
    """How the card names the data: CIFAR-100, or the Hub id or folder name of another dataset."""
    if is_cifar100(config):
        return "CIFAR-100"
    return os.path.basename(os.path.normpath(dataset_name)) if dataset_name else "a two-level dataset"


def _read_json(path: str | os.PathLike) -> dict:
    """The JSON object in `path`, or `{}` when the file is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def training_setup(options: dict[str, Any], config: PretrainedConfig, epochs: float | None) -> dict[str, Any]:
    """The rows of the card's training-setup table from the run's options (a `TrainingArguments` dict)."""
    return {
        "image size": config.image_size,
        "epochs trained": "unknown" if epochs is None else round(float(epochs), 2),
        "batch size (per device)": options.get("per_device_train_batch_size"),
        "lr_conv / lr_fc": f"{options.get('lr_conv')} / {options.get('lr_fc')}",
        "weight decay": options.get("weight_decay"),
        "scheduler": f"{options.get('lr_scheduler_type')}, warmup {options.get('warmup_steps')}",
        "frozen backbone stages": config.num_frozen_stages,
        "label smoothing": config.label_smoothing,
        "coarse loss weight": config.coarse_loss_weight,
        "backbone initialisation": config.backbone_weights,
        "seed": options.get("seed"),
    }


def eval_results(results: dict[str, float], dataset_name: str | None, config: PretrainedConfig) -> list[EvalResult]:
    """`model-index` entries for every metric in `results` (`eval_*` on the validation split, `test_*` on test)."""
    hub = is_hub_dataset(dataset_name)
    title = data_title(config, dataset_name)
    local_type = "cifar100-local" if title == "CIFAR-100" else re.sub(r"[^\w.-]+", "-", title).strip("-") or "local"
    entries = []
    for prefix, split in SPLITS.items():
        for key, (metric_type, metric_name) in METRICS.items():
            if f"{prefix}_{key}" in results:
                entries.append(
                    EvalResult(
                        task_type="image-classification",
                        task_name="Hierarchical image classification",
                        dataset_type=dataset_name if hub else local_type,
                        dataset_name=title if hub else f"{title} (local copy)",
                        dataset_split=split,
                        metric_type=metric_type,
                        metric_name=f"{metric_name.format(fine=config.num_labels, coarse=config.num_coarse_labels)}, {split}",
                        metric_value=round(float(results[f"{prefix}_{key}"]), 4),
                    )
                )
    return entries


def build_model_card(
    output_dir: str,
    config: PretrainedConfig,
    training_args: TrainingArguments,
    dataset_name: str | None,
    trained_epochs: float | None = None,
    source_model: str | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """The card of the model in `output_dir`, with the metrics of its `all_results.json`.

    Args:
        output_dir (`str`): the run's output folder (the model, `all_results.json`, figures).
        config (`PretrainedConfig`): the model's config.
        training_args (`TrainingArguments`): the run's options.
        dataset_name (`str`, *optional*): `--dataset_name`; named in the metadata only when it is a Hub id.
        trained_epochs (`float`, *optional*): epochs this run trained (the Trainer's `state.epoch`); `None` when
            the run only evaluated `source_model`.
        source_model (`str`, *optional*): the `--model_name_or_path` the run started from.
        repo_id (`str`, *optional*): the Hub repository the card goes to; the snippet loads it, else the folder.
    """
    results = _read_json(os.path.join(output_dir, "all_results.json"))
    model_path = repo_id or os.path.abspath(output_dir)
    data = card_data(results, config, dataset_name, source_model, model_path)
    options = training_args.to_dict()  # enum options as their values
    epochs, source_options = trained_epochs, {}
    if trained_epochs is None and source_model and os.path.isdir(source_model):  # the setup of the run that trained it
        source_options = _read_json(os.path.join(source_model, OPTIONS_FILE))
        epochs = _read_json(os.path.join(source_model, "trainer_state.json")).get("epoch")
    title = data_title(config, dataset_name)
    introduction = _introduction(config, dataset_name, title, trained_epochs is None, source_model, source_options)
    setup = training_setup(source_options or options, config, epochs)
    sections = [
        f"# Hierarchical EfficientNetV2-S for {title}\n\n{introduction}",
        _results_section(results, output_dir),
        _usage_section(model_path),
        f"## Training setup\n\n{_table(('option', 'value'), list(setup.items()))}\n",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections))


def card_data(
    results: dict[str, float],
    config: PretrainedConfig,
    dataset_name: str | None,
    source_model: str | None,
    model_path: str,
) -> ModelCardData:
    """The card's YAML metadata: library, task, tags, the Hub dataset and base model, and the `model-index`."""
    return ModelCardData(
        model_name=os.path.basename(model_path.rstrip("/")),
        library_name="transformers",
        pipeline_tag="image-classification",
        datasets=[dataset_name] if is_hub_dataset(dataset_name) else None,
        base_model=source_model if source_model and not os.path.isdir(source_model) else None,
        metrics=["accuracy"],
        tags=["image-classification", "hierarchical-classification", "efficientnet_v2", "custom_code"],
        eval_results=eval_results(results, dataset_name, config) or None,
    )


def _introduction(
    config: PretrainedConfig,
    dataset_name: str | None,
    title: str,
    evaluated_only: bool,
    source_model: str | None,
    source_options: dict[str, Any],
) -> str:
    """The paragraph under the title: the heads, where the model comes from and, for data other than CIFAR-100,
    its superclasses with their number of classes."""
    if is_hub_dataset(dataset_name):
        data_text = f"`{dataset_name}` from the Hugging Face Hub"
    else:
        data_text = "a local copy of CIFAR-100" if title == "CIFAR-100" else f"the local dataset `{title}`"
    if evaluated_only:
        origin = f"This run evaluated `{source_model}` on {data_text}; it did not train the model." + (
            " The training setup below is that of the run that trained it."
            if source_options
            else " The loaded folder does not record how it was trained: the setup below lists this run's options."
        )
    else:
        origin = f"Trained on {data_text} with `run_classification.py`" + (
            f", starting from `{source_model}`." if source_model else "."
        )
    if title == "CIFAR-100":
        heads = "a coarse head for the 20 CIFAR-100 superclasses and a fine head for the\n100 classes"
    else:
        heads = (
            f"a coarse head for {config.num_coarse_labels} superclasses and a fine head for\n"
            f"{config.num_labels} classes"
        )
        origin += f"\n\nSuperclasses (number of classes): {_superclass_listing(config)}"
    return (
        f"EfficientNetV2-S (torchvision) with {heads} that sees the pooled features together with the coarse logits. "
        f"{origin}\n"
    )


def _superclass_listing(config: PretrainedConfig) -> str:
    """`name (number of classes)` for every superclass, cut after `MAX_SUPERCLASS_TEXT` characters."""
    sizes = [len(config.coarse_children(c)) for c in range(config.num_coarse_labels)]
    listing = ", ".join(f"{name} ({size})" for name, size in zip(config.coarse_label_names, sizes, strict=True))
    if len(listing) > MAX_SUPERCLASS_TEXT:
        listing = listing[:MAX_SUPERCLASS_TEXT].rsplit(", ", 1)[0] + ", ..."
    return listing


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """A Markdown table."""
    lines = [header, tuple("---" for _ in header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def _results_section(results: dict[str, float], output_dir: str) -> str:
    """Every metric on the validation and test splits (`-` where not measured), what the hierarchy metrics mean,
    and the figure of the accuracy per superclass when the run drew it."""
    rows = []
    for key in METRICS:
        values = [f"{results[f'{p}_{key}']:.4f}" if f"{p}_{key}" in results else "-" for p in SPLITS]
        rows.append((key, *values))
    figure, title = FIGURE_NAMES["superclass_accuracy"], FIGURE_TITLES["superclass_accuracy"]
    figure_line = f"\n![{title}]({figure})\n" if os.path.isfile(os.path.join(output_dir, figure)) else ""
    return f"""## Results

{_table(("metric", *SPLITS.values()), rows)}

`coarse_from_fine_accuracy`: the fine prediction mapped to its superclass; `consistency`: share of images whose
fine prediction lies in the predicted superclass; `mistake_severity`: mean tree distance of wrong fine predictions
(1 = right superclass, 2 = wrong superclass).
{figure_line}"""


def _usage_section(model_path: str) -> str:
    """A snippet that runs as written: the pipelines at both levels, and the model with its image processor."""
    return f"""## Usage

```python
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

classifier = pipeline("image-classification", model="{model_path}", trust_remote_code=True)
image = Image.new("RGB", (32, 32), (200, 30, 30))  # or Image.open("photo.png")
print(classifier(image, top_k=5))

# both levels, with a selective answer (the class, else the superclass, else "unknown") at 0.5 confidence
hierarchical = pipeline("hierarchical-image-classification", model="{model_path}", trust_remote_code=True)
print(hierarchical(image, min_confidence=0.5))

model = AutoModelForImageClassification.from_pretrained("{model_path}", trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained("{model_path}")
prediction = model.predict_hierarchical(processor(image, return_tensors="pt")["pixel_values"])
print(prediction.coarse_labels, prediction.fine_labels)  # the most probable superclass and class

```
"""


def write_model_card(output_dir: str, *args: Any, **kwargs: Any) -> Path:
    """Write [`build_model_card`] as `README.md` in `output_dir` and return its path."""
    path = Path(output_dir, "README.md")
    build_model_card(output_dir, *args, **kwargs).save(path)
    return path


__all__ = ["build_model_card", "write_model_card"]
