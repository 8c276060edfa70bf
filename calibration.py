"""Calibrated scores and selective answers for the hierarchical classifier.

- [`fit_temperatures`]: one temperature per head, fitted by L-BFGS on the negative log-likelihood of the consistent
  probabilities at both levels (held-out logits, a few seconds on CPU).
- [`choose_selective_threshold`]: the lowest confidence threshold whose answers (class, else superclass, else
  abstain) reach a target accuracy on new data with a stated confidence, by fixed-sequence binomial tests over a
  grid of thresholds (Learn-then-Test).
- [`evaluate_calibration`]: calibration error, likelihood, Brier score, the risk-coverage area, the outcome of the
  stored threshold, and four ways to read the superclass, for a model's config on any split.
- [`calibrate_and_select`]: all of that after training, on the validation predictions; the results go into the
  model's config (saved and pushed with it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.trainer_utils import PredictionOutput
from transformers.utils import logging

from configuration_hierarchical import HierarchicalEfficientNetV2Config
from hierarchy_metrics import (
    ECE_BINS,
    brier_score,
    expected_calibration_error,
    hierarchical_risk_coverage,
    negative_log_likelihood,
    selective_curve,
    selective_scores,
)
from modeling_hierarchical import hierarchical_log_probabilities

logger = logging.get_logger(__name__)

# Temperatures are kept in [0.01, 100]: at 100 a head's probabilities are practically uniform, so the consistent
# distribution is practically the other head's alone.
LOG_TEMPERATURE_RANGE = (math.log(0.01), math.log(100.0))
THRESHOLD_GRID = np.arange(1000, 0, -1) / 1000  # 1.000, 0.999, ..., 0.001: tested from the most conservative down


@dataclass
class CalibrationArguments:
    """What happens after evaluation on the validation split: temperature scaling and the selective threshold."""

    calibrate: bool = field(
        default=True,
        metadata={
            "help": "With --do_eval: fit one temperature per head on the validation split and choose the selective "
            "threshold; both are stored in the saved model's config."
        },
    )
    selective_target_accuracy: float | None = field(
        default=0.9,
        metadata={
            "help": "Accuracy that the selective answers (class, else superclass, else 'unknown') must reach on new "
            "data; the threshold is chosen for it. 0 (or null in a JSON file) skips choosing a threshold."
        },
    )
    selective_confidence: float = field(
        default=0.9,
        metadata={"help": "Probability that the chosen threshold meets the target on new data (1 - delta)."},
    )
    calibration_split_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Share of the validation split used to fit the temperatures and choose the threshold; the other "
            "images (drawn with --seed) measure them, reported as eval_heldout_* metrics and in eval_report.md."
        },
    )

    def __post_init__(self) -> None:
        if self.selective_target_accuracy == 0:
            self.selective_target_accuracy = None
        for name, value in (
            ("selective_target_accuracy", self.selective_target_accuracy),
            ("selective_confidence", self.selective_confidence),
        ):
            if value is not None and not 0 < value < 1:  # NaN fails too
                raise ValueError(f"--{name} must be in (0, 1), got {value}")
        if not 0 < self.calibration_split_fraction <= 1:
            raise ValueError(f"--calibration_split_fraction must be in (0, 1], got {self.calibration_split_fraction}")


# ----------------------------------------------------------------------------------------------------------------
# Temperature scaling
# ----------------------------------------------------------------------------------------------------------------


def _check_predictions(
    logits: np.ndarray | torch.Tensor,
    coarse_logits: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    coarse_labels: np.ndarray | torch.Tensor,
    config: HierarchicalEfficientNetV2Config,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """As float32/int64 tensors, after checking shapes, label ranges and that the logits are finite."""
    logits, coarse_logits = torch.as_tensor(logits).float(), torch.as_tensor(coarse_logits).float()
    labels, coarse_labels = torch.as_tensor(labels).long(), torch.as_tensor(coarse_labels).long()
    n = len(labels)
    if n == 0 or labels.ndim != 1:
        raise ValueError(f"labels must be a non-empty (n,) array of class ids, got shape {tuple(labels.shape)}")
    for name, array, shape in (
        ("logits", logits, (n, config.num_labels)),
        ("coarse_logits", coarse_logits, (n, config.num_coarse_labels)),
        ("coarse_labels", coarse_labels, (n,)),
    ):
        if tuple(array.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (n = len(labels)), got {tuple(array.shape)}")
    for name, array in (("logits", logits), ("coarse_logits", coarse_logits)):
        if not torch.isfinite(array).all():
            raise ValueError(f"{name} hold {int((~torch.isfinite(array)).sum())} NaN or infinite values")
    for name, array, classes in (
        ("labels", labels, config.num_labels),
        ("coarse_labels", coarse_labels, config.num_coarse_labels),
    ):
        if int(array.min()) < 0 or int(array.max()) >= classes:
            raise ValueError(f"{name} must lie in [0, {classes}), got {int(array.min())} to {int(array.max())}")
    return logits, coarse_logits, labels, coarse_labels


def hierarchical_nll(
    logits: torch.Tensor,
    coarse_logits: torch.Tensor,
    labels: torch.Tensor,
    coarse_labels: torch.Tensor,
    fine_to_coarse: torch.Tensor,
    fine_temperature: float | torch.Tensor = 1.0,
    coarse_temperature: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean negative log-likelihood of the true class and of the true superclass under the consistent
    probabilities (`hierarchical_log_probabilities`) at the given temperatures: `(fine_nll, coarse_nll)`."""
    log_fine, log_coarse = hierarchical_log_probabilities(
        logits, coarse_logits, fine_to_coarse, fine_temperature, coarse_temperature
    )
    fine_nll = -log_fine.gather(1, labels.unsqueeze(1)).mean()
    coarse_nll = -log_coarse.gather(1, coarse_labels.unsqueeze(1)).mean()
    return fine_nll, coarse_nll


