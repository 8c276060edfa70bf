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
        num_samples (`int`): calibration images, both parts.
        start_samples (`int`): the part of them that placed the start of each sequence and was not tested on.
        test_samples (`int`): the other part, on which the thresholds were tested (`num_samples - start_samples`).
        answered (`int`), correct (`int`): answers given and right ones at the threshold, on the `test_samples`.
        accuracy_lower_bound (`float`): Clopper-Pearson lower bound on the accuracy at the threshold, from `correct`
            of `answered`, at the level each sequence was tested at (`1 - (1 - confidence) / len(start_coverages)`):
            at least the target.
        tested (`int`): thresholds tested, over all sequences, before each stopped.
        start_coverages (`tuple[float, ...]`): the starting coverages searched from.
    """

    threshold: float | None
    target_accuracy: float
    confidence: float
    num_samples: int
    start_samples: int = 0
    answered: int = 0
    correct: int = 0
    accuracy_lower_bound: float = 0.0
    tested: int = 0
    start_coverages: tuple[float, ...] = ()

    @property
    def test_samples(self) -> int:
        """The calibration images the thresholds were tested on."""
        return self.num_samples - self.start_samples


# Shares of the start images that the first tested threshold of each sequence answers. Chosen with
# benchmarks/selective_simulation.py (table in the README): one start at 10% finds no threshold for targets that
# only the model's most confident few percent reach; one start near 1% stops early, on a few unlucky answers, for
# targets that most images reach; both, at half the error budget each, kept every miss rate below 1 - confidence,
# found thresholds where the 10% start found none, and lost at most 0.13 of the oracle's coverage against the
# better single start.
DEFAULT_START_COVERAGES = (0.01, 0.1)

# Share of the calibration images, drawn with the run's seed, that only places the starts; the tests run on the
# others. Chosen with the same simulation: with 1% + 10% starts, a share of 0.1 kept within 0.06 of the coverage of
# the former rule that placed the starts on the tested images themselves (0.05 did as well, 0.2 and 0.3 lost up to
# 0.18), and leaves more images to place a 1% start than 0.05 does.
DEFAULT_START_SHARE = 0.1


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
    start_share: float = DEFAULT_START_SHARE,
    seed: int = 0,
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
    run from each of `start_coverages`, so that one unlucky answer among the very first few does not end the
    search. With several starts each sequence is tested at `(1 - confidence) / len(start_coverages)` (Bonferroni),
    and the lowest threshold any of them certifies is chosen.

    Where a sequence starts depends on the data, so it is placed on other images than the tests: a seeded share
    `start_share` of the calibration images (the start images) places the starts, and the thresholds are tested
    on the others only (the test images). A sequence starts at the first threshold that answers the share
    `start_coverages[i]` of the start images, and at least the share of them that, among the test images, could
    pass with no error (`log(delta) / log(target_accuracy)` answers). Given the start images, each test is then an
    exact binomial test at a threshold fixed in advance, so the guarantee holds whatever the accuracy does along
    the confidences (also where the most confident answers are less accurate than those below them). A start
    coverage of 0 also needs the start images: it starts where a test could first pass.

    Args:
        fine_confidence, fine_correct, coarse_confidence, coarse_correct (`np.ndarray` of shape `(n,)`): per
            calibration image, the probability of the best class and whether it is right, and the same for the
            best superclass (consistent, calibrated probabilities).
        target_accuracy (`float`): in (0, 1).
        confidence (`float`, *optional*, defaults to 0.9): in (0, 1).
        thresholds (`np.ndarray`, *optional*): the grid, tested in the order given (defaults to 1.000, 0.999, ...,
            0.001).
        start_coverages (`float` or `tuple[float, ...]`, *optional*, defaults to `DEFAULT_START_COVERAGES`): shares
            of the start images, in [0, 1), that the first tested threshold of each sequence must answer.
        start_share (`float`, *optional*, defaults to `DEFAULT_START_SHARE`): in (0, 1), the share of the images
            that places the starts (rounded, at least 1 image and at most `n - 1`).
        seed (`int`, *optional*, defaults to 0): seeds the draw of the start images (`np.random.default_rng`).
    """
    starts = (start_coverages,) if isinstance(start_coverages, int | float) else tuple(start_coverages)
    _check_threshold_options(target_accuracy, confidence, starts)
    check_unit_interval("start_share", start_share)
    thresholds = THRESHOLD_GRID if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    scores = [np.asarray(array) for array in (fine_confidence, fine_correct, coarse_confidence, coarse_correct)]
    num_samples = len(scores[0])
    result = SelectiveThreshold(None, target_accuracy, confidence, num_samples, start_coverages=starts)
    if num_samples < 2:
        return result  # no image left to test on once one places the starts
    start_rows, test_rows = start_split(num_samples, start_share, seed)
    result.start_samples = len(start_rows)
    start_answered = selective_curve(*(array[start_rows] for array in scores), thresholds)["answered"]
    counts = selective_curve(*(array[test_rows] for array in scores), thresholds)
    answered, correct = counts["answered"], counts["correct"]
    error_rate, delta = 1.0 - target_accuracy, (1.0 - confidence) / len(starts)
    could_pass = math.ceil(math.log(delta) / math.log(1.0 - error_rate)) / len(test_rows)  # share of test images
    first = [_first_reaching(start_answered, max(c, could_pass) * len(start_rows)) for c in starts]
    best, result.tested = fixed_sequence_tests(answered, correct, first, error_rate, delta)
    if best >= 0:
        result.threshold = float(thresholds[best])
        result.answered, result.correct = int(answered[best]), int(correct[best])
        result.accuracy_lower_bound = accuracy_lower_bound(result.correct, result.answered, 1.0 - delta)
    return result


