"""The selective threshold: the lowest confidence threshold whose answers (class, else superclass, else abstain)
are certified to reach a target accuracy on new data, by fixed-sequence binomial tests over a grid of thresholds
(Learn-then-Test). The guarantee is marginal: P(a threshold is chosen and it misses the target) <= 1 - confidence."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from configuration_hierarchical import check_unit_interval
from hierarchical.evaluation.metrics import selective_curve

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
        accuracy_lower_bound (`float`): Clopper-Pearson lower bound on the accuracy at the threshold, at the level
            each sequence was tested at (`1 - (1 - confidence) / len(start_coverages)`): at least the target.
        tested (`int`): thresholds tested, over all sequences, before each stopped.
        start_coverages (`tuple[float, ...]`): the starting coverages searched from.
    """

    threshold: float | None
    target_accuracy: float
    confidence: float
    num_samples: int
    answered: int = 0
    correct: int = 0
    accuracy_lower_bound: float = 0.0
    tested: int = 0
    start_coverages: tuple[float, ...] = ()


# Shares of the calibration images that the first tested threshold of each sequence answers. Chosen with
# benchmarks/selective_simulation.py (table in the README): one start at 10% finds no threshold for targets that
# only the model's most confident few percent reach; one start near 1% stops early, on a few unlucky answers, for
# targets that most images reach; both, at half the error budget each, kept every miss rate below 1 - confidence,
# found thresholds where the 10% start found none, and lost at most 0.13 of the oracle's coverage against the
# better single start.
DEFAULT_START_COVERAGES = (0.01, 0.1)


def guarantee_text(target_accuracy: float, confidence: float) -> str:
    """The statement the threshold search makes, in words a user reads (log, README, report)."""
    return (
        f"the search chooses a threshold whose accuracy on new data is below {target_accuracy:g} in at most "
        f"{1 - confidence:.0%} of calibration draws (it may also choose none); for one stored threshold the chance "
        "that it misses the target can be higher, most near the highest accuracy the model can reach"
    )


def choose_selective_threshold(
    fine_confidence: np.ndarray,
    fine_correct: np.ndarray,
    coarse_confidence: np.ndarray,
    coarse_correct: np.ndarray,
    target_accuracy: float,
    confidence: float = 0.9,
    thresholds: np.ndarray | None = None,
    start_coverages: float | tuple[float, ...] = DEFAULT_START_COVERAGES,
) -> SelectiveThreshold:
    """The lowest threshold (the most answers) whose answers are certified to reach `target_accuracy` on new data
    from the same distribution.

    What is guaranteed is marginal, over the draw of the calibration images: P(a threshold is chosen and its
    accuracy on new data is below `target_accuracy`) <= 1 - `confidence`. Given that a threshold was chosen, its
    chance of missing can be higher.

    For each threshold `t` the hypothesis "the answers at `t` (class when its probability reaches `t`, else
    superclass, else none) are right less often than `target_accuracy`" is tested with the exact binomial p-value
    of the observed errors among the answered images. Thresholds are tested in a fixed order from the most
    conservative down, stopping at the first that fails (fixed-sequence testing, which keeps the family-wise error
    at its level without a multiplicity correction; Learn-then-Test, Angelopoulos et al. 2021). One sequence is
    run from each of `start_coverages`: it starts at the first threshold that answers that share of the images
    (and at least the `log(delta) / log(target_accuracy)` that could pass with no error), so that one unlucky
    answer among the very first few does not end the search. The start depends on the confidences only, never on
    which answers are right. With several starts each sequence is tested at `(1 - confidence) / len(start_coverages)`
    (Bonferroni), and the lowest threshold any of them certifies is chosen.

    Args:
        fine_confidence, fine_correct, coarse_confidence, coarse_correct (`np.ndarray` of shape `(n,)`): per
            calibration image, the probability of the best class and whether it is right, and the same for the
            best superclass (consistent, calibrated probabilities).
        target_accuracy (`float`): in (0, 1).
        confidence (`float`, *optional*, defaults to 0.9): in (0, 1).
        thresholds (`np.ndarray`, *optional*): the grid, tested in the order given (defaults to 1.000, 0.999, ...,
            0.001).
        start_coverages (`float` or `tuple[float, ...]`, *optional*, defaults to `DEFAULT_START_COVERAGES`): shares
            of the images, in [0, 1), that the first tested threshold of each sequence must answer.
    """
    starts = (start_coverages,) if isinstance(start_coverages, int | float) else tuple(start_coverages)
    _check_threshold_options(target_accuracy, confidence, starts)
    thresholds = THRESHOLD_GRID if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    counts = selective_curve(fine_confidence, fine_correct, coarse_confidence, coarse_correct, thresholds)
    answered, correct = counts["answered"], counts["correct"]
    error_rate, delta = 1.0 - target_accuracy, (1.0 - confidence) / len(starts)
    p_values = _LazyPValues(answered, correct, error_rate)
    result = SelectiveThreshold(None, target_accuracy, confidence, len(fine_confidence), start_coverages=starts)
    best = -1
    for coverage in starts:
        start = _first_tested(answered, error_rate, delta, coverage * len(fine_confidence))
        for index in range(start, len(thresholds)):  # fixed-sequence testing: stop at the first that fails
            result.tested += 1
            if p_values[index] > delta:
                break
            best = max(best, index)
    if best >= 0:
        result.threshold = float(thresholds[best])
        result.answered, result.correct = int(answered[best]), int(correct[best])
        result.accuracy_lower_bound = accuracy_lower_bound(result.correct, result.answered, 1.0 - delta)
    return result


