"""The selective threshold: the lowest confidence threshold whose answers (class, else superclass, else abstain)
reach a target accuracy on new data with a stated confidence, by fixed-sequence binomial tests over a grid of
thresholds (Learn-then-Test)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hierarchy_metrics import selective_curve

THRESHOLD_GRID = np.arange(1000, 0, -1) / 1000  # 1.000, 0.999, ..., 0.001: tested from the most conservative down


def binomial_cdf(k: np.ndarray, n: np.ndarray, p: float) -> np.ndarray:
    """`P(X <= k)` for `X ~ Binomial(n, p)`, elementwise over integer arrays `k` and `n` (exact, in log space)."""
    k, n = np.broadcast_arrays(np.asarray(k, dtype=np.int64), np.asarray(n, dtype=np.int64))
    if (k < 0).any() or (k > n).any() or not 0 < p < 1:
        raise ValueError("binomial_cdf needs 0 <= k <= n and 0 < p < 1")
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, int(n.max(initial=0)) + 1)))])
    values = np.arange(int(k.max(initial=0)) + 1)  # (K,)
    total = n.reshape(-1, 1)  # (m, 1)
    inside = values <= k.reshape(-1, 1)  # (m, K): the terms of each sum
    terms = np.minimum(values, total)
    log_pmf = (
        log_factorial[total] - log_factorial[terms] - log_factorial[total - terms]
        + terms * math.log(p) + (total - terms) * math.log1p(-p)
    )  # fmt: skip
    log_pmf = np.where(inside, log_pmf, -np.inf)
    peak = log_pmf.max(1, keepdims=True)
    cdf = np.exp(peak[:, 0]) * np.exp(log_pmf - peak).sum(1)
    return np.minimum(cdf, 1.0).reshape(k.shape)


def accuracy_lower_bound(correct: int, answered: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower bound on an accuracy: with probability `confidence`, the accuracy on new data
    is at least this, given `correct` right answers out of `answered` independent ones (0 without answers)."""
    if answered == 0:
        return 0.0
    errors, delta = answered - correct, 1.0 - confidence
    if errors == answered:
        return 0.0
    low, high = errors / answered, 1.0  # the error rate whose binomial tail P(X <= errors) equals delta
    for _ in range(60):
        middle = (low + high) / 2
        if binomial_cdf(np.array([errors]), np.array([answered]), middle)[0] > delta:
            low = middle
        else:
            high = middle
    return 1.0 - high


@dataclass
class SelectiveThreshold:
    """The outcome of [`choose_selective_threshold`].

    Args:
        threshold (`float`, *optional*): the chosen `min_confidence`; `None` when no tested threshold passed.
        target_accuracy (`float`), confidence (`float`): what was asked for.
        num_samples (`int`): calibration images.
        answered (`int`), correct (`int`): answers given and right ones at the threshold, on the calibration images.
        accuracy_lower_bound (`float`): Clopper-Pearson lower bound on the accuracy at `confidence`.
        tested (`int`): thresholds tested before the sequence stopped.
    """

    threshold: float | None
    target_accuracy: float
    confidence: float
    num_samples: int
    answered: int = 0
    correct: int = 0
    accuracy_lower_bound: float = 0.0
    tested: int = 0


