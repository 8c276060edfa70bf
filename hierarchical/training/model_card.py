"""The model card (`README.md`) that `run_classification.py` writes into its output folder and pushes to the Hub.

Built with `huggingface_hub.ModelCard`: YAML metadata (with `model-index` evaluation results, which the Hub shows
on the model page), the metrics at both levels of the hierarchy and the checkpoint they belong to, the stored
calibration (temperatures, selective threshold and its guarantee), a usage snippet that runs once the model is on
the Hub, the training setup and the framework versions. A run that only evaluated a saved model says so, and takes
the training setup from that folder. The card never holds a path of this machine.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PretrainedConfig, TrainingArguments

from hierarchical.data.arguments import EVALUATION_SPLITS
from hierarchical.data.cifar100 import is_cifar100_config
from hierarchical.evaluation.report_markdown import (
    FIGURE_NAMES,
    FIGURE_TITLES,
    REPORT_NAME,
    markdown_cell,
    report_folder,
    table_row,
)
from hierarchical.evaluation.selective_threshold import guarantee_text
from hierarchical.hub import is_hub_dataset
from hierarchical.training.run_summary import OPTIONS_FILE

METRICS = {  # key in all_results.json -> (model-index metric type, readable name; {fine}/{coarse}: head sizes)
    "fine_accuracy": ("accuracy", "Class accuracy ({fine} classes, top-1)"),
    "fine_top5_accuracy": ("top_5_accuracy", "Class accuracy ({fine} classes, top-5)"),
    "coarse_accuracy": ("accuracy", "Superclass accuracy ({coarse} superclasses, coarse head)"),
    "coarse_from_fine_accuracy": ("accuracy", "Superclass accuracy of the class prediction"),
    "consistency": ("consistency", "Class prediction inside the predicted superclass"),
    "both_correct": ("accuracy", "Class and superclass both correct"),
    "mistake_severity": ("mistake_severity", "Mean tree distance of wrong class predictions"),
}
RESULT_SPLITS = dict(zip(("eval", "test"), EVALUATION_SPLITS, strict=True))  # results prefix -> split
MAX_SUPERCLASS_TEXT = 2000  # characters of the superclass list in the card's introduction
MODEL_ID_PLACEHOLDER = "your-name/your-model"  # the snippet's model id when the Hub repository is not known
FRAMEWORKS = ("torch", "torchvision", "transformers", "datasets")  # versions listed in the card
NEAR_CHANCE_FACTOR = 2.0  # a class accuracy below this many times chance is called near chance
LOCAL_DATA = "a local image folder"
GUARANTEE = "P(a threshold is chosen and it misses the target) <= 1 - confidence"


def data_title(config: PretrainedConfig, dataset_name: str | None) -> str:
    """How the card names the data: CIFAR-100, the Hub id of another dataset, or "a local image folder" (a local
    folder's name says nothing to a reader of the card)."""
    if is_cifar100_config(config):
        return "CIFAR-100"
    return dataset_name if is_hub_dataset(dataset_name) else LOCAL_DATA


def backbone_initialisation(backbone_weights: str | None) -> str:
    """How the backbone was initialised before training, in words (never a path)."""
    if backbone_weights is None or str(backbone_weights).lower() == "none":
        return "random"
    if str(backbone_weights).lower() == "imagenet":
        return "ImageNet (torchvision IMAGENET1K_V1)"
    return "a local torchvision state dict"


def framework_versions() -> dict[str, str]:
    """The installed versions of the frameworks the model runs on (`"not installed"` for a missing one)."""
    versions = {}
    for name in FRAMEWORKS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


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
        "backbone initialisation": backbone_initialisation(config.backbone_weights),
        "seed": options.get("seed"),
    }