def check_start_coverages(name: str, start_coverages: Sequence[float]) -> None:
    """Raise `ValueError` naming `name` (the option or argument) unless `start_coverages` is a list or tuple of one
    or more numbers, each in [0, 1) ([`check_unit_interval`])."""
    if not isinstance(start_coverages, list | tuple) or not start_coverages:
        raise ValueError(f"{name} must be one or more numbers in [0, 1), got {start_coverages!r}")
    for coverage in start_coverages:
        check_unit_interval(name, coverage, "[0, 1)")


def _check_threshold_options(target_accuracy: float, confidence: float, start_coverages: tuple[float, ...]) -> None:
    """Raise `ValueError` naming the argument out of its range."""
    check_unit_interval("target_accuracy", target_accuracy)
    check_unit_interval("confidence", confidence)
    check_start_coverages("start_coverages", start_coverages)


def _first_tested(answered: np.ndarray, error_rate: float, delta: float, min_coverage: float) -> int:
    """Index of the first threshold that answers at least `min_coverage` images and at least the number whose
    answers could all be right and pass the test at level `delta`; `len(answered)` when none does."""
    min_answered = max(math.ceil(math.log(delta) / math.log(1.0 - error_rate)), math.ceil(min_coverage))
    enough = answered >= min_answered
    return int(np.argmax(enough)) if enough.any() else len(answered)


class _LazyPValues:
    """Per threshold, the exact binomial p-value of its observed errors under `error_rate`, computed in blocks as
    the sequences reach them (a search usually stops long before the end of the grid)."""

    BLOCK = 64

    def __init__(self, answered: np.ndarray, correct: np.ndarray, error_rate: float):
        self.errors, self.answered, self.error_rate = answered - correct, answered, error_rate
        self.values = np.full(len(answered), np.nan)

    def __getitem__(self, index: int) -> float:
        if np.isnan(self.values[index]):
            block = slice(index, min(index + self.BLOCK, len(self.values)))
            # thresholds with the same answers share one p-value
            pairs, inverse = np.unique(
                np.stack([self.errors[block], self.answered[block]]), axis=1, return_inverse=True
            )
            self.values[block] = binomial_cdf(pairs[0], pairs[1], self.error_rate)[inverse.reshape(-1)]
        return float(self.values[index])


__all__ = [
    "DEFAULT_START_COVERAGES",
    "THRESHOLD_GRID",
    "SelectiveThreshold",
    "accuracy_lower_bound",
    "binomial_cdf",
    "check_start_coverages",
    "choose_selective_threshold",
    "guarantee_text",
]