def choose_selective_threshold(
    fine_confidence: np.ndarray,
    fine_correct: np.ndarray,
    coarse_confidence: np.ndarray,
    coarse_correct: np.ndarray,
    target_accuracy: float,
    confidence: float = 0.9,
    thresholds: np.ndarray | None = None,
    start_coverage: float = 0.1,
) -> SelectiveThreshold:
    """The lowest threshold (the most answers) whose answers reach `target_accuracy` on new data from the same
    distribution, with probability at least `confidence` over the draw of these calibration images.

    For each threshold `t` the hypothesis "the answers at `t` (class when its probability reaches `t`, else
    superclass, else none) are right less often than `target_accuracy`" is tested with the exact binomial p-value
    of the observed errors among the answered images. Thresholds are tested in a fixed order from the most
    conservative down, each at level `1 - confidence`, stopping at the first that fails (fixed-sequence testing,
    which keeps the family-wise error at `1 - confidence` without a multiplicity correction; Learn-then-Test,
    Angelopoulos et al. 2021). As in the usual selective-classification scan, the sequence starts at the first
    threshold that answers enough images: `start_coverage` of them, and at least the
    `log(1 - confidence) / log(target_accuracy)` that could pass with no error, so that one unlucky answer among
    the very first few does not end the search.

    Args:
        fine_confidence, fine_correct, coarse_confidence, coarse_correct (`np.ndarray` of shape `(n,)`): per
            calibration image, the probability of the best class and whether it is right, and the same for the
            best superclass (consistent, calibrated probabilities).
        target_accuracy (`float`): in (0, 1).
        confidence (`float`, *optional*, defaults to 0.9): in (0, 1).
        thresholds (`np.ndarray`, *optional*): the grid, tested in the order given (defaults to 1.000, 0.999, ...,
            0.001).
        start_coverage (`float`, *optional*, defaults to 0.1): share of the images the first tested threshold
            must answer.
    """
    _check_threshold_options(target_accuracy, confidence, start_coverage)
    thresholds = THRESHOLD_GRID if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    counts = selective_curve(fine_confidence, fine_correct, coarse_confidence, coarse_correct, thresholds)
    answered, correct = counts["answered"], counts["correct"]
    error_rate, delta = 1.0 - target_accuracy, 1.0 - confidence
    start = _first_tested(answered, error_rate, delta, start_coverage * len(fine_confidence))
    p_values = _error_p_values(answered, correct, start, error_rate)
    result = SelectiveThreshold(None, target_accuracy, confidence, len(fine_confidence))
    for index in range(start, len(thresholds)):  # fixed-sequence testing: stop at the first that fails
        result.tested += 1
        if p_values[index] > delta:
            break
        result.threshold = float(thresholds[index])
        result.answered, result.correct = int(answered[index]), int(correct[index])
    if result.threshold is not None:
        result.accuracy_lower_bound = accuracy_lower_bound(result.correct, result.answered, confidence)
    return result


def _check_threshold_options(target_accuracy: float, confidence: float, start_coverage: float) -> None:
    """Raise `ValueError` naming the option out of its range."""
    for name, value in (("target_accuracy", target_accuracy), ("confidence", confidence)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    if not 0 <= start_coverage < 1:
        raise ValueError(f"start_coverage must be in [0, 1), got {start_coverage}")


def _first_tested(answered: np.ndarray, error_rate: float, delta: float, min_coverage: float) -> int:
    """Index of the first threshold that answers at least `min_coverage` images and at least the number whose
    answers could all be right and pass the test at level `delta`; `len(answered)` when none does."""
    min_answered = max(math.ceil(math.log(delta) / math.log(1.0 - error_rate)), math.ceil(min_coverage))
    enough = answered >= min_answered
    return int(np.argmax(enough)) if enough.any() else len(answered)


def _error_p_values(answered: np.ndarray, correct: np.ndarray, start: int, error_rate: float) -> np.ndarray:
    """Per threshold from `start` on, the exact binomial p-value of its observed errors under `error_rate` (1 before
    `start`)."""
    p_values = np.ones(len(answered))
    if start < len(answered):  # thresholds with the same answers share one p-value
        pairs, inverse = np.unique(
            np.stack([answered[start:] - correct[start:], answered[start:]]), axis=1, return_inverse=True
        )
        p_values[start:] = binomial_cdf(pairs[0], pairs[1], error_rate)[inverse.reshape(-1)]
    return p_values


__all__ = [
    "THRESHOLD_GRID",
    "SelectiveThreshold",
    "accuracy_lower_bound",
    "binomial_cdf",
    "choose_selective_threshold",
]
