"""Accuracy at both levels of a two-level class hierarchy, plus hierarchy metrics, as an `evaluate` metric.

The metric runs offline: it is defined here rather than fetched from the Hub, and it can also be loaded with
`evaluate.load("path/to/hierarchy_metrics.py")`.
"""

from __future__ import annotations

import datasets
import evaluate
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
    metric = HierarchicalAccuracy(keep_in_memory=True)
    return metric.compute(
        predictions=top_k,
        references=np.asarray(labels),
        coarse_predictions=np.asarray(coarse_logits).argmax(1),
        coarse_references=np.asarray(coarse_labels),
        fine_to_coarse=list(fine_to_coarse),
    )