def fit_temperatures(
    logits: np.ndarray | torch.Tensor,
    coarse_logits: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    coarse_labels: np.ndarray | torch.Tensor,
    config: HierarchicalEfficientNetV2Config,
    max_iter: int = 100,
) -> tuple[float, float]:
    """Fit `(fine_temperature, coarse_temperature)` on held-out predictions.

    The two scalars minimise the negative log-likelihood of the true class plus that of the true superclass under
    the consistent probabilities the model predicts with ([`hierarchical_log_probabilities`]). They are optimised
    as logarithms (so they stay positive), within [0.01, 100], with L-BFGS. Dividing logits by a positive temperature never changes a
    head's argmax; it makes the scores mean what they say.

    Example:

    ```python
    >>> fine_t, coarse_t = fit_temperatures(logits, coarse_logits, labels, coarse_labels, model.config)
    >>> model.config.fine_temperature, model.config.coarse_temperature = fine_t, coarse_t
    ```
    """
    logits, coarse_logits, labels, coarse_labels = _check_predictions(
        logits, coarse_logits, labels, coarse_labels, config
    )
    fine_to_coarse = config.fine_to_coarse_tensor()
    log_temperatures = torch.zeros(2, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperatures], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        temperatures = log_temperatures.clamp(*LOG_TEMPERATURE_RANGE).exp()
        fine_nll, coarse_nll = hierarchical_nll(
            logits, coarse_logits, labels, coarse_labels, fine_to_coarse, temperatures[0], temperatures[1]
        )
        loss = fine_nll + coarse_nll
        loss.backward()
        return loss

    optimizer.step(closure)
    fine_temperature, coarse_temperature = (
        float(t) for t in log_temperatures.detach().clamp(*LOG_TEMPERATURE_RANGE).exp()
    )
    if not all(math.isfinite(t) and t > 0 for t in (fine_temperature, coarse_temperature)):
        raise ValueError(f"temperature fitting diverged: got {fine_temperature}, {coarse_temperature}")
    return fine_temperature, coarse_temperature


