"""The text of `eval_report.md`: `render_markdown` writes one section after another from a `ReportData`."""

from __future__ import annotations

import os
import re

import numpy as np

from configuration_hierarchical import HierarchicalEfficientNetV2Config
from hierarchical.evaluation.metrics import ECE_BINS
from hierarchical.evaluation.report_data import MAX_CONFUSION_SUPERCLASSES, ReportData, largest_cells
from hierarchical.evaluation.selective_threshold import guarantee_text

# The figures of a report, in the order it lists them: key -> title. `report_figures` draws figure `key` into the
# file `FIGURE_NAMES[key]`, in the report's folder.
FIGURE_TITLES = {
    "superclass_accuracy": "Accuracy per superclass",
    "superclass_confusion": "Superclass confusion matrix",
    "confused_pairs": "Most confused classes",
    "misclassified": "Misclassified images",
    "reliability": "Reliability diagrams",
    "risk_coverage": "Hierarchical risk-coverage",
}
FIGURE_NAMES = {key: f"{key}.png" for key in FIGURE_TITLES}


REPORT_NAME = "eval_report.md"
REPORTS_FOLDER = "reports"  # a model folder's reports: reports/<split>/eval_report.md and its figures


def report_folder(model_dir: str | os.PathLike, split: str) -> str:
    """The folder of the report of `split` (`"validation"`, `"test"`, ...) in the model folder `model_dir`."""
    return os.path.join(model_dir, REPORTS_FOLDER, split)


LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the line endings of Markdown


def markdown_cell(value: object) -> str:
    """`value` as the text of one Markdown table cell (or of inline text): backslashes and `|` escaped, so that a
    class name cannot end the cell, and line breaks written as `<br>`, so that it cannot end the row."""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|")
    return LINE_BREAK.sub("<br>", text)


def table_row(*cells: object) -> str:
    """One Markdown table row, each cell through [`markdown_cell`]."""
    return "| " + " | ".join(markdown_cell(cell) for cell in cells) + " |"


def _format(value: float) -> str:
    """4 decimals; `-` for NaN."""
    return "-" if np.isnan(value) else f"{value:.4f}"


def render_markdown(
    data: ReportData, config: HierarchicalEfficientNetV2Config, split: str, figures: dict[str, str], note: str = ""
) -> str:
    """The text of `eval_report.md`; `figures` maps figure keys to file names relative to the report, `note` is
    shown above the list of figures."""
    coarse_names = config.coarse_label_names
    sections = [
        metrics_section(data, config, split),
        figures_section(figures, note),
        render_calibration_section(data.calibration, config, figures),
        superclass_accuracy_section(data, coarse_names),
        superclass_confusion_section(data, coarse_names),
        class_accuracy_section(data, config),
        confused_classes_section(data, config),
    ]
    return "\n".join(line for section in sections for line in section) + "\n"


def metrics_section(data: ReportData, config: HierarchicalEfficientNetV2Config, split: str) -> list[str]:
    """The title, what was evaluated, the hierarchy metrics and the other given metrics."""
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
    return lines


def figures_section(figures: dict[str, str], note: str) -> list[str]:
    """The list of figure files (or `note` on why there are none) and the superclass accuracy figure."""
    lines = ["", "## Figures", ""]
    if note:
        lines.append(note)
    lines += [f"- [{FIGURE_TITLES[key]}]({name})" for key, name in figures.items()]
    if "superclass_accuracy" in figures:
        lines += ["", f"![{FIGURE_TITLES['superclass_accuracy']}]({figures['superclass_accuracy']})"]
    return lines


def render_calibration_section(
    calibration: dict[str, float], config: HierarchicalEfficientNetV2Config, figures: dict[str, str]
) -> list[str]:
    """Markdown lines of the calibration and selective-prediction section."""
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
            f"{_format(calibration[f'{level}_{name}_uncalibrated'])} | {_format(calibration[f'{level}_{name}'])}"
            for name in ("ece", "nll", "brier")
        ]
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    lines += ["", *selective_answer_lines(calibration, config), *superclass_readings_lines(calibration)]
    for key in ("reliability", "risk_coverage"):
        if key in figures:
            lines += ["", f"![{FIGURE_TITLES[key]}]({figures[key]})"]
    return lines


def selective_answer_lines(calibration: dict[str, float], config: HierarchicalEfficientNetV2Config) -> list[str]:
    """What the stored selective threshold answers (class, superclass, unknown) and how accurately, or that there is
    none."""
    threshold = config.selective_threshold
    if threshold is None:
        return ["The model stores no selective threshold (`selective_threshold`)."]
    c = calibration
    target = config.selective_target_accuracy
    chosen = (
        f", chosen for a target accuracy of {target:g} with confidence {config.selective_confidence:g} ("
        f"{guarantee_text(target, config.selective_confidence)})"
        if target is not None
        else ""
    )
    accuracy = _format(c["selective_accuracy"]) if "selective_accuracy" in c else "- (nothing answered)"
    return [
        f"Selective answers at `min_confidence` {threshold:g}{chosen}: the class when its probability reaches it, "
        "else the superclass, else *unknown*.",
        "",
        "| answered with the class | answered with the superclass | unknown | accuracy of the answers |",
        "| --- | --- | --- | --- |",
        f"| {_format(c['selective_fine_coverage'])} | {_format(c['selective_coarse_coverage'])} | "
        f"{_format(c['selective_abstention_rate'])} | {accuracy} |",
    ]


