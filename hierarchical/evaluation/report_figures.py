"""The PNG figures of the evaluation report, drawn from a `ReportData` with matplotlib (optional) through its
object-oriented API: `draw_figures` draws them all, each `plot_*` function one."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
from datasets import Dataset
from datasets import Image as ImageFeature

from configuration_hierarchical import HierarchicalEfficientNetV2Config
from hierarchical.evaluation.metrics import ECE_BINS
from hierarchical.evaluation.report_data import MAX_CONFUSION_SUPERCLASSES, ReportData
from hierarchical.evaluation.report_markdown import FIGURE_NAMES
from image_processing_hierarchical import DEFAULT_MAX_IMAGE_PIXELS, as_decodable, decode_rgb

MIN_ANSWERS_PLOTTED = 20  # the accuracy curve is drawn where at least this many images are answered
MAX_BAR_SUPERCLASSES = 40  # above this, the accuracy figure shows the largest superclasses
MAX_LABEL_CHARS = 28  # longer names are cut in figures
MAX_MISCLASSIFIED = 16
DPI = 110


def draw_figures(
    output_dir: str | os.PathLike,
    data: ReportData,
    config: HierarchicalEfficientNetV2Config,
    labels: np.ndarray,
    coarse_labels: np.ndarray,
    images: Sequence[PIL.Image.Image] | Dataset | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict[str, str] | None:
    """Draw every figure into `output_dir` under the names of `FIGURE_NAMES`; return `{key: path}` drawn, or None
    when matplotlib is not installed. The grid of misclassified images needs `images` (decoded within
    `max_image_pixels`, as the evaluation decoded them) and a mistake."""
    new_figure = _load_matplotlib()
    if new_figure is None:
        return None
    path = {key: os.path.join(output_dir, name) for key, name in FIGURE_NAMES.items()}
    plots = {
        "superclass_accuracy": plot_superclass_accuracy,
        "superclass_confusion": plot_superclass_confusion,
        "confused_pairs": plot_confused_pairs,
        "reliability": plot_reliability,
        "risk_coverage": plot_risk_coverage,
    }
    drawn = {key: plot(new_figure, data, config, path[key]) for key, plot in plots.items()}
    if images is not None:
        labels, coarse_labels = np.asarray(labels), np.asarray(coarse_labels)
        grid = plot_misclassified(
            new_figure, data, labels, coarse_labels, images, config, path["misclassified"], max_image_pixels
        )
        if grid is not None:
            drawn["misclassified"] = grid
    return drawn


def _short(name: str) -> str:
    """`name` cut to `MAX_LABEL_CHARS` characters for figure labels."""
    return name if len(name) <= MAX_LABEL_CHARS else name[: MAX_LABEL_CHARS - 1] + "…"


def largest_superclasses(data: ReportData, limit: int) -> np.ndarray:
    """Indices of all superclasses when there are at most `limit`, else of the `limit` with the most samples
    (in index order)."""
    if len(data.superclass_samples) <= limit:
        return np.arange(len(data.superclass_samples))
    return np.sort(np.argsort(-data.superclass_samples, kind="stable")[:limit])


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
    """Write `figure` as a PNG at `path`; return `path`."""
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
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> str | None:
    """Grid of the most confident class mistakes, captioned by [`misclassified_captions`]; `images` are decoded
    within `max_image_pixels`."""
    captions = misclassified_captions(data, labels, coarse_labels, config)
    if not captions:
        return None
    pictures = _images_at(images, [row for row, _, _ in captions], config.image_size, max_image_pixels)
    columns = min(4, len(captions))
    grid_rows = -(-len(captions) // columns)
    figure = new_figure(figsize=(2.6 * columns, 2.9 * grid_rows))
    for position, ((_, caption, coarse_wrong), picture) in enumerate(zip(captions, pictures, strict=True)):
        axes = figure.add_subplot(grid_rows, columns, position + 1)
        axes.imshow(np.asarray(picture), interpolation="nearest")
        axes.set_axis_off()
        axes.set_title(caption, fontsize=7, color="tab:red" if coarse_wrong else "black")
    figure.suptitle("Most confident mistakes (red: superclass wrong too)", fontsize=10)
    return _save(figure, path)


def misclassified_captions(
    data: ReportData, labels: np.ndarray, coarse_labels: np.ndarray, config: HierarchicalEfficientNetV2Config
) -> list[tuple[int, str, bool]]:
    """The most confident mistakes of the prediction the model returns (`predict_hierarchical`, the hierarchical
    pipeline: the most probable class and superclass of the consistent distribution), at most `MAX_MISCLASSIFIED`:
    `(row, caption with the true and predicted class and superclass, whether the superclass is wrong too)`."""
    labels, coarse_labels = np.asarray(labels), np.asarray(coarse_labels)
    wrong = np.flatnonzero(data.consistent_fine != labels)
    rows = wrong[np.argsort(-data.consistent_confidence[wrong], kind="stable")][:MAX_MISCLASSIFIED]
    names, coarse_names = config.id2label, config.coarse_label_names
    captions = []
    for row in rows.tolist():
        fine, coarse = int(data.consistent_fine[row]), int(data.consistent_coarse[row])
        caption = (
            f"true: {_short(names[int(labels[row])])}\n{_short(coarse_names[int(coarse_labels[row])])}\n"
            f"pred: {_short(names[fine])} ({data.consistent_confidence[row]:.2f})\n{_short(coarse_names[coarse])}"
        )
        captions.append((row, caption, coarse != int(coarse_labels[row])))
    return captions


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


def _images_at(
    images: Sequence[PIL.Image.Image] | Dataset, rows: list[int], image_size: int, max_pixels: int | None
) -> list[PIL.Image.Image]:
    """8-bit RGB PIL images at `rows` of a sequence of images or of a `Dataset` with an `image` column (any format),
    decoded by the model's decoder as evaluation decoded them (reduced for `image_size`, refused above
    `max_pixels`)."""
    if isinstance(images, Dataset):
        if "image" not in images.column_names:
            raise ValueError(f"images must have an 'image' column, got the columns {images.column_names}")
        # without an attached transform, and undecoded: the decoder reads the header first
        values = list(images.with_format(None).select(rows).cast_column("image", ImageFeature(decode=False))["image"])
    else:
        values = [images[row] for row in rows]
    decoded = []
    for row, value in zip(rows, values, strict=True):
        if not isinstance(value, PIL.Image.Image | dict):
            raise TypeError(f"images must hold PIL images, got {type(value).__name__}")
        where = f"row {row} of the evaluated images"
        decoded.append(decode_rgb(as_decodable(value, where), image_size, max_pixels, where))
    return decoded