# ----------------------------------------------------------------------------------------------------------------
# The selective threshold
# ----------------------------------------------------------------------------------------------------------------


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
    for name, value in (("target_accuracy", target_accuracy), ("confidence", confidence)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    if not 0 <= start_coverage < 1:
        raise ValueError(f"start_coverage must be in [0, 1), got {start_coverage}")
    thresholds = THRESHOLD_GRID if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    n = len(fine_confidence)
    counts = selective_curve(fine_confidence, fine_correct, coarse_confidence, coarse_correct, thresholds)
    answered, correct = counts["answered"], counts["correct"]
    error_rate, delta = 1.0 - target_accuracy, 1.0 - confidence
    min_answered = max(math.ceil(math.log(delta) / math.log(1.0 - error_rate)), math.ceil(start_coverage * n))
    start = int(np.argmax(answered >= min_answered)) if (answered >= min_answered).any() else len(thresholds)
    p_values = np.ones(len(thresholds))
    if start < len(thresholds):  # thresholds with the same answers share one p-value
        pairs, inverse = np.unique(
            np.stack([answered[start:] - correct[start:], answered[start:]]), axis=1, return_inverse=True
        )
        p_values[start:] = binomial_cdf(pairs[0], pairs[1], error_rate)[inverse.reshape(-1)]
    result = SelectiveThreshold(None, target_accuracy, confidence, n)
    for index in range(start, len(thresholds)):
        result.tested += 1
        if p_values[index] > delta:
            break
        result.threshold = float(thresholds[index])
        result.answered, result.correct = int(answered[index]), int(correct[index])
    if result.threshold is not None:
        result.accuracy_lower_bound = accuracy_lower_bound(result.correct, result.answered, confidence)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Metrics for a config on a split
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class HierarchicalScores:
    """Per-image confidences and correctness of the consistent probabilities at given temperatures.

    Args:
        fine_confidence, fine_correct: probability of the best class (joint distribution) and whether it is right.
        coarse_confidence, coarse_correct: the same for the best superclass (summed joint probabilities).
        log_fine, log_coarse (`np.ndarray`): `(n, num_labels)` and `(n, num_coarse_labels)` log-probabilities.
    """

    fine_confidence: np.ndarray
    fine_correct: np.ndarray
    coarse_confidence: np.ndarray
    coarse_correct: np.ndarray
    log_fine: np.ndarray
    log_coarse: np.ndarray


def hierarchical_scores(
    logits: np.ndarray | torch.Tensor,
    coarse_logits: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    coarse_labels: np.ndarray | torch.Tensor,
    config: HierarchicalEfficientNetV2Config,
    calibrated: bool = True,
) -> HierarchicalScores:
    """[`HierarchicalScores`] of predictions, with the config's temperatures (`calibrated`) or with none."""
    logits, coarse_logits, labels, coarse_labels = _check_predictions(
        logits, coarse_logits, labels, coarse_labels, config
    )
    temperatures = (config.fine_temperature, config.coarse_temperature) if calibrated else (1.0, 1.0)
    with torch.no_grad():
        log_fine, log_coarse = hierarchical_log_probabilities(
            logits, coarse_logits, config.fine_to_coarse_tensor(), *temperatures
        )
    fine_confidence, fine_ids = log_fine.exp().max(-1)
    coarse_confidence, coarse_ids = log_coarse.exp().max(-1)
    return HierarchicalScores(
        fine_confidence=fine_confidence.numpy().astype(np.float64),
        fine_correct=(fine_ids == labels).numpy(),
        coarse_confidence=coarse_confidence.numpy().astype(np.float64),
        coarse_correct=(coarse_ids == coarse_labels).numpy(),
        log_fine=log_fine.numpy(),
        log_coarse=log_coarse.numpy(),
    )


def evaluate_calibration(
    logits: np.ndarray | torch.Tensor,
    coarse_logits: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    coarse_labels: np.ndarray | torch.Tensor,
    config: HierarchicalEfficientNetV2Config,
) -> dict[str, float]:
    """Calibration and selective-prediction metrics of a model's config (temperatures, threshold) on predictions.

    Both levels read the consistent probabilities the model predicts with. Returns:

    - `fine_ece`, `coarse_ece` (15 bins), `fine_nll`, `coarse_nll`, `fine_brier`, `coarse_brier` with the config's
      temperatures, and the same with the suffix `_uncalibrated` (temperatures 1);
    - `selective_haurc`: area under the hierarchical risk-coverage curve (lower is better);
    - with `config.selective_threshold`: `selective_fine_coverage`, `selective_coarse_coverage`,
      `selective_abstention_rate`, `selective_accuracy`;
    - the superclass read four ways: `coarse_head_accuracy` (argmax of the coarse head), `coarse_summed_fine_accuracy`
      (superclass with the most fine-head probability), `coarse_consistent_accuracy` (parent of the consistent
      class prediction, as `predict_hierarchical` returns), `coarse_combined_accuracy` (the most probable
      superclass of the consistent distribution, as coarse answers use), and `fine_consistent_accuracy`;
    - `fine_temperature`, `coarse_temperature` and `selective_threshold` (when set).
    """
    logits, coarse_logits, labels, coarse_labels = _check_predictions(
        logits, coarse_logits, labels, coarse_labels, config
    )
    metrics: dict[str, float] = {}
    for calibrated, suffix in ((False, "_uncalibrated"), (True, "")):
        scores = hierarchical_scores(logits, coarse_logits, labels, coarse_labels, config, calibrated)
        for level, confidence, correct, log_probs, targets in (
            ("fine", scores.fine_confidence, scores.fine_correct, scores.log_fine, labels.numpy()),
            ("coarse", scores.coarse_confidence, scores.coarse_correct, scores.log_coarse, coarse_labels.numpy()),
        ):
            metrics[f"{level}_ece{suffix}"] = expected_calibration_error(confidence, correct, ECE_BINS)
            metrics[f"{level}_nll{suffix}"] = negative_log_likelihood(log_probs, targets)
            metrics[f"{level}_brier{suffix}"] = brier_score(np.exp(log_probs), targets)
    # `scores` now holds the calibrated ones
    curve = hierarchical_risk_coverage(
        scores.fine_confidence, scores.fine_correct, scores.coarse_confidence, scores.coarse_correct
    )
    metrics["selective_haurc"] = curve["haurc"]
    if config.selective_threshold is not None:
        metrics |= selective_scores(
            scores.fine_confidence,
            scores.fine_correct,
            scores.coarse_confidence,
            scores.coarse_correct,
            config.selective_threshold,
        )
    fine_to_coarse = config.fine_to_coarse_tensor()
    summed_fine = torch.zeros(len(labels), config.num_coarse_labels).index_add_(1, fine_to_coarse, logits.softmax(-1))
    consistent_fine = torch.as_tensor(scores.log_fine).argmax(-1)
    metrics |= {
        "coarse_head_accuracy": _mean(coarse_logits.argmax(-1) == coarse_labels),
        "coarse_summed_fine_accuracy": _mean(summed_fine.argmax(-1) == coarse_labels),
        "coarse_consistent_accuracy": _mean(fine_to_coarse[consistent_fine] == coarse_labels),
        "coarse_combined_accuracy": float(scores.coarse_correct.mean()),
        "fine_consistent_accuracy": float(scores.fine_correct.mean()),
        "fine_temperature": float(config.fine_temperature),
        "coarse_temperature": float(config.coarse_temperature),
    }
    if config.selective_threshold is not None:
        metrics["selective_threshold"] = float(config.selective_threshold)
    return metrics


def _mean(values: torch.Tensor) -> float:
    return float(values.float().mean())


# ----------------------------------------------------------------------------------------------------------------
# After training
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CalibrationResult:
    """What [`calibrate_and_select`] did.

    Args:
        metrics (`dict[str, float]`): `eval_*` metrics on the calibration images and `eval_heldout_*` ones on the
            held-out images.
        calibration_rows (`np.ndarray`): rows of the validation predictions used to fit and choose.
        heldout_rows (`np.ndarray`, *optional*): the other rows (`None` when all were used).
        threshold (`SelectiveThreshold`, *optional*): the threshold search, when a target was given.
    """

    metrics: dict[str, float]
    calibration_rows: np.ndarray
    heldout_rows: np.ndarray | None
    threshold: SelectiveThreshold | None


def split_rows(num_samples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A seeded split of `range(num_samples)` into a `fraction` for calibration and the rest (sorted rows)."""
    if fraction >= 1.0:
        return np.arange(num_samples), None
    count = int(round(fraction * num_samples))
    if not 0 < count < num_samples:
        raise ValueError(
            f"calibration_split_fraction {fraction} of {num_samples} validation images leaves an empty part"
        )
    order = np.random.default_rng(seed).permutation(num_samples)
    return np.sort(order[:count]), np.sort(order[count:])


def subset_prediction(prediction: PredictionOutput, rows: np.ndarray) -> PredictionOutput:
    """The rows `rows` of a `Trainer.predict` output (predictions and label ids; no metrics)."""
    return PredictionOutput(
        predictions=tuple(np.asarray(array)[rows] for array in prediction.predictions),
        label_ids=tuple(np.asarray(array)[rows] for array in prediction.label_ids),
        metrics={},
    )


def calibrate_and_select(
    config: HierarchicalEfficientNetV2Config, prediction: PredictionOutput, args: CalibrationArguments, seed: int
) -> CalibrationResult:
    """Fit the temperatures and choose the selective threshold on validation predictions (`Trainer.predict` output
    with predictions `(logits, coarse_logits)` and label ids `(labels, coarse_labels)`), store them in `config`,
    and measure them (on the held-out part too, with `args.calibration_split_fraction < 1`).

    Without a target accuracy, any threshold already in `config` is removed: it was chosen for other temperatures.
    """
    logits, coarse_logits = (np.asarray(array) for array in prediction.predictions)
    labels, coarse_labels = (np.asarray(array) for array in prediction.label_ids)
    rows, heldout = split_rows(len(labels), args.calibration_split_fraction, seed)
    part = (logits[rows], coarse_logits[rows], labels[rows], coarse_labels[rows])
    config.fine_temperature, config.coarse_temperature = fit_temperatures(*part, config)
    logger.info(
        "Calibrated on %d validation images: fine temperature %.3f, coarse temperature %.3f",
        len(rows),
        config.fine_temperature,
        config.coarse_temperature,
    )
    config.selective_threshold = config.selective_target_accuracy = config.selective_confidence = None
    search = None
    if args.selective_target_accuracy is not None:
        scores = hierarchical_scores(*part, config)
        search = choose_selective_threshold(
            scores.fine_confidence,
            scores.fine_correct,
            scores.coarse_confidence,
            scores.coarse_correct,
            args.selective_target_accuracy,
            args.selective_confidence,
        )
        if search.threshold is None:
            logger.warning(
                "No confidence threshold reaches an accuracy of %s with confidence %s on %d calibration images: "
                "the model keeps no selective_threshold (lower --selective_target_accuracy, or calibrate on more "
                "images)",
                args.selective_target_accuracy,
                args.selective_confidence,
                len(rows),
            )
        else:
            config.selective_threshold = search.threshold
            config.selective_target_accuracy = args.selective_target_accuracy
            config.selective_confidence = args.selective_confidence
            logger.info(
                "Selective threshold %.3f: %d of %d calibration images answered, accuracy %.4f (at least %.4f with "
                "confidence %s)",
                search.threshold,
                search.answered,
                len(rows),
                search.correct / search.answered,
                search.accuracy_lower_bound,
                args.selective_confidence,
            )
    config.validate_hierarchy()
    metrics = {f"eval_{name}": value for name, value in evaluate_calibration(*part, config).items()}
    metrics["eval_calibration_samples"] = float(len(rows))
    if search is not None:
        metrics["eval_selective_target_accuracy"] = float(args.selective_target_accuracy)
        metrics["eval_selective_confidence"] = float(args.selective_confidence)
        if search.threshold is not None:
            metrics["eval_selective_accuracy_lower_bound"] = search.accuracy_lower_bound
    if heldout is not None:
        held = (logits[heldout], coarse_logits[heldout], labels[heldout], coarse_labels[heldout])
        metrics |= {f"eval_heldout_{name}": value for name, value in evaluate_calibration(*held, config).items()}
        metrics["eval_heldout_samples"] = float(len(heldout))
    return CalibrationResult(metrics, rows, heldout, search)


__all__ = [
    "CalibrationArguments",
    "CalibrationResult",
    "SelectiveThreshold",
    "accuracy_lower_bound",
    "binomial_cdf",
    "calibrate_and_select",
    "choose_selective_threshold",
    "evaluate_calibration",
    "fit_temperatures",
    "hierarchical_nll",
    "hierarchical_scores",
    "split_rows",
    "subset_prediction",
]
