"""The numbers of the evaluation report: `compute_report_data` turns head outputs and labels into a `ReportData`
(metrics, accuracy per superclass and class, confusions, calibration and selective-answer curves), which
`hierarchical/evaluation/report_markdown.py` and `hierarchical/evaluation/report_figures.py` render."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from transformers.utils import logging

from configuration_hierarchical import HierarchicalEfficientNetV2Config
from hierarchical.evaluation.calibration import evaluate_calibration, hierarchical_scores
from hierarchical.evaluation.metrics import ECE_BINS, compute_hierarchy_metrics, reliability_bins, selective_curve
from hierarchical.evaluation.temperature_scaling import check_predictions

logger = logging.get_logger(__name__)

CURVE_THRESHOLDS = np.linspace(0.0, 1.0, 201)  # the x axis of the risk-coverage figure
TOP_CONFUSED_PAIRS = 15
MAX_CONFUSION_SUPERCLASSES = 20  # above this, the matrix figure shows the largest superclasses, the text the top pairs


@dataclasses.dataclass
class ReportData:
    """Everything the report shows, computed once from the predictions.

    Args:
        metrics (`dict[str, float]`): hierarchy metrics (`compute_hierarchy_metrics`, or the given ones).
        extra_metrics (`dict[str, float]`): other given metrics (loss, runtime, ...).
        fine_predictions (`np.ndarray` of shape `(n,)`): argmax of the fine logits.
        coarse_predictions (`np.ndarray` of shape `(n,)`): argmax of the coarse logits (the coarse head).
        consistent_fine, consistent_coarse (`np.ndarray` of shape `(n,)`): the class and the superclass that
            `predict_hierarchical` and the hierarchical pipeline return (the most probable class and superclass of
            the consistent distribution, with the config's temperatures).
        consistent_confidence (`np.ndarray` of shape `(n,)`): the probability of `consistent_fine`.
        superclass_samples, superclass_fine_accuracy, superclass_coarse_accuracy (`np.ndarray` of shape `(num_coarse,)`):
            per true superclass: number of samples, fine accuracy and coarse-head accuracy (NaN without samples).
        confusion (`np.ndarray` of shape `(num_coarse, num_coarse)`): rows true superclass, columns coarse prediction.
        confused_pairs (`list[tuple[int, int, int]]`): `(true fine, predicted fine, count)`, most frequent first.
        calibration (`dict[str, float]`): [`hierarchical.evaluation.calibration.evaluate_calibration`] with the config's temperatures and
            selective threshold.
        reliability (`dict[str, dict[str, dict[str, np.ndarray]]]`): [`hierarchical.evaluation.metrics.reliability_bins`] per level
            (`"fine"`, `"coarse"`) and per state (`"uncalibrated"`, `"calibrated"`).
        curve (`dict[str, np.ndarray]`): [`hierarchical.evaluation.metrics.selective_curve`] at `thresholds` (calibrated scores).
        class_samples, class_accuracy (`np.ndarray` of shape `(num_labels,)`): per true class: number of samples
            (the class's support) and fine accuracy (NaN without samples).
    """

    metrics: dict[str, float]
    extra_metrics: dict[str, float]
    fine_predictions: np.ndarray
    coarse_predictions: np.ndarray
    consistent_fine: np.ndarray
    consistent_coarse: np.ndarray
    consistent_confidence: np.ndarray
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
    """Check the shapes of the predictions and compute every table of the report; `metrics` already computed for
    these predictions (the Trainer's, with their `<split>_`/`eval_`/`test_` prefix) are reported as given."""
    check_predictions(logits, coarse_logits, labels, coarse_labels, config)  # shapes, label ranges, finite logits
    logits, coarse_logits = np.asarray(logits, dtype=np.float64), np.asarray(coarse_logits, dtype=np.float64)
    labels, coarse_labels = np.asarray(labels).astype(np.int64), np.asarray(coarse_labels).astype(np.int64)
    predictions = logits, coarse_logits, labels, coarse_labels
    calibration = evaluate_calibration(*predictions, config)
    hierarchy, extra = reported_metrics(
        compute_hierarchy_metrics(*predictions, config.fine_to_coarse), calibration, metrics or {}, split
    )
    reliability, curve = calibration_curves(*predictions, config)
    consistent = hierarchical_scores(*predictions, config)
    fine_predictions, coarse_predictions = logits.argmax(1), coarse_logits.argmax(1)
    fine_correct = fine_predictions == labels
    samples, fine_accuracy = accuracy_by_group(coarse_labels, fine_correct, config.num_coarse_labels)
    _, coarse_accuracy = accuracy_by_group(coarse_labels, coarse_predictions == coarse_labels, config.num_coarse_labels)
    class_samples, class_accuracy = accuracy_by_group(labels, fine_correct, config.num_labels)
    wrong = ~fine_correct
    return ReportData(
        metrics=hierarchy,
        extra_metrics=extra,
        fine_predictions=fine_predictions,
        coarse_predictions=coarse_predictions,
        consistent_fine=consistent.log_fine.argmax(1),
        consistent_coarse=consistent.log_coarse.argmax(1),
        consistent_confidence=consistent.fine_confidence,
        superclass_samples=samples,
        superclass_fine_accuracy=fine_accuracy,
        superclass_coarse_accuracy=coarse_accuracy,
        confusion=count_pairs(coarse_labels, coarse_predictions, config.num_coarse_labels),
        confused_pairs=largest_cells(count_pairs(labels[wrong], fine_predictions[wrong], config.num_labels)),
        class_samples=class_samples,
        class_accuracy=class_accuracy,
        calibration=calibration,
        reliability=reliability,
        curve=curve,
    )


def reported_metrics(
    computed: dict[str, float], calibration: dict[str, float], given: dict[str, Any], split: str
) -> tuple[dict[str, float], dict[str, float]]:
    """The hierarchy metrics to report (the given value where there is one, with a warning when it disagrees with the
    computed one) and the other given metrics (loss, runtime, ...), neither hierarchy nor calibration ones."""
    given = _strip_prefixes(given, split)
    for name, value in computed.items():
        if name in given and not np.isclose(given[name], value, rtol=0, atol=1e-6):
            logger.warning(f"{name} = {given[name]} in the given metrics but {value} from the predictions")
    hierarchy = {name: given.get(name, float(value)) for name, value in computed.items()}
    extra = {name: value for name, value in given.items() if name not in computed and name not in calibration}
    return hierarchy, extra


def _strip_prefixes(metrics: dict[str, Any], split: str) -> dict[str, float]:
    """Numeric entries of `metrics` with a `<split>_`, `eval_` or `test_` prefix removed (Trainer metric keys)."""
    prefixes = tuple(dict.fromkeys((f"{split}_", "eval_", "test_")))
    stripped = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            name = next((key.removeprefix(prefix) for prefix in prefixes if key.startswith(prefix)), key)
            stripped[name] = float(value)
    return stripped


def calibration_curves(
    logits: np.ndarray,
    coarse_logits: np.ndarray,
    labels: np.ndarray,
    coarse_labels: np.ndarray,
    config: HierarchicalEfficientNetV2Config,
) -> tuple[dict[str, dict[str, dict[str, np.ndarray]]], dict[str, np.ndarray]]:
    """The reliability bins per level and state (see `ReportData.reliability`) and the selective curve of the
    calibrated scores at `CURVE_THRESHOLDS` (see `ReportData.curve`)."""
    reliability: dict[str, dict[str, dict[str, np.ndarray]]] = {"fine": {}, "coarse": {}}
    for state in ("uncalibrated", "calibrated"):
        scores = hierarchical_scores(logits, coarse_logits, labels, coarse_labels, config, state == "calibrated")
        reliability["fine"][state] = reliability_bins(scores.fine_confidence, scores.fine_correct, ECE_BINS)
        reliability["coarse"][state] = reliability_bins(scores.coarse_confidence, scores.coarse_correct, ECE_BINS)
    curve = selective_curve(
        scores.fine_confidence, scores.fine_correct, scores.coarse_confidence, scores.coarse_correct, CURVE_THRESHOLDS
    )
    curve["thresholds"] = CURVE_THRESHOLDS
    return reliability, curve


def accuracy_by_group(groups: np.ndarray, correct: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group id in `[0, num_groups)`: the number of samples and the share of them `correct` (NaN without
    samples)."""
    samples = np.bincount(groups, minlength=num_groups)
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN for groups without samples
        return samples, np.bincount(groups, correct, num_groups) / samples


def count_pairs(rows: np.ndarray, columns: np.ndarray, size: int) -> np.ndarray:
    """`(size, size)` int64 matrix counting each `(rows[i], columns[i])` pair (a confusion matrix)."""
    counts = np.zeros((size, size), dtype=np.int64)
    np.add.at(counts, (rows, columns), 1)
    return counts


def largest_cells(counts: np.ndarray, limit: int = TOP_CONFUSED_PAIRS) -> list[tuple[int, int, int]]:
    """`(row, column, count)` of the `limit` largest positive cells of `counts`, largest first (ties in index
    order)."""
    order = np.argsort(-counts, axis=None, kind="stable")[:limit]
    cells = [(int(r), int(c), int(counts[r, c])) for r, c in zip(*np.unravel_index(order, counts.shape), strict=True)]
    return [cell for cell in cells if cell[2] > 0]
