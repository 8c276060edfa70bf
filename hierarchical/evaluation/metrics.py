"""Accuracy at both levels of a two-level class hierarchy, plus hierarchy metrics, as an `evaluate` metric; and the
calibration and selective-prediction metrics (expected calibration error, likelihood, Brier score, the hierarchical
risk-coverage curve and its area) as functions of per-image confidences.

The metric runs offline: it is defined here rather than fetched from the Hub, and it can also be loaded with
`evaluate.load("path/to/hierarchy_metrics.py")`.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np

_DESCRIPTION = """Hierarchical classification metrics for a model with a fine head and a coarse head:
fine_accuracy, fine_top5_accuracy, coarse_accuracy (coarse head), coarse_from_fine_accuracy (the fine prediction
mapped to its superclass), consistency (the fine prediction's superclass equals the coarse prediction),
both_correct, mistake_severity (mean tree distance of the wrong fine predictions: 1 within the right superclass,
2 otherwise; 0 when there is no mistake) and num_samples. fine_top5_accuracy is left out when there are 5 classes
or fewer (every prediction would hold the answer)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[int]]`): the top-k fine class ids of each sample, best first (k >= 1; top-5 accuracy
        needs k >= 5).
    references (`list[int]`): the true fine class ids.
    coarse_predictions (`list[int]`): the coarse head's predicted superclass ids.
    coarse_references (`list[int]`): the true superclass ids.
    fine_to_coarse (`list[int]`): superclass id of every fine class.
Returns:
    dict of float: the metrics named in the description.
Example:
    >>> metric = HierarchicalAccuracy()
    >>> metric.compute(predictions=[[1, 0]], references=[1], coarse_predictions=[1], coarse_references=[1],
    ...                fine_to_coarse=[0, 1])["fine_accuracy"]
    1.0
"""


@functools.cache
def _hierarchical_accuracy_class() -> type:
    """[`HierarchicalAccuracy`], defined on first use: importing `evaluate` (which imports `transformers.pipelines`)
    takes seconds that `--help`, an option error or a run's start-up need not wait for."""
    import datasets
    import evaluate

    class HierarchicalAccuracy(evaluate.Metric):
        """`evaluate` metric for hierarchical (superclass + class) image classification."""

        def _info(self) -> evaluate.MetricInfo:
            return evaluate.MetricInfo(
                description=_DESCRIPTION,
                citation="",
                inputs_description=_KWARGS_DESCRIPTION,
                features=datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("int64")),
                        "references": datasets.Value("int64"),
                        "coarse_predictions": datasets.Value("int64"),
                        "coarse_references": datasets.Value("int64"),
                    }
                ),
            )

        def _compute(
            self,
            predictions: list[list[int]],
            references: list[int],
            coarse_predictions: list[int],
            coarse_references: list[int],
            fine_to_coarse: list[int],
        ) -> dict[str, float]:
            return hierarchy_scores(
                np.asarray(predictions),
                np.asarray(references),
                np.asarray(coarse_predictions),
                np.asarray(coarse_references),
                np.asarray(fine_to_coarse),
            )

    HierarchicalAccuracy.__qualname__ = "HierarchicalAccuracy"
    return HierarchicalAccuracy


def __getattr__(name: str) -> Any:
    """`HierarchicalAccuracy`, the `evaluate` metric, built on first use."""
    if name == "HierarchicalAccuracy":
        return _hierarchical_accuracy_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "evaluate" in sys.modules:  # loaded by `evaluate.load`, which looks for the metric among the module's names
    HierarchicalAccuracy = _hierarchical_accuracy_class()


def hierarchy_scores(
    top_k: np.ndarray,
    references: np.ndarray,
    coarse_predictions: np.ndarray,
    coarse_references: np.ndarray,
    fine_to_coarse: np.ndarray,
) -> dict[str, float]:
    """The metrics of [`HierarchicalAccuracy`] from arrays: `top_k` is `(n, k)` fine ids, best first."""
    if len(references) == 0:
        raise ValueError("cannot compute metrics on 0 samples")
    fine = top_k[:, 0]
    fine_correct = fine == references
    coarse_from_fine = fine_to_coarse[fine]
    wrong = ~fine_correct
    severity = np.where(coarse_from_fine[wrong] == coarse_references[wrong], 1.0, 2.0)
    scores = {
        "fine_accuracy": float(fine_correct.mean()),
        "fine_top5_accuracy": float((top_k[:, :5] == references[:, None]).any(1).mean()),
        "coarse_accuracy": float((coarse_predictions == coarse_references).mean()),
        "coarse_from_fine_accuracy": float((coarse_from_fine == coarse_references).mean()),
        "consistency": float((coarse_from_fine == coarse_predictions).mean()),
        "both_correct": float((fine_correct & (coarse_predictions == coarse_references)).mean()),
        "mistake_severity": float(severity.mean()) if wrong.any() else 0.0,
        "num_samples": float(len(references)),
    }
    if len(fine_to_coarse) <= 5:
        del scores["fine_top5_accuracy"]
    return scores


def compute_hierarchy_metrics(
    logits: np.ndarray,
    coarse_logits: np.ndarray,
    labels: np.ndarray,
    coarse_labels: np.ndarray,
    fine_to_coarse: list[int],
) -> dict[str, float]:
    """Run [`HierarchicalAccuracy`] on raw head outputs (`(n, num_labels)` and `(n, num_coarse)` logits)."""
    top_k = np.argsort(-logits, axis=1, kind="stable")[:, : min(5, logits.shape[1])]
    metric = _hierarchical_accuracy_class()(keep_in_memory=True)
    return metric.compute(
        predictions=top_k,
        references=np.asarray(labels),
        coarse_predictions=np.asarray(coarse_logits).argmax(1),
        coarse_references=np.asarray(coarse_labels),
        fine_to_coarse=list(fine_to_coarse),
    )


# ----------------------------------------------------------------------------------------------------------------
# Calibration and selective prediction: functions of per-image confidences and correctness (any number of classes)
# ----------------------------------------------------------------------------------------------------------------

ECE_BINS = 15


def reliability_bins(confidences: np.ndarray, correct: np.ndarray, num_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Equal-width confidence bins `(k/num_bins, (k+1)/num_bins]` (the first also holds 0): per bin the number of
    images (`counts`), their mean confidence (`confidence`) and their accuracy (`accuracy`; NaN for empty bins)."""
    confidences, correct = np.asarray(confidences, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    if confidences.shape != correct.shape or confidences.ndim != 1:
        raise ValueError(f"confidences and correct must be (n,) arrays, got {confidences.shape} and {correct.shape}")
    if confidences.size and not (confidences.min() >= 0.0 and confidences.max() <= 1.0):
        raise ValueError(f"confidences must lie in [0, 1], got {confidences.min()} to {confidences.max()}")
    bins = np.clip(np.ceil(confidences * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    counts = np.bincount(bins, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "counts": counts,
            "confidence": np.bincount(bins, confidences, num_bins) / counts,
            "accuracy": np.bincount(bins, correct, num_bins) / counts,
        }


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, num_bins: int = ECE_BINS) -> float:
    """Expected calibration error: the mean over [`reliability_bins`], weighted by bin size, of |accuracy - mean
    confidence|. 0 for a perfectly calibrated predictor."""
    bins = reliability_bins(confidences, correct, num_bins)
    filled = bins["counts"] > 0
    if not filled.any():
        raise ValueError("cannot compute the calibration error of 0 samples")
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((bins["counts"][filled] * gaps).sum() / bins["counts"].sum())


def negative_log_likelihood(log_probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean of `-log p(true class)` from `(n, classes)` log-probabilities."""
    log_probabilities, labels = np.asarray(log_probabilities), np.asarray(labels)
    return float(-log_probabilities[np.arange(len(labels)), labels].mean())


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of the squared distance between the probabilities and the one-hot
    true class (0 is perfect, 2 the worst)."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    rows = np.arange(len(labels))
    squared = (probabilities**2).sum(1) - 2 * probabilities[rows, labels] + 1.0
    return float(squared.mean())


def selective_curve(
    fine_confidence: np.ndarray,
    fine_correct: np.ndarray,
    coarse_confidence: np.ndarray,
    coarse_correct: np.ndarray,
    thresholds: np.ndarray,
) -> dict[str, np.ndarray]:
    """Counts of the hierarchical selective rule at each threshold `t`: an image is answered at the fine level when
    `fine_confidence >= t`, else at the coarse level when `coarse_confidence >= t`, else not at all.

    Args:
        fine_confidence, coarse_confidence (`np.ndarray` of shape `(n,)`): probability of the best class and of the
            best superclass (from consistent probabilities, so `coarse >= fine`).
        fine_correct, coarse_correct (`np.ndarray` of shape `(n,)`): whether each of those two answers is right.
        thresholds (`np.ndarray` of shape `(T,)`).

    Returns a dict of `(T,)` int arrays: `fine` and `coarse` (images answered at each level), `answered`, `correct`
    (right answers, each counted at its own level), and `num_samples`.
    """
    fine_confidence, coarse_confidence = np.asarray(fine_confidence), np.asarray(coarse_confidence)
    fine_correct, coarse_correct = np.asarray(fine_correct, np.int64), np.asarray(coarse_correct, np.int64)
    thresholds = np.asarray(thresholds, dtype=np.float64)

    def at_least(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each threshold: how many `values` are >= it, and the sum of their `weights`."""
        order = np.argsort(values, kind="stable")
        position = np.searchsorted(values[order], thresholds, side="left")  # first value >= t
        suffix = np.concatenate([np.cumsum(weights[order][::-1])[::-1], [0]])
        return len(values) - position, suffix[position]

    fine, fine_minus_coarse = at_least(fine_confidence, fine_correct - coarse_correct)
    answered, coarse_right = at_least(coarse_confidence, coarse_correct)
    return {
        "fine": fine,
        "coarse": answered - fine,
        "answered": answered,
        "correct": fine_minus_coarse + coarse_right,  # fine answers scored at fine level, the others at coarse
        "num_samples": np.full(len(thresholds), len(fine_confidence)),
    }


def hierarchical_risk_coverage(
    fine_confidence: np.ndarray, fine_correct: np.ndarray, coarse_confidence: np.ndarray, coarse_correct: np.ndarray
) -> dict[str, Any]:
    """The hierarchical risk-coverage curve: [`selective_curve`] at every distinct confidence (thresholds from high
    to low), and its area `haurc`: the error rate of the answers integrated over the share answered, as the
    threshold goes from 1 to 0 (lower is better; a flat classifier's AURC when nothing is answered coarse).

    Returns `thresholds`, `coverage` (share answered), `fine_share`, `coarse_share`, `risk` (error rate of the
    answers), all `(T,)`, and `haurc` (float).
    """
    thresholds = np.unique(np.concatenate([np.asarray(fine_confidence), np.asarray(coarse_confidence)]))[::-1]
    counts = selective_curve(fine_confidence, fine_correct, coarse_confidence, coarse_correct, thresholds)
    n = len(fine_confidence)
    if n == 0:
        raise ValueError("cannot compute a risk-coverage curve on 0 samples")
    answered = counts["answered"]
    with np.errstate(invalid="ignore", divide="ignore"):
        risk = 1.0 - counts["correct"] / answered
    gained = np.diff(np.concatenate([[0], answered])) / n  # share newly answered at each threshold
    return {
        "thresholds": thresholds,
        "coverage": answered / n,
        "fine_share": counts["fine"] / n,
        "coarse_share": counts["coarse"] / n,
        "risk": risk,
        "haurc": float(np.sum(np.nan_to_num(risk) * gained)),
    }


def selective_scores(
    fine_confidence: np.ndarray,
    fine_correct: np.ndarray,
    coarse_confidence: np.ndarray,
    coarse_correct: np.ndarray,
    threshold: float,
) -> dict[str, float]:
    """Outcome of the hierarchical selective rule at one threshold: `selective_fine_coverage`,
    `selective_coarse_coverage`, `selective_abstention_rate` (shares of all images) and `selective_accuracy`
    (right answers among those given, each at its own level; omitted when nothing is answered)."""
    counts = selective_curve(fine_confidence, fine_correct, coarse_confidence, coarse_correct, np.array([threshold]))
    n = float(len(fine_confidence))
    scores = {
        "selective_fine_coverage": float(counts["fine"][0]) / n,
        "selective_coarse_coverage": float(counts["coarse"][0]) / n,
        "selective_abstention_rate": 1.0 - float(counts["answered"][0]) / n,
    }
    if counts["answered"][0] > 0:
        scores["selective_accuracy"] = float(counts["correct"][0]) / float(counts["answered"][0])
    return scores
