#!/usr/bin/env python
"""Evaluation report of the hierarchical classifier: metrics at both levels, accuracy per superclass and class,
confusions, calibration and selective answers.

`write_eval_report` turns predictions into `eval_report.md` and PNG figures; `evaluate_saved_model` runs a saved
model on a dataset split and writes that report:

    python eval_report.py outputs/run --dataset_name cifar100-local --split validation

`cifar100-local` is a local copy of CIFAR-100 (`python data_utils.py download cifar100-local`); a Hub id works too.

The figures need matplotlib (optional): without it the markdown report is still written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from transformers import HfArgumentParser
from transformers.trainer_utils import PredictionOutput
from transformers.utils import logging

from calibration import evaluate_calibration, hierarchical_scores
from configuration_hierarchical import HierarchicalEfficientNetV2Config
from data_utils import DataArguments, HierarchicalCollator, ImageTransform, build_eval_transform, prepare_datasets
from hierarchy_metrics import ECE_BINS, compute_hierarchy_metrics, reliability_bins, selective_curve
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification

logger = logging.get_logger(__name__)

REPORT_NAME = "eval_report.md"
FIGURE_NAMES = {
    "superclass_accuracy": "superclass_accuracy.png",
    "superclass_confusion": "superclass_confusion.png",
    "confused_pairs": "confused_pairs.png",
    "misclassified": "misclassified.png",
    "reliability": "reliability.png",
    "risk_coverage": "risk_coverage.png",
}
CURVE_THRESHOLDS = np.linspace(0.0, 1.0, 201)  # the x axis of the risk-coverage figure
MIN_ANSWERS_PLOTTED = 20  # the accuracy curve is drawn where at least this many images are answered
TOP_CONFUSED_PAIRS = 15
MAX_CONFUSION_SUPERCLASSES = 20  # above this, the matrix figure shows the largest superclasses, the text the top pairs
MAX_BAR_SUPERCLASSES = 40  # above this, the accuracy figure shows the largest superclasses
MAX_LABEL_CHARS = 28  # longer names are cut in figures
MAX_MISCLASSIFIED = 16
DPI = 110
MATPLOTLIB_HINT = "`pip install matplotlib`"


# ----------------------------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ReportData:
    """Everything the report shows, computed once from the predictions.

    Args:
        metrics (`dict[str, float]`): hierarchy metrics (`compute_hierarchy_metrics`, or the given ones).
        extra_metrics (`dict[str, float]`): other given metrics (loss, runtime, ...).
        fine_predictions (`np.ndarray` of shape `(n,)`): argmax of the fine logits.
        coarse_predictions (`np.ndarray` of shape `(n,)`): argmax of the coarse logits (the coarse head).
        fine_confidence (`np.ndarray` of shape `(n,)`): softmax probability of the fine prediction.
        superclass_samples, superclass_fine_accuracy, superclass_coarse_accuracy (`np.ndarray` of shape `(num_coarse,)`):
            per true superclass: number of samples, fine accuracy and coarse-head accuracy (NaN without samples).
        confusion (`np.ndarray` of shape `(num_coarse, num_coarse)`): rows true superclass, columns coarse prediction.
        confused_pairs (`list[tuple[int, int, int]]`): `(true fine, predicted fine, count)`, most frequent first.
        calibration (`dict[str, float]`): [`calibration.evaluate_calibration`] with the config's temperatures and
            selective threshold.
        reliability (`dict[str, dict[str, dict[str, np.ndarray]]]`): [`hierarchy_metrics.reliability_bins`] per level
            (`"fine"`, `"coarse"`) and per state (`"uncalibrated"`, `"calibrated"`).
        curve (`dict[str, np.ndarray]`): [`hierarchy_metrics.selective_curve`] at `thresholds` (calibrated scores).
        class_samples, class_accuracy (`np.ndarray` of shape `(num_labels,)`): per true class: number of samples
            (the class's support) and fine accuracy (NaN without samples).
    """

    metrics: dict[str, float]
    extra_metrics: dict[str, float]
    fine_predictions: np.ndarray
    coarse_predictions: np.ndarray
    fine_confidence: np.ndarray
    superclass_samples: np.ndarray
    superclass_fine_accuracy: np.ndarray
    superclass_coarse_accuracy: np.ndarray
    confusion: np.ndarray
    confused_pairs: list[tuple[int, int, int]]
    class_samples: np.ndarray
    class_accuracy: np.ndarray
    calibration: dict[str, float] = dataclasses.field(default_factory=dict)
    reliability: dict[str, dict[str, dict[str, np.ndarray]]] = dataclasses.field(default_factory=dict)
    curve: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def compute_report_data(
    logits: np.ndarray,
    coarse_logits: np.ndarray,
    labels: np.ndarray,
    coarse_labels: np.ndarray,
    config: HierarchicalEfficientNetV2Config,
    split: str = "test",
    metrics: dict[str, float] | None = None,
) -> ReportData:
    """Check the shapes of the predictions and compute every table of the report."""
    logits, coarse_logits = np.asarray(logits, dtype=np.float64), np.asarray(coarse_logits, dtype=np.float64)
    labels, coarse_labels = np.asarray(labels).astype(np.int64), np.asarray(coarse_labels).astype(np.int64)
    num_fine, num_coarse = config.num_labels, config.num_coarse_labels
    num_samples = len(labels)
    expected = {
        "logits": (logits, (num_samples, num_fine)),
        "coarse_logits": (coarse_logits, (num_samples, num_coarse)),
        "coarse_labels": (coarse_labels, (num_samples,)),
    }
    if num_samples == 0 or labels.ndim != 1:
        raise ValueError(f"labels must be a non-empty (n,) array of class ids, got shape {labels.shape}")
    for name, (array, shape) in expected.items():
        if array.shape != shape:
            raise ValueError(f"{name} must have shape {shape} (n = len(labels)), got {array.shape}")
    if labels.min() < 0 or labels.max() >= num_fine or coarse_labels.min() < 0 or coarse_labels.max() >= num_coarse:
        raise ValueError(f"labels must lie in [0, {num_fine}) and coarse_labels in [0, {num_coarse})")

    computed = compute_hierarchy_metrics(logits, coarse_logits, labels, coarse_labels, config.fine_to_coarse)
    given = _strip_prefixes(metrics or {}, split)
    for name, value in computed.items():
        if name in given and not np.isclose(given[name], value, rtol=0, atol=1e-6):
            logger.warning(f"{name} = {given[name]} in the given metrics but {value} from the predictions")
    hierarchy = {name: given.get(name, float(value)) for name, value in computed.items()}
    calibration = evaluate_calibration(logits, coarse_logits, labels, coarse_labels, config)
    extra = {name: value for name, value in given.items() if name not in computed and name not in calibration}
    reliability: dict[str, dict[str, dict[str, np.ndarray]]] = {"fine": {}, "coarse": {}}
    for state in ("uncalibrated", "calibrated"):
        scores = hierarchical_scores(logits, coarse_logits, labels, coarse_labels, config, state == "calibrated")
        reliability["fine"][state] = reliability_bins(scores.fine_confidence, scores.fine_correct, ECE_BINS)
        reliability["coarse"][state] = reliability_bins(scores.coarse_confidence, scores.coarse_correct, ECE_BINS)
    curve = selective_curve(
        scores.fine_confidence, scores.fine_correct, scores.coarse_confidence, scores.coarse_correct, CURVE_THRESHOLDS
    )
    curve["thresholds"] = CURVE_THRESHOLDS

    fine_predictions, coarse_predictions = logits.argmax(1), coarse_logits.argmax(1)
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    fine_confidence = shifted.max(1) / shifted.sum(1)
    samples = np.bincount(coarse_labels, minlength=num_coarse)
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN for superclasses without samples
        fine_accuracy = np.bincount(coarse_labels, fine_predictions == labels, num_coarse) / samples
        coarse_accuracy = np.bincount(coarse_labels, coarse_predictions == coarse_labels, num_coarse) / samples
        class_samples = np.bincount(labels, minlength=num_fine)
        class_accuracy = np.bincount(labels, fine_predictions == labels, num_fine) / class_samples
    confusion = np.zeros((num_coarse, num_coarse), dtype=np.int64)
    np.add.at(confusion, (coarse_labels, coarse_predictions), 1)
    wrong = fine_predictions != labels
    pair_counts = np.zeros((num_fine, num_fine), dtype=np.int64)
    np.add.at(pair_counts, (labels[wrong], fine_predictions[wrong]), 1)
    order = np.argsort(-pair_counts, axis=None, kind="stable")[:TOP_CONFUSED_PAIRS]
    pairs = [
        (int(t), int(p), int(pair_counts[t, p]))
        for t, p in zip(*np.unravel_index(order, pair_counts.shape), strict=True)
    ]
    return ReportData(
        metrics=hierarchy,
        extra_metrics=extra,
        fine_predictions=fine_predictions,
        coarse_predictions=coarse_predictions,
        fine_confidence=fine_confidence,
        superclass_samples=samples,
        superclass_fine_accuracy=fine_accuracy,
        superclass_coarse_accuracy=coarse_accuracy,
        confusion=confusion,
        confused_pairs=[pair for pair in pairs if pair[2] > 0],
        class_samples=class_samples,
        class_accuracy=class_accuracy,
        calibration=calibration,
        reliability=reliability,
        curve=curve,
    )


def _strip_prefixes(metrics: dict[str, Any], split: str) -> dict[str, float]:
    """Numeric entries of `metrics` with a `<split>_`, `eval_` or `test_` prefix removed (Trainer metric keys)."""
    prefixes = tuple(dict.fromkeys((f"{split}_", "eval_", "test_")))
    stripped = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            name = next((key.removeprefix(prefix) for prefix in prefixes if key.startswith(prefix)), key)
            stripped[name] = float(value)
    return stripped


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


def _format(value: float) -> str:
    """4 decimals; `-` for NaN."""
    return "-" if np.isnan(value) else f"{value:.4f}"


def render_markdown(
    data: ReportData, config: HierarchicalEfficientNetV2Config, split: str, figures: dict[str, str], note: str = ""
) -> str:
    """The text of `eval_report.md`; `figures` maps figure keys to file names relative to the report."""
    fine_names, coarse_names = config.id2label, config.coarse_label_names
    lines = [
        f"# Evaluation report: {split} split",
        "",
        f"{int(data.metrics['num_samples'])} images, {config.num_labels} classes in {config.num_coarse_labels} "
        "superclasses. *fine*: argmax of the fine head; *coarse*: argmax of the coarse head.",
        "",
        "## Hierarchy metrics",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for name, value in data.metrics.items():
        lines.append(f"| {name} | {int(value) if name == 'num_samples' else _format(value)} |")
    lines += [
        "",
        "`coarse_from_fine_accuracy`: the fine prediction mapped to its superclass; `consistency`: share of images "
        "whose fine prediction lies in the predicted superclass; `mistake_severity`: mean tree distance of the wrong "
        "fine predictions (1 = right superclass, 2 = wrong superclass).",
    ]
    if data.extra_metrics:
        lines += ["", "| other metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {_format(value)} |" for name, value in data.extra_metrics.items()]

    lines += ["", "## Figures", ""]
    if note:
        lines.append(note)
    titles = {
        "superclass_accuracy": "Accuracy per superclass",
        "superclass_confusion": "Superclass confusion matrix",
        "confused_pairs": "Most confused classes",
        "misclassified": "Misclassified images",
        "reliability": "Reliability diagrams",
        "risk_coverage": "Hierarchical risk-coverage",
    }
    lines += [f"- [{titles[key]}]({name})" for key, name in figures.items()]
    if "superclass_accuracy" in figures:
        lines += ["", f"![Accuracy per superclass]({figures['superclass_accuracy']})"]
    lines += render_calibration_section(data.calibration, config, figures)

    lines += [
        "",
        "## Accuracy per superclass",
        "",
        "| # | superclass | images | fine accuracy | coarse accuracy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for index, name in enumerate(coarse_names):
        lines.append(
            f"| {index} | {name} | {data.superclass_samples[index]} | "
            f"{_format(data.superclass_fine_accuracy[index])} | {_format(data.superclass_coarse_accuracy[index])} |"
        )

    if len(coarse_names) <= MAX_CONFUSION_SUPERCLASSES:
        lines += [
            "",
            "## Superclass confusion matrix",
            "",
            "Rows: true superclass; columns: superclass predicted by the coarse head (numbers as in the table above).",
            "",
            "| true \\ predicted | " + " | ".join(str(i) for i in range(len(coarse_names))) + " |",
            "| --- |" + " --- |" * len(coarse_names),
        ]
        for index, row in enumerate(data.confusion):
            lines.append(f"| {index} {coarse_names[index]} | " + " | ".join(str(count) for count in row) + " |")
    else:
        lines += ["", "## Most confused superclasses", "", *confused_superclass_lines(data, coarse_names)]

    lines += [
        "",
        "## Accuracy per class",
        "",
        f"Images per class (support): {class_support_summary(data.class_samples)}.",
        "",
        "| # | class | superclass | images | fine accuracy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for index in range(config.num_labels):
        lines.append(
            f"| {index} | {fine_names[index]} | {coarse_names[config.fine_to_coarse[index]]} | "
            f"{data.class_samples[index]} | {_format(data.class_accuracy[index])} |"
        )

    lines += ["", "## Most confused classes", ""]
    if data.confused_pairs:
        lines += ["| true class | predicted class | count | same superclass |", "| --- | --- | --- | --- |"]
        for true, predicted, count in data.confused_pairs:
            same = "yes" if config.fine_to_coarse[true] == config.fine_to_coarse[predicted] else "no"
            lines.append(f"| {fine_names[true]} | {fine_names[predicted]} | {count} | {same} |")
    else:
        lines.append("No fine-class mistakes.")
    return "\n".join(lines) + "\n"


def render_calibration_section(
    calibration: dict[str, float], config: HierarchicalEfficientNetV2Config, figures: dict[str, str]
) -> list[str]:
    """Markdown lines of the calibration and selective-prediction section."""
    c = calibration
    lines = [
        "",
        "## Calibration and selective prediction",
        "",
        f"Scores of the consistent distribution (what `predict_hierarchical` and the hierarchical pipeline return), "
        f"with the temperatures of the model's config: fine {config.fine_temperature:.3f}, coarse "
        f"{config.coarse_temperature:.3f} (1 = not calibrated). Expected calibration error with {ECE_BINS} bins.",
        "",
        "| level | ECE before | ECE after | NLL before | NLL after | Brier before | Brier after |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level in ("fine", "coarse"):
        cells = [
            f"{_format(c[f'{level}_{name}_uncalibrated'])} | {_format(c[f'{level}_{name}'])}"
            for name in ("ece", "nll", "brier")
        ]
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    lines += [""]
    threshold = config.selective_threshold
    if threshold is None:
        lines.append("The model stores no selective threshold (`selective_threshold`).")
    else:
        target = config.selective_target_accuracy
        chosen = (
            f", chosen for an accuracy of at least {target:g} on new data with confidence {config.selective_confidence:g}"
            if target is not None
            else ""
        )
        accuracy = _format(c["selective_accuracy"]) if "selective_accuracy" in c else "- (nothing answered)"
        lines += [
            f"Selective answers at `min_confidence` {threshold:g}{chosen}: the class when its probability reaches it, "
            "else the superclass, else *unknown*.",
            "",
            "| answered with the class | answered with the superclass | unknown | accuracy of the answers |",
            "| --- | --- | --- | --- |",
            f"| {_format(c['selective_fine_coverage'])} | {_format(c['selective_coarse_coverage'])} | "
            f"{_format(c['selective_abstention_rate'])} | {accuracy} |",
        ]
    lines += [
        "",
        f"Area under the hierarchical risk-coverage curve (error rate of the answers over the share answered, "
        f"lower is better): {_format(c['selective_haurc'])}.",
        "",
        "Superclass accuracy, read four ways:",
        "",
        "| superclass from | accuracy |",
        "| --- | --- |",
        f"| the coarse head (argmax) | {_format(c['coarse_head_accuracy'])} |",
        f"| the fine head's probabilities summed per superclass | {_format(c['coarse_summed_fine_accuracy'])} |",
        f"| the consistent prediction (parent of the predicted class) | {_format(c['coarse_consistent_accuracy'])} |",
        f"| the most probable superclass of the consistent distribution | {_format(c['coarse_combined_accuracy'])} |",
        "",
        f"Class accuracy of the consistent prediction: {_format(c['fine_consistent_accuracy'])}.",
    ]
    for key, title in (("reliability", "Reliability diagrams"), ("risk_coverage", "Hierarchical risk-coverage")):
        if key in figures:
            lines += ["", f"![{title}]({figures[key]})"]
    return lines


def confused_superclass_lines(data: ReportData, coarse_names: list[str]) -> list[str]:
    """A markdown table of the most frequent (true superclass -> coarse-head superclass) mistakes: the readable
    form of a confusion matrix too large to print."""
    off_diagonal = data.confusion.copy()
    np.fill_diagonal(off_diagonal, 0)
    order = np.argsort(-off_diagonal, axis=None, kind="stable")[:TOP_CONFUSED_PAIRS]
    rows = [(int(t), int(p)) for t, p in zip(*np.unravel_index(order, off_diagonal.shape), strict=True)]
    rows = [(t, p) for t, p in rows if off_diagonal[t, p] > 0]
    if not rows:
        return ["No superclass mistakes."]
    lines = [
        "| true superclass | predicted superclass | count | share of the true superclass |",
        "| --- | --- | --- | --- |",
    ]
    for true, predicted in rows:
        count = off_diagonal[true, predicted]
        share = count / max(data.superclass_samples[true], 1)
        lines.append(f"| {coarse_names[true]} | {coarse_names[predicted]} | {count} | {share:.4f} |")
    return lines


def class_support_summary(samples: np.ndarray) -> str:
    """`min a, median b, max c` images per class, and how many classes have none."""
    text = f"min {samples.min()}, median {np.median(samples):g}, max {samples.max()}"
    empty = int((samples == 0).sum())
    return text + (f"; {empty} classes have no images in this split" if empty else "")


def _short(name: str) -> str:
    """`name` cut to `MAX_LABEL_CHARS` characters for figure labels."""
    return name if len(name) <= MAX_LABEL_CHARS else name[: MAX_LABEL_CHARS - 1] + "…"


def largest_superclasses(data: ReportData, limit: int) -> np.ndarray:
    """Indices of all superclasses when there are at most `limit`, else of the `limit` with the most samples
    (in index order)."""
    if len(data.superclass_samples) <= limit:
        return np.arange(len(data.superclass_samples))
    return np.sort(np.argsort(-data.superclass_samples, kind="stable")[:limit])


# ----------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------


def _load_matplotlib() -> Any | None:
    """`matplotlib.figure.Figure` with the Agg canvas, or None when matplotlib is not installed.

    Figures are built with the object-oriented API (no pyplot), so the global backend of a notebook is untouched.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None

    def new_figure(**kwargs) -> Figure:
        figure = Figure(**kwargs)
        FigureCanvasAgg(figure)
        return figure

    return new_figure


def _save(figure: Any, path: str) -> str:
    with warnings.catch_warnings():  # a label character the font lacks (an emoji) is drawn as a box
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        figure.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def plot_superclass_accuracy(
    new_figure: Any, data: ReportData, config: HierarchicalEfficientNetV2Config, path: str
) -> str:
    """Horizontal bars per superclass (the `MAX_BAR_SUPERCLASSES` largest when there are more): fine and coarse
    accuracy side by side."""
    shown = largest_superclasses(data, MAX_BAR_SUPERCLASSES)
    figure = new_figure(figsize=(8, 1.0 + 0.34 * len(shown)))
    axes = figure.add_subplot()
    positions = np.arange(len(shown))
    height = 0.4
    fine_accuracy, coarse_accuracy = data.superclass_fine_accuracy[shown], data.superclass_coarse_accuracy[shown]
    axes.barh(positions - height / 2, np.nan_to_num(fine_accuracy), height, label="fine (class)")
    axes.barh(positions + height / 2, np.nan_to_num(coarse_accuracy), height, label="coarse (superclass)")
    axes.set_yticks(positions, [_short(config.coarse_label_names[i]) for i in shown], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("accuracy")
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    subset = (
        f"\n{len(shown)} largest of {config.num_coarse_labels} superclasses"
        if len(shown) < config.num_coarse_labels
        else ""
    )
    axes.set_title(
        f"Accuracy per superclass (fine {data.metrics['fine_accuracy']:.3f}, "
        f"coarse {data.metrics['coarse_accuracy']:.3f}, n = {int(data.metrics['num_samples'])}){subset}",
        fontsize=10,
    )
    return _save(figure, path)


def plot_superclass_confusion(
    new_figure: Any, data: ReportData, config: HierarchicalEfficientNetV2Config, path: str
) -> str:
    """Heatmap of the superclass confusion matrix, coloured by row share, annotated with counts. Above
    `MAX_CONFUSION_SUPERCLASSES` superclasses, the rows and columns of the largest ones (shares still of all the
    images of the row's superclass)."""
    shown = largest_superclasses(data, MAX_CONFUSION_SUPERCLASSES)
    names = [_short(config.coarse_label_names[i]) for i in shown]
    shares = data.confusion / np.maximum(data.confusion.sum(1, keepdims=True), 1)
    confusion, shares = data.confusion[np.ix_(shown, shown)], shares[np.ix_(shown, shown)]
    figure = new_figure(figsize=(9, 8))
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(names))
    axes.set_xticks(ticks, names, rotation=90, fontsize=7)
    axes.set_yticks(ticks, names, fontsize=7)
    axes.set_xlabel("predicted superclass (coarse head)")
    axes.set_ylabel("true superclass")
    for (row, column), count in np.ndenumerate(confusion):
        if count:
            color = "white" if shares[row, column] > 0.5 else "black"
            axes.text(column, row, str(count), ha="center", va="center", fontsize=6, color=color)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true superclass")
    title = "Superclass confusion matrix"
    if len(shown) < config.num_coarse_labels:
        title += f" ({len(shown)} largest of {config.num_coarse_labels} superclasses)"
    axes.set_title(title, fontsize=10)
    return _save(figure, path)


def plot_confused_pairs(new_figure: Any, data: ReportData, config: HierarchicalEfficientNetV2Config, path: str) -> str:
    """Horizontal bars of the most frequent (true class -> predicted class) mistakes."""
    from matplotlib.patches import Patch  # matplotlib is installed when this runs

    pairs = data.confused_pairs
    figure = new_figure(figsize=(8, 1.2 + 0.32 * max(len(pairs), 1)))
    axes = figure.add_subplot()
    if not pairs:
        axes.text(0.5, 0.5, "no fine-class mistakes", ha="center", va="center")
        axes.set_axis_off()
        return _save(figure, path)
    labels = [f"{_short(config.id2label[t])} -> {_short(config.id2label[p])}" for t, p, _ in pairs]
    same = [config.fine_to_coarse[t] == config.fine_to_coarse[p] for t, p, _ in pairs]
    colors = ["tab:blue" if s else "tab:orange" for s in same]
    axes.barh(np.arange(len(pairs)), [count for _, _, count in pairs], color=colors)
    axes.set_yticks(np.arange(len(pairs)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("images")
    axes.grid(axis="x", alpha=0.3)
    axes.xaxis.get_major_locator().set_params(integer=True)
    handles = [Patch(color="tab:blue", label="same superclass"), Patch(color="tab:orange", label="other superclass")]
    axes.legend(handles=handles, loc="lower right", fontsize=8)
    axes.set_title("Most confused classes (true -> predicted)", fontsize=10)
    return _save(figure, path)


def plot_misclassified(
    new_figure: Any,
    data: ReportData,
    labels: np.ndarray,
    coarse_labels: np.ndarray,
    images: Sequence[PIL.Image.Image] | Dataset,
    config: HierarchicalEfficientNetV2Config,
    path: str,
) -> str | None:
    """Grid of the most confident fine-class mistakes with true and predicted labels at both levels."""
    wrong = np.flatnonzero(data.fine_predictions != labels)
    if wrong.size == 0:
        return None
    rows = wrong[np.argsort(-data.fine_confidence[wrong], kind="stable")][:MAX_MISCLASSIFIED]
    pictures = _images_at(images, rows.tolist())
    columns = min(4, len(rows))
    grid_rows = -(-len(rows) // columns)
    figure = new_figure(figsize=(2.6 * columns, 2.9 * grid_rows))
    names, coarse_names = config.id2label, config.coarse_label_names
    for position, (row, picture) in enumerate(zip(rows, pictures, strict=True)):
        axes = figure.add_subplot(grid_rows, columns, position + 1)
        axes.imshow(np.asarray(picture.convert("RGB")), interpolation="nearest")
        axes.set_axis_off()
        fine, coarse = data.fine_predictions[row], data.coarse_predictions[row]
        axes.set_title(
            f"true: {_short(names[int(labels[row])])}\n{_short(coarse_names[int(coarse_labels[row])])}\n"
            f"pred: {_short(names[int(fine)])} ({data.fine_confidence[row]:.2f})\n{_short(coarse_names[int(coarse)])}",
            fontsize=7,
            color="tab:red" if coarse != coarse_labels[row] else "black",
        )
    figure.suptitle("Most confident mistakes (red: superclass wrong too)", fontsize=10)
    return _save(figure, path)


def plot_reliability(new_figure: Any, data: ReportData, config: HierarchicalEfficientNetV2Config, path: str) -> str:
    """Reliability diagram per level: accuracy against confidence in 15 bins, before and after temperature scaling,
    with the share of images per bin underneath."""
    figure = new_figure(figsize=(10, 5.2))
    grid = figure.add_gridspec(2, 2, height_ratios=(3, 1), hspace=0.08)
    width = 1.0 / ECE_BINS
    centres = (np.arange(ECE_BINS) + 0.5) * width
    for column, level in enumerate(("fine", "coarse")):
        axes = figure.add_subplot(grid[0, column])
        shares = figure.add_subplot(grid[1, column], sharex=axes)
        after, before = data.reliability[level]["calibrated"], data.reliability[level]["uncalibrated"]
        axes.bar(centres, np.nan_to_num(after["accuracy"]), width * 0.9, color="tab:blue", alpha=0.8,
                 label="accuracy, calibrated")  # fmt: skip
        filled = before["counts"] > 0
        axes.plot(before["confidence"][filled], before["accuracy"][filled], "o-", color="tab:gray", markersize=3,
                  label="accuracy, uncalibrated")  # fmt: skip
        axes.plot([0, 1], [0, 1], "--", color="black", linewidth=1, label="perfect calibration")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
        axes.tick_params(labelbottom=False)
        c = data.calibration
        axes.set_title(
            f"{'class' if level == 'fine' else 'superclass'}: ECE {c[f'{level}_ece_uncalibrated']:.3f} -> "
            f"{c[f'{level}_ece']:.3f} (head T = {getattr(config, f'{level}_temperature'):.2f})",
            fontsize=10,
        )
        if column == 0:
            axes.set_ylabel("accuracy")
            axes.legend(loc="upper left", fontsize=8)
        total = max(int(after["counts"].sum()), 1)
        shares.bar(centres, after["counts"] / total, width * 0.9, color="tab:blue", alpha=0.8)
        shares.set_xlabel("confidence (probability of the prediction)")
        shares.grid(alpha=0.3)
        if column == 0:
            shares.set_ylabel("share of images")
    figure.suptitle(f"Reliability (n = {int(data.metrics['num_samples'])}, {ECE_BINS} bins)", fontsize=11)
    return _save(figure, path)


def plot_risk_coverage(new_figure: Any, data: ReportData, config: HierarchicalEfficientNetV2Config, path: str) -> str:
    """What the selective rule answers at each threshold: stacked shares of images answered with the class, with
    the superclass, and not at all, and the accuracy of the answers; the stored threshold marked."""
    curve, c = data.curve, data.calibration
    thresholds, n = curve["thresholds"], curve["num_samples"].astype(np.float64)
    figure = new_figure(figsize=(8, 4.6))
    axes = figure.add_subplot()
    fine, coarse = curve["fine"] / n, curve["coarse"] / n
    axes.stackplot(
        thresholds, fine, coarse, 1.0 - fine - coarse,
        labels=("answered: class", "answered: superclass", "unknown"),
        colors=("tab:blue", "tab:orange", "lightgray"), alpha=0.85,
    )  # fmt: skip
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = curve["correct"] / curve["answered"]
    accuracy[curve["answered"] < MIN_ANSWERS_PLOTTED] = np.nan  # a handful of answers gives a noisy rate
    axes.plot(thresholds, accuracy, color="black", linewidth=2,
              label=f"accuracy of the answers (>= {MIN_ANSWERS_PLOTTED})")  # fmt: skip
    if config.selective_target_accuracy is not None:
        axes.axhline(config.selective_target_accuracy, color="black", linestyle=":", linewidth=1,
                     label=f"target accuracy {config.selective_target_accuracy:g}")  # fmt: skip
    if config.selective_threshold is not None:
        threshold = config.selective_threshold
        axes.axvline(threshold, color="tab:red", linestyle="--", linewidth=1.5)
        text = (
            f"min_confidence {threshold:g} (red line)\nclass {c['selective_fine_coverage']:.0%}, "
            f"superclass {c['selective_coarse_coverage']:.0%}, unknown {c['selective_abstention_rate']:.0%}"
        )
        if "selective_accuracy" in c:
            text += f"\naccuracy {c['selective_accuracy']:.3f}"
        axes.text(0.98, 0.97, text, transform=axes.transAxes, fontsize=8, color="tab:red", ha="right", va="top",
                  bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "tab:red"})  # fmt: skip
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence threshold (min_confidence)")
    axes.set_ylabel("share of images / accuracy")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8, frameon=False)
    axes.set_title(
        f"Class, else superclass, else unknown (n = {int(n[0])}, hAURC {c['selective_haurc']:.3f})", fontsize=10
    )
    return _save(figure, path)


def _images_at(images: Sequence[PIL.Image.Image] | Dataset, rows: list[int]) -> list[PIL.Image.Image]:
    """PIL images at `rows` of a sequence of images or of a `Dataset` with an `image` column (any format)."""
    if isinstance(images, Dataset):
        if "image" not in images.column_names:
            raise ValueError(f"images must have an 'image' column, got the columns {images.column_names}")
        values = list(images.with_format(None).select(rows)["image"])  # drops an attached transform
    else:
        values = [images[row] for row in rows]
    decoded = []
    for value in values:
        if isinstance(value, dict):  # an Image(decode=False) value: {"bytes": ..., "path": ...}
            value = ImageFeature().decode_example(value)
        if not isinstance(value, PIL.Image.Image):
            raise TypeError(f"images must hold PIL images, got {type(value).__name__}")
        decoded.append(value)
    return decoded


# ----------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------


def write_eval_report(
    output_dir: str | os.PathLike,
    logits: np.ndarray,
    coarse_logits: np.ndarray,
    labels: np.ndarray,
    coarse_labels: np.ndarray,
    config: HierarchicalEfficientNetV2Config,
    images: Sequence[PIL.Image.Image] | Dataset | None = None,
    split: str = "test",
    metrics: dict[str, float] | None = None,
) -> dict[str, str]:
    """Write `eval_report.md` and its PNG figures for one split into `output_dir`; return `{key: path}` written.

    Args:
        logits, coarse_logits (`np.ndarray`): `(n, num_labels)` and `(n, num_coarse_labels)` head outputs.
        labels, coarse_labels (`np.ndarray`): `(n,)` true class and superclass ids.
        config (`HierarchicalEfficientNetV2Config`): label names and hierarchy.
        images (`Sequence[PIL.Image.Image]` or `Dataset`, *optional*): the `n` images in prediction order (a
            `Dataset` needs an `image` column; an attached transform is ignored) for the grid of misclassified
            images; the grid is skipped without them.
        split (`str`, *optional*, defaults to `"test"`): split name shown in the report.
        metrics (`dict[str, float]`, *optional*): metrics already computed for these predictions (e.g. the
            Trainer's `eval_*`/`test_*`); their hierarchy metrics are reported as given, others (loss) listed too.

    The files have fixed names, so a second report in the same folder replaces the first. Figures need
    matplotlib; without it the markdown says how to get them.
    """
    data = compute_report_data(logits, coarse_logits, labels, coarse_labels, config, split, metrics)
    if images is not None and len(images) != len(data.fine_predictions):
        raise ValueError(f"images has {len(images)} entries but there are {len(data.fine_predictions)} predictions")
    os.makedirs(output_dir, exist_ok=True)
    path = {key: os.path.join(output_dir, name) for key, name in FIGURE_NAMES.items()}
    written: dict[str, str] = {}
    new_figure = _load_matplotlib()
    note = ""
    if new_figure is None:
        note = f"Figures were not drawn: matplotlib is not installed ({MATPLOTLIB_HINT} to get them)."
        logger.warning(f"matplotlib is not installed: {REPORT_NAME} without figures ({MATPLOTLIB_HINT})")
    else:
        written["superclass_accuracy"] = plot_superclass_accuracy(new_figure, data, config, path["superclass_accuracy"])
        written["superclass_confusion"] = plot_superclass_confusion(
            new_figure, data, config, path["superclass_confusion"]
        )
        written["confused_pairs"] = plot_confused_pairs(new_figure, data, config, path["confused_pairs"])
        written["reliability"] = plot_reliability(new_figure, data, config, path["reliability"])
        written["risk_coverage"] = plot_risk_coverage(new_figure, data, config, path["risk_coverage"])
        if images is not None:
            grid = plot_misclassified(
                new_figure, data, np.asarray(labels), np.asarray(coarse_labels), images, config, path["misclassified"]
            )
            if grid is not None:
                written["misclassified"] = grid
    for stale in set(FIGURE_NAMES) - set(written):  # an earlier report's figure must not pass for this one's
        if os.path.isfile(path[stale]):
            os.remove(path[stale])
    figures = {key: FIGURE_NAMES[key] for key in FIGURE_NAMES if key in written}
    report_path = os.path.join(output_dir, REPORT_NAME)
    with open(report_path, "w") as file:
        file.write(render_markdown(data, config, split, figures, note))
    written["report"] = report_path
    logger.info(f"Wrote the {split} report: {', '.join(os.path.basename(p) for p in written.values())}")
    return written


def write_prediction_report(
    output_dir: str | os.PathLike,
    prediction: PredictionOutput,
    config: HierarchicalEfficientNetV2Config,
    images: Sequence[PIL.Image.Image] | Dataset | None = None,
    split: str = "test",
) -> dict[str, str]:
    """[`write_eval_report`] from `Trainer.predict` output: predictions `(logits, coarse_logits)`, label ids
    `(labels, coarse_labels)` (the order of `label_names`) and its metrics."""
    logits, coarse_logits = prediction.predictions
    labels, coarse_labels = prediction.label_ids
    return write_eval_report(
        output_dir, logits, coarse_logits, labels, coarse_labels, config, images, split, prediction.metrics
    )


def evaluate_saved_model(
    model_dir: str | os.PathLike,
    dataset_name: str,
    split: str = "test",
    output_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
    seed: int = 42,
    **data_options: Any,
) -> dict[str, float]:
    """Evaluate a saved model folder on one split and write its report (into `model_dir` by default).

    Args:
        model_dir: a folder written by `save_pretrained` (e.g. by `run_classification.py`).
        dataset_name: any source `DataArguments.dataset_name` accepts (Hub id, parquet folder, ...).
        split: "train", "validation" (carved from "train" with `seed` and `train_val_split` when the source has
            none, as in training) or "test".
        max_samples: evaluate only the first N rows of the split.
        seed: the training seed, which decides a carved validation split.
        data_options: other `DataArguments` fields (column and split names, `train_val_split`, ...).

    Returns the hierarchy metrics (`fine_accuracy`, `coarse_accuracy`, ...) and the calibration and selective ones
    of the model's temperatures and threshold (`fine_ece`, `selective_accuracy`, ...).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit_field = {"train": "max_train_samples", "validation": "max_eval_samples", "test": "max_predict_samples"}
    if split not in limit_field:
        raise ValueError(f"split must be one of {list(limit_field)}, got {split!r}")
    if max_samples is not None:
        data_options[limit_field[split]] = max_samples
    model = HierarchicalEfficientNetV2ForImageClassification.from_pretrained(model_dir).eval()
    config = model.config
    data_args = DataArguments(dataset_name=dataset_name, **data_options)
    splits = prepare_datasets(data_args, config, seed=seed)
    if split not in splits:
        raise ValueError(f"the dataset {dataset_name!r} has no {split!r} split; it has {list(splits)}")
    dataset = splits[split]
    transformed = dataset.cast_column("image", ImageFeature(decode=False)).with_transform(
        ImageTransform(build_eval_transform(config), split=split)
    )
    loader = torch.utils.data.DataLoader(transformed, batch_size=batch_size, collate_fn=HierarchicalCollator())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    outputs: dict[str, list[np.ndarray]] = {"logits": [], "coarse_logits": [], "labels": [], "coarse_labels": []}
    with torch.no_grad():
        for batch in logging.tqdm(loader, desc=f"Evaluating {split}", unit="batch"):
            result = model(batch["pixel_values"].to(device))
            outputs["logits"].append(result.logits.float().cpu().numpy())
            outputs["coarse_logits"].append(result.coarse_logits.float().cpu().numpy())
            outputs["labels"].append(batch["labels"].numpy())
            outputs["coarse_labels"].append(batch["coarse_labels"].numpy())
    arrays = {name: np.concatenate(parts) for name, parts in outputs.items()}
    predictions = (arrays["logits"], arrays["coarse_logits"], arrays["labels"], arrays["coarse_labels"])
    metrics = compute_hierarchy_metrics(*predictions, config.fine_to_coarse)
    metrics |= evaluate_calibration(*predictions, config)
    write_eval_report(
        model_dir if output_dir is None else output_dir,
        arrays["logits"],
        arrays["coarse_logits"],
        arrays["labels"],
        arrays["coarse_labels"],
        config,
        images=dataset,
        split=split,
        metrics=metrics,
    )
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Command line: `python eval_report.py MODEL_DIR --dataset_name PATH [--split test] [data options]`."""
    parser = HfArgumentParser(
        DataArguments, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("model_dir", help="Saved model folder (save_pretrained / run_classification.py output).")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"), help="Split to evaluate.")
    parser.add_argument("--output_dir", default=None, help="Where the report goes (default: MODEL_DIR).")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per inference batch.")
    parser.add_argument("--max_samples", type=int, default=None, help="Evaluate only the first N rows of the split.")
    parser.add_argument("--seed", type=int, default=42, help="Training seed (decides a carved validation split).")
    data_args, options = parser.parse_args_into_dataclasses(args=argv)
    data_options = dataclasses.asdict(data_args)
    metrics = evaluate_saved_model(
        options.model_dir,
        data_options.pop("dataset_name"),
        split=options.split,
        output_dir=options.output_dir,
        batch_size=options.batch_size,
        max_samples=options.max_samples,
        seed=options.seed,
        **data_options,
    )
    json.dump(metrics, sys.stdout, indent=2)
    print(f"\nReport: {os.path.join(options.output_dir or options.model_dir, REPORT_NAME)}")
    return metrics


__all__ = ["compute_report_data", "evaluate_saved_model", "write_eval_report", "write_prediction_report"]


if __name__ == "__main__":
    main()