def superclass_readings_lines(calibration: dict[str, float]) -> list[str]:
    """The area under the risk-coverage curve, the superclass accuracy read four ways and the class accuracy of the
    consistent prediction."""
    c = calibration
    return [
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
        f"| the parent of the consistent class prediction | {_format(c['coarse_consistent_accuracy'])} |",
        f"| the most probable superclass of the consistent distribution (what `predict_hierarchical`, the "
        f"hierarchical pipeline and superclass answers return) | {_format(c['coarse_combined_accuracy'])} |",
        "",
        f"Class accuracy of the consistent prediction: {_format(c['fine_consistent_accuracy'])}.",
    ]


def superclass_accuracy_section(data: ReportData, coarse_names: list[str]) -> list[str]:
    """Images, fine and coarse accuracy per superclass."""
    lines = [
        "",
        "## Accuracy per superclass",
        "",
        "| # | superclass | images | fine accuracy | coarse accuracy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for index, name in enumerate(coarse_names):
        lines.append(
            table_row(
                index,
                name,
                data.superclass_samples[index],
                _format(data.superclass_fine_accuracy[index]),
                _format(data.superclass_coarse_accuracy[index]),
            )
        )
    return lines


def superclass_confusion_section(data: ReportData, coarse_names: list[str]) -> list[str]:
    """The superclass confusion matrix, or above `MAX_CONFUSION_SUPERCLASSES` superclasses its largest mistakes."""
    if len(coarse_names) > MAX_CONFUSION_SUPERCLASSES:
        return ["", "## Most confused superclasses", "", *confused_superclass_lines(data, coarse_names)]
    lines = [
        "",
        "## Superclass confusion matrix",
        "",
        "Rows: true superclass; columns: superclass predicted by the coarse head (numbers as in the table above).",
        "",
        "| true \\ predicted | " + " | ".join(str(i) for i in range(len(coarse_names))) + " |",
        "| --- |" + " --- |" * len(coarse_names),
    ]
    for index, row in enumerate(data.confusion):
        lines.append(table_row(f"{index} {coarse_names[index]}", *row))
    return lines


def confused_superclass_lines(data: ReportData, coarse_names: list[str]) -> list[str]:
    """A markdown table of the most frequent (true superclass -> coarse-head superclass) mistakes: the readable
    form of a confusion matrix too large to print."""
    off_diagonal = data.confusion.copy()
    np.fill_diagonal(off_diagonal, 0)
    cells = largest_cells(off_diagonal)
    if not cells:
        return ["No superclass mistakes."]
    lines = [
        "| true superclass | predicted superclass | count | share of the true superclass |",
        "| --- | --- | --- | --- |",
    ]
    for true, predicted, count in cells:
        share = count / max(data.superclass_samples[true], 1)
        lines.append(table_row(coarse_names[true], coarse_names[predicted], count, f"{share:.4f}"))
    return lines


def class_support_summary(samples: np.ndarray) -> str:
    """`min a, median b, max c` images per class, and how many classes have none."""
    text = f"min {samples.min()}, median {np.median(samples):g}, max {samples.max()}"
    empty = int((samples == 0).sum())
    return text + (f"; {empty} classes have no images in this split" if empty else "")


def class_accuracy_section(data: ReportData, config: HierarchicalEfficientNetV2Config) -> list[str]:
    """Superclass, images and fine accuracy per class."""
    fine_names, coarse_names = config.id2label, config.coarse_label_names
    lines = [
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
            table_row(
                index,
                fine_names[index],
                coarse_names[config.fine_to_coarse[index]],
                data.class_samples[index],
                _format(data.class_accuracy[index]),
            )
        )
    return lines


def confused_classes_section(data: ReportData, config: HierarchicalEfficientNetV2Config) -> list[str]:
    """The most frequent (true class -> predicted class) mistakes, and whether they stay in the superclass."""
    lines = ["", "## Most confused classes", ""]
    if not data.confused_pairs:
        return [*lines, "No fine-class mistakes."]
    lines += ["| true class | predicted class | count | same superclass |", "| --- | --- | --- | --- |"]
    for true, predicted, count in data.confused_pairs:
        same = "yes" if config.fine_to_coarse[true] == config.fine_to_coarse[predicted] else "no"
        lines.append(table_row(config.id2label[true], config.id2label[predicted], count, same))
    return lines