def seeded_split(num_samples: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of `range(num_samples)` into `count` rows and the rest, each sorted: the one draw behind the
    calibration part of a validation split and the start images of the threshold search."""
    order = np.random.default_rng(seed).permutation(num_samples)
    return np.sort(order[:count]), np.sort(order[count:])


def start_split(num_samples: int, start_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seeded split of `range(num_samples)` (at least 2) into the rows that place the search's starts (the share
    `start_share`, rounded, at least 1 and at most `num_samples - 1`) and the rows tested on (sorted rows)."""
    return seeded_split(num_samples, min(max(round(start_share * num_samples), 1), num_samples - 1), seed)


def fixed_sequence_tests(
    answered: np.ndarray, correct: np.ndarray, starts: Sequence[int], error_rate: float, delta: float
) -> tuple[int, int]:
    """Fixed-sequence binomial tests of "error rate above `error_rate`" at level `delta`, one sequence from each
    index of `starts` down the grid, each stopping at its first failure: `(the highest index any sequence passed,
    -1 when none; the thresholds tested)`. `answered` and `correct` are counts per grid threshold."""
    p_values = _LazyPValues(answered, correct, error_rate)
    best, tested = -1, 0
    for start in starts:
        for index in range(start, len(answered)):  # fixed-sequence testing: stop at the first that fails
            tested += 1
            if p_values[index] > delta:
                break
            best = max(best, index)
    return best, tested


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


def _first_reaching(answered: np.ndarray, count: float) -> int:
    """Index of the first threshold that answers at least `count` images; `len(answered)` when none does."""
    enough = answered >= math.ceil(count - 1e-9)
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
    "DEFAULT_START_SHARE",
    "THRESHOLD_GRID",
    "SelectiveThreshold",
    "accuracy_lower_bound",
    "binomial_cdf",
    "check_start_coverages",
    "choose_selective_threshold",
    "fixed_sequence_tests",
    "guarantee_text",
    "seeded_split",
    "start_split",
]