def eval_results(results: dict[str, float], dataset_name: str | None, config: PretrainedConfig) -> list[EvalResult]:
    """`model-index` entries for every metric in `results` (`eval_*` on the validation split, `test_*` on test)."""
    hub = is_hub_dataset(dataset_name)
    title = data_title(config, dataset_name)
    local_type = "cifar100-local" if title == "CIFAR-100" else "local"
    entries = []
    for prefix, split in RESULT_SPLITS.items():
        for key, (metric_type, metric_name) in METRICS.items():
            if f"{prefix}_{key}" in results:
                entries.append(
                    EvalResult(
                        task_type="image-classification",
                        task_name="Hierarchical image classification",
                        dataset_type=dataset_name if hub else local_type,
                        dataset_name=title if hub or title == LOCAL_DATA else f"{title} (local copy)",
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
        repo_id (`str`, *optional*): the Hub repository of the model (`--hub_model_id`); the snippet loads it,
            else a placeholder that the card asks to replace.
    """
    results = _read_json(os.path.join(output_dir, "all_results.json"))
    data = card_data(results, config, dataset_name, source_model, repo_id)
    options = training_args.to_dict()  # enum options as their values
    source_options = {}
    state = _read_json(os.path.join(output_dir, "trainer_state.json"))
    if trained_epochs is None and source_model and os.path.isdir(source_model):  # the setup of the run that trained it
        source_options = _read_json(os.path.join(source_model, OPTIONS_FILE))
        state = _read_json(os.path.join(source_model, "trainer_state.json"))
    epochs = trained_epochs if trained_epochs is not None else state.get("epoch")
    title = data_title(config, dataset_name)
    introduction = _introduction(config, dataset_name, title, trained_epochs is None, source_model, source_options)
    setup = training_setup(source_options or options, config, epochs)
    heading = (
        f"for {title}"
        if title != LOCAL_DATA
        else f"({config.num_labels} classes in {config.num_coarse_labels} superclasses)"
    )
    sections = [
        f"# Hierarchical EfficientNetV2-S {heading}\n\n{introduction}",
        _results_section(results, output_dir, config, _weights_text(state, source_options or options)),
        calibration_section(config, results),
        _usage_section(repo_id, config.selective_threshold),
        f"## Training setup\n\n{_table(('option', 'value'), list(setup.items()))}\n",
        "## Framework versions\n\n"
        + "".join(f"- {name} {version}\n" for name, version in framework_versions().items()),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections))


def card_data(
    results: dict[str, float],
    config: PretrainedConfig,
    dataset_name: str | None,
    source_model: str | None,
    repo_id: str | None = None,
) -> ModelCardData:
    """The card's YAML metadata: library, task, tags, the Hub dataset and base model, and the `model-index`."""
    return ModelCardData(
        model_name=repo_id.rstrip("/").rsplit("/", 1)[-1] if repo_id else "hierarchical-efficientnetv2-s",
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
        data_text = "a local copy of CIFAR-100" if title == "CIFAR-100" else LOCAL_DATA
    if evaluated_only:
        model = f"`{source_model}`" if source_model and not os.path.isdir(source_model) else "a saved model"
        origin = f"This run evaluated {model} on {data_text}; it did not train the model." + (
            " The training setup below is that of the run that trained it."
            if source_options
            else " The loaded folder does not record how it was trained: the setup below lists this run's options."
        )
    else:
        origin = f"Trained on {data_text} with `run_classification.py`" + (
            f", starting from `{source_model}`." if source_model and not os.path.isdir(source_model) else "."
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
    listing = ", ".join(
        f"{markdown_cell(name)} ({size})" for name, size in zip(config.coarse_label_names, sizes, strict=True)
    )
    if len(listing) > MAX_SUPERCLASS_TEXT:
        listing = listing[:MAX_SUPERCLASS_TEXT].rsplit(", ", 1)[0] + ", ..."
    return listing


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """A Markdown table."""
    return "\n".join(
        [table_row(*header), "| " + " | ".join("---" for _ in header) + " |", *(table_row(*row) for row in rows)]
    )


def _results_section(results: dict[str, float], output_dir: str, config: PretrainedConfig, weights_text: str) -> str:
    """Which weights were measured, every metric on the validation and test splits (`-` where not measured), what
    the hierarchy metrics mean, a warning when the class accuracy is near chance, links to the evaluation reports
    and the validation report's figure of the accuracy per superclass."""
    rows = []
    for key in METRICS:
        values = [f"{results[f'{p}_{key}']:.4f}" if f"{p}_{key}" in results else "-" for p in RESULT_SPLITS]
        rows.append((key, *values))
    links, figure_line = [], ""
    for split in RESULT_SPLITS.values():
        folder = report_folder(output_dir, split)
        relative = os.path.relpath(folder, output_dir).replace(os.sep, "/")
        if os.path.isfile(os.path.join(folder, REPORT_NAME)):
            links.append(f"[{split} report]({relative}/{REPORT_NAME})")
        figure = os.path.join(folder, FIGURE_NAMES["superclass_accuracy"])
        if split == "validation" and os.path.isfile(figure):
            title = FIGURE_TITLES["superclass_accuracy"]
            figure_line = (
                f"\n{title}, validation split:\n\n![{title}]({relative}/{FIGURE_NAMES['superclass_accuracy']})\n"
            )
    reports = f"\nThe evaluation reports, with tables per class and the figures: {', '.join(links)}.\n" if links else ""
    return f"""## Results

{weights_text}{near_chance_text(results, config)}

{_table(("metric", *RESULT_SPLITS.values()), rows)}

`coarse_from_fine_accuracy`: the fine prediction mapped to its superclass; `consistency`: share of images whose
fine prediction lies in the predicted superclass; `mistake_severity`: mean tree distance of wrong fine predictions
(1 = right superclass, 2 = wrong superclass).
{reports}{figure_line}"""


def near_chance_text(results: dict[str, float], config: PretrainedConfig) -> str:
    """A sentence saying that the model is near chance when its class accuracy (validation, else test) is below
    `NEAR_CHANCE_FACTOR` times chance; empty otherwise or without a measured accuracy."""
    split, accuracy = next(
        (
            (split, results[f"{p}_fine_accuracy"])
            for p, split in RESULT_SPLITS.items()
            if f"{p}_fine_accuracy" in results
        ),
        (None, None),
    )
    chance = 1 / config.num_labels
    if accuracy is None or accuracy >= NEAR_CHANCE_FACTOR * chance:
        return ""
    return (
        f"\n\n**This model is near chance**: its class accuracy on the {split} split, {accuracy:.2%}, is below "
        f"{NEAR_CHANCE_FACTOR:g} times the {chance:.2%} of guessing among {config.num_labels} classes. It has not "
        "learned the task; do not use its predictions."
    )


def _weights_text(state: dict[str, Any], options: dict[str, Any]) -> str:
    """Which weights the model holds, from the trainer state of the run that trained it: the best checkpoint (step,
    epoch and the metrics it was chosen with) or the weights at the end of training."""
    if not state.get("global_step"):
        return "The training run left no record of its steps: which checkpoint these weights are is not known."
    end = f"step {state['global_step']}, epoch {round(float(state.get('epoch') or 0), 2)}"
    best = state.get("best_model_checkpoint")
    if not (options.get("load_best_model_at_end") and best):
        return f"The weights are those at the end of training ({end})."
    step = state.get("best_global_step") or int(re.search(r"(\d+)$", best.rstrip("/")).group(1))
    logged = next((e for e in state.get("log_history", []) if e.get("step") == step and "eval_loss" in e), {})
    epoch = f", epoch {round(float(logged['epoch']), 2)}" if "epoch" in logged else ""
    shown = [k for k in ("eval_fine_accuracy", "eval_coarse_accuracy", "eval_loss") if k in logged]
    metrics = ", ".join(f"{k.removeprefix('eval_')} {logged[k]:.4f}" for k in shown)
    chosen_by = options.get("metric_for_best_model") or "loss"
    return (
        f"The weights are the best checkpoint of training, step {step}{epoch} (training ran to {end}), chosen by "
        f"validation {chosen_by}"
        + (f"; its validation metrics then: {metrics}." if metrics else ".")
        + " The results below measure these weights."
    )


def calibration_section(config: PretrainedConfig, results: dict[str, float]) -> str:
    """The stored temperatures and the selective threshold: its target, confidence and guarantee, or why the model
    stores none."""
    temperatures = (
        f"Temperatures (logits are divided by them before the softmax in `predict_hierarchical` and the "
        f"hierarchical pipeline): fine {config.fine_temperature:.3f}, coarse {config.coarse_temperature:.3f}"
    )
    if config.fine_temperature == 1.0 and config.coarse_temperature == 1.0:
        temperatures += " (1 = not calibrated: train with `--do_eval --calibrate` to fit them)."
    else:
        samples = results.get("eval_calibration_samples")
        temperatures += f", fitted on {int(samples)} validation images." if samples else "."
        temperatures += (
            " A temperature never changes its head's own argmax, but it changes how the two heads weigh against each "
            "other, so it can change the class and superclass these return."
        )
    threshold = config.selective_threshold
    if threshold is not None and config.selective_target_accuracy is not None:
        confidence = config.selective_confidence
        selective = (
            f"Selective threshold {threshold:.3f} (the default `min_confidence` of the hierarchical pipeline): the "
            "class when its probability reaches it, else the superclass, else *unknown*. It was chosen on validation "
            f"images for a target accuracy of {config.selective_target_accuracy:g} at confidence {confidence:g}: "
            f"{guarantee_text(config.selective_target_accuracy, confidence)}. In symbols, {GUARANTEE} = "
            f"{1 - confidence:.3g}, over the draw of the calibration images, for new images of the same distribution."
        )
    elif threshold is not None:
        selective = (
            f"Selective threshold {threshold:.3f}, stored without the target accuracy it was chosen for: no guarantee."
        )
    elif "eval_selective_target_accuracy" in results:
        selective = (
            f"No selective threshold: none reached an accuracy of {results['eval_selective_target_accuracy']:g} with "
            f"confidence {results.get('eval_selective_confidence', float('nan')):g} on the calibration images, so "
            "there is no guarantee to give; pass `min_confidence` yourself for selective answers."
        )
    else:
        selective = (
            "No selective threshold: none was chosen (train with `--selective_target_accuracy`), so there is no "
            "guarantee to give; pass `min_confidence` yourself for selective answers."
        )
    return f"## Calibration and selective answers\n\n{temperatures}\n\n{selective}\n"


def _usage_section(repo_id: str | None, threshold: float | None) -> str:
    """A snippet that runs once the model is on the Hub: the pipelines at both levels, and the model with its image
    processor. Without a known repository it loads a placeholder id that the text asks to replace."""
    model_id = repo_id or MODEL_ID_PLACEHOLDER
    replace = (
        ""
        if repo_id
        else f"Replace `{MODEL_ID_PLACEHOLDER}` with the Hub id of this model once uploaded (or with the path of "
        "a local copy of its folder).\n"
    )
    if threshold is not None:
        selective = f"# the stored threshold {threshold:.3f} is its default min_confidence\nprint(hierarchical(image))"
    else:
        selective = "# this model stores no threshold: choose a min_confidence for selective answers\nprint(hierarchical(image))"
    return f"""## Usage

{replace}
```python
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

model_id = "{model_id}"
classifier = pipeline("image-classification", model=model_id, trust_remote_code=True)
image = Image.new("RGB", (32, 32), (200, 30, 30))  # or Image.open("photo.png")
print(classifier(image, top_k=5))

# both levels, with a selective answer: the class, else the superclass, else "unknown"
hierarchical = pipeline("hierarchical-image-classification", model=model_id, trust_remote_code=True)
{selective}

model = AutoModelForImageClassification.from_pretrained(model_id, trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained(model_id, trust_remote_code=True)
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
