"""Calibrated scores and selective answers for the hierarchical classifier, after training.

- [`fit_temperatures`] (`hierarchical/evaluation/temperature_scaling.py`): one temperature per head, fitted by L-BFGS on the negative
  log-likelihood of the consistent probabilities at both levels (held-out logits, a few seconds on CPU).
- [`choose_selective_threshold`] (`hierarchical/evaluation/selective_threshold.py`): the lowest confidence threshold whose answers (class,
  else superclass, else abstain) reach a target accuracy on new data with a stated confidence, by fixed-sequence
  binomial tests over a grid of thresholds (Learn-then-Test).
- [`evaluate_calibration`]: calibration error, likelihood, Brier score, the risk-coverage area, the outcome of the
  stored threshold, and four ways to read the superclass, for a model's config on any split.
- [`calibrate_and_select`]: all of that after training, on the validation predictions; the results go into the
  model's config (saved and pushed with it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.trainer_utils import PredictionOutput
from transformers.utils import logging

from configuration_hierarchical import HierarchicalEfficientNetV2Config, check_unit_interval
from hierarchical.evaluation.metrics import (
    ECE_BINS,
    brier_score,
    expected_calibration_error,
    hierarchical_risk_coverage,
    negative_log_likelihood,
    selective_scores,
)
from hierarchical.evaluation.selective_threshold import (
    DEFAULT_START_COVERAGES,
    SelectiveThreshold,
    check_start_coverages,
    choose_selective_threshold,
    guarantee_text,
    seeded_split,
)
from hierarchical.evaluation.temperature_scaling import Array, check_predictions, fit_temperatures
from hierarchical.options import option
from prediction_hierarchical import hierarchical_log_probabilities

logger = logging.get_logger(__name__)

# Below this many calibration images the run keeps temperature 1 and no selective threshold. Measured with
# benchmarks/selective_simulation.py (temperatures part, an accurate and a weak simulated model): fitted on 3
# images, the temperatures made the likelihood on new images worse than temperature 1 in 40-70% of draws (up to
# 16x); from 20 images on, no draw was worse. 50 leaves a margin for models unlike the simulated ones.
MIN_CALIBRATION_IMAGES = 50


@dataclass
class CalibrationArguments:
    """What happens after evaluation on the validation split: temperature scaling and the selective threshold."""

    calibrate: bool = option(
        True,
        "With --do_eval: fit one temperature per head on the validation split and choose the selective "
        "threshold; both are stored in the saved model's config.",
    )
    selective_target_accuracy: float | None = option(
        0.9,
        "Accuracy that the selective answers (class, else superclass, else 'unknown') must reach on new "
        "data; the threshold is chosen for it. 0 skips choosing a threshold.",
    )
    selective_confidence: float = option(
        0.9,
        "1 - delta of the threshold search. Guaranteed: over the draw of the calibration images, the chance that "
        "a threshold is chosen AND its accuracy on new data is below --selective_target_accuracy is at most "
        "1 - this. It is not the chance that a stored threshold meets the target: given that one was chosen, its "
        "miss rate can be higher, most near the highest accuracy the model can reach.",
    )
    selective_start_coverage: list[float] = option(
        default_factory=lambda: list(DEFAULT_START_COVERAGES),
        help="Where each search sequence starts: the first threshold that answers this share of the start images "
        "(a seeded share of the calibration images, drawn with --seed, that places the starts and is not tested "
        "on), one sequence from each share (several share the error budget 1 - --selective_confidence equally). "
        "A small start finds thresholds for high targets that only the most confident images reach; a larger one "
        "is surer for low targets. 0 starts where a test could first pass. Default from "
        "benchmarks/selective_simulation.py.",
    )
    calibration_split_fraction: float = option(
        1.0,
        "Share of the validation split used to fit the temperatures and choose the threshold; the other "
        "images (drawn with --seed) measure them, reported as eval_heldout_* metrics and in eval_report.md.",
    )

    def __post_init__(self) -> None:
        if self.selective_target_accuracy == 0:
            self.selective_target_accuracy = None
        for name in ("selective_target_accuracy", "selective_confidence"):
            if getattr(self, name) is not None:
                check_unit_interval(f"--{name}", getattr(self, name))
        check_unit_interval("--calibration_split_fraction", self.calibration_split_fraction, "(0, 1]")
        check_start_coverages("--selective_start_coverage", self.selective_start_coverage)


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

    def confidences_and_correct(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`(fine_confidence, fine_correct, coarse_confidence, coarse_correct)`: what the selective functions take."""
        return self.fine_confidence, self.fine_correct, self.coarse_confidence, self.coarse_correct


def hierarchical_scores(
    logits: Array,
    coarse_logits: Array,
    labels: Array,
    coarse_labels: Array,
    config: HierarchicalEfficientNetV2Config,
    calibrated: bool = True,
) -> HierarchicalScores:
    """[`HierarchicalScores`] of predictions, with the config's temperatures (`calibrated`) or with none."""
    logits, coarse_logits, labels, coarse_labels = check_predictions(
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
    logits: Array, coarse_logits: Array, labels: Array, coarse_labels: Array, config: HierarchicalEfficientNetV2Config
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
      class prediction, `parent_ids`), `coarse_combined_accuracy` (the most probable superclass of the consistent
      distribution: what `predict_hierarchical`, the hierarchical pipeline and superclass answers return), and
      `fine_consistent_accuracy`;
    - `fine_temperature`, `coarse_temperature` and `selective_threshold` (when set).
    """
    logits, coarse_logits, labels, coarse_labels = check_predictions(
        logits, coarse_logits, labels, coarse_labels, config
    )
    metrics: dict[str, float] = {}
    for calibrated, suffix in ((False, "_uncalibrated"), (True, "")):
        scores = hierarchical_scores(logits, coarse_logits, labels, coarse_labels, config, calibrated)
        metrics |= _calibration_metrics(scores, labels.numpy(), coarse_labels.numpy(), suffix)
    # `scores` now holds the calibrated ones
    metrics |= _selective_metrics(scores, config.selective_threshold)
    metrics |= _superclass_accuracies(logits, coarse_logits, coarse_labels, scores, config)
    metrics["fine_temperature"] = float(config.fine_temperature)
    metrics["coarse_temperature"] = float(config.coarse_temperature)
    if config.selective_threshold is not None:
        metrics["selective_threshold"] = float(config.selective_threshold)
    return metrics


def _calibration_metrics(
    scores: HierarchicalScores, labels: np.ndarray, coarse_labels: np.ndarray, suffix: str
) -> dict[str, float]:
    """Calibration error, likelihood and Brier score at both levels, named `{level}_{metric}{suffix}`."""
    metrics = {}
    for level, confidence, correct, log_probs, targets in (
        ("fine", scores.fine_confidence, scores.fine_correct, scores.log_fine, labels),
        ("coarse", scores.coarse_confidence, scores.coarse_correct, scores.log_coarse, coarse_labels),
    ):
        metrics[f"{level}_ece{suffix}"] = expected_calibration_error(confidence, correct, ECE_BINS)
        metrics[f"{level}_nll{suffix}"] = negative_log_likelihood(log_probs, targets)
        metrics[f"{level}_brier{suffix}"] = brier_score(np.exp(log_probs), targets)
    return metrics


def _selective_metrics(scores: HierarchicalScores, threshold: float | None) -> dict[str, float]:
    """The area under the risk-coverage curve, and the outcome of `threshold` when there is one."""
    metrics = {"selective_haurc": hierarchical_risk_coverage(*scores.confidences_and_correct())["haurc"]}
    if threshold is not None:
        metrics |= selective_scores(*scores.confidences_and_correct(), threshold)
    return metrics


def _superclass_accuracies(
    logits: torch.Tensor,
    coarse_logits: torch.Tensor,
    coarse_labels: torch.Tensor,
    scores: HierarchicalScores,
    config: HierarchicalEfficientNetV2Config,
) -> dict[str, float]:
    """The superclass read four ways, and the consistent class accuracy (see [`evaluate_calibration`])."""
    fine_to_coarse = config.fine_to_coarse_tensor()
    summed_fine = torch.zeros(len(coarse_labels), config.num_coarse_labels).index_add_(
        1, fine_to_coarse, logits.softmax(-1)
    )
    consistent_fine = torch.as_tensor(scores.log_fine).argmax(-1)
    return {
        "coarse_head_accuracy": _mean(coarse_logits.argmax(-1) == coarse_labels),
        "coarse_summed_fine_accuracy": _mean(summed_fine.argmax(-1) == coarse_labels),
        "coarse_consistent_accuracy": _mean(fine_to_coarse[consistent_fine] == coarse_labels),
        "coarse_combined_accuracy": float(scores.coarse_correct.mean()),
        "fine_consistent_accuracy": float(scores.fine_correct.mean()),
    }


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


def calibration_count(num_samples: int, fraction: float) -> int:
    """How many of `num_samples` validation images `--calibration_split_fraction` (`fraction`) calibrates on;
    `ValueError` naming the option and both parts' sizes when one part would be empty."""
    count = num_samples if fraction >= 1.0 else int(round(fraction * num_samples))
    if not 0 < count <= num_samples or (fraction < 1.0 and count == num_samples):
        raise ValueError(
            f"--calibration_split_fraction {fraction} of {num_samples} validation images leaves an empty part: "
            f"{count} to calibrate on and {num_samples - count} held out; give a share that leaves both non-empty"
        )
    return count


def split_rows(num_samples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A seeded split of `range(num_samples)` into a `fraction` for calibration and the rest (sorted rows)."""
    if fraction >= 1.0:
        return np.arange(num_samples), None
    return seeded_split(num_samples, calibration_count(num_samples, fraction), seed)


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
    With fewer than `MIN_CALIBRATION_IMAGES` calibration images, the temperatures are set to 1 and no threshold is
    kept, and `eval_calibration_skipped` in the metrics says why.
    """
    rows, heldout = split_rows(len(prediction.label_ids[0]), args.calibration_split_fraction, seed)
    part = _prediction_arrays(prediction, rows)  # (logits, coarse_logits, labels, coarse_labels)
    config.selective_threshold = config.selective_target_accuracy = config.selective_confidence = None
    skipped = None
    if len(rows) < MIN_CALIBRATION_IMAGES:
        config.fine_temperature = config.coarse_temperature = 1.0
        skipped = (
            f"only {len(rows)} calibration images, fewer than the {MIN_CALIBRATION_IMAGES} that temperatures and a "
            "selective threshold need: temperatures kept at 1, no selective threshold"
        )
        logger.warning("Not calibrated: %s (calibrate on more validation images)", skipped)
        search = None
    else:
        config.fine_temperature, config.coarse_temperature = fit_temperatures(*part, config)
        logger.info(
            "Calibrated on %d validation images: fine temperature %.3f, coarse temperature %.3f (a temperature "
            "never changes a head's own argmax, but can change the consistent prediction)",
            len(rows),
            config.fine_temperature,
            config.coarse_temperature,
        )
        search = None if args.selective_target_accuracy is None else _select_threshold(config, part, args, seed)
    config.validate_hierarchy()
    metrics = {f"eval_{name}": value for name, value in evaluate_calibration(*part, config).items()}
    metrics["eval_calibration_samples"] = float(len(rows))
    if skipped is not None:
        metrics["eval_calibration_skipped"] = skipped
    if search is not None:
        metrics |= _search_metrics(search)
    if heldout is not None:
        held = _prediction_arrays(prediction, heldout)
        metrics |= {f"eval_heldout_{name}": value for name, value in evaluate_calibration(*held, config).items()}
        metrics["eval_heldout_samples"] = float(len(heldout))
    return CalibrationResult(metrics, rows, heldout, search)


def _search_metrics(search: SelectiveThreshold) -> dict[str, float | str]:
    """What a user needs to judge the threshold search: its target, confidence and the guarantee in words, how many
    calibration images placed the starts and how many the thresholds were tested on, and for the chosen threshold
    the tested images it answered, how many rightly, and the lower bound from them."""
    metrics: dict[str, float | str] = {
        "eval_selective_target_accuracy": float(search.target_accuracy),
        "eval_selective_confidence": float(search.confidence),
        "eval_selective_guarantee": guarantee_text(search.target_accuracy, search.confidence),
        "eval_selective_start_samples": float(search.start_samples),
        "eval_selective_test_samples": float(search.test_samples),
    }
    if search.threshold is not None:
        metrics["eval_selective_answered"] = float(search.answered)
        metrics["eval_selective_correct"] = float(search.correct)
        metrics["eval_selective_accuracy_lower_bound"] = search.accuracy_lower_bound
    return metrics


def _prediction_arrays(prediction: PredictionOutput, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """`(logits, coarse_logits, labels, coarse_labels)` at the rows `rows` of a `Trainer.predict` output."""
    subset = subset_prediction(prediction, rows)
    return (*subset.predictions, *subset.label_ids)


def _select_threshold(
    config: HierarchicalEfficientNetV2Config, part: tuple[np.ndarray, ...], args: CalibrationArguments, seed: int
) -> SelectiveThreshold:
    """Choose the selective threshold on the calibration images `part`, with the config's (new) temperatures (the
    images that place the search's starts drawn with `seed`); store it in `config` when one passed."""
    scores = hierarchical_scores(*part, config)
    search = choose_selective_threshold(
        *scores.confidences_and_correct(),
        args.selective_target_accuracy,
        args.selective_confidence,
        start_coverages=tuple(args.selective_start_coverage),
        seed=seed,
    )
    if search.threshold is None:
        logger.warning(
            "No confidence threshold is certified for an accuracy of %s with confidence %s on %d calibration "
            "images (searched from thresholds answering %s of %d other images): the model keeps no "
            "selective_threshold (lower --selective_target_accuracy, calibrate on more images, or try a smaller "
            "--selective_start_coverage)",
            args.selective_target_accuracy,
            args.selective_confidence,
            search.test_samples,
            " and ".join(f"{c:.1%}" for c in search.start_coverages),
            search.start_samples,
        )
        return search
    config.selective_threshold = search.threshold
    config.selective_target_accuracy = args.selective_target_accuracy
    config.selective_confidence = args.selective_confidence
    logger.info(
        "Selective threshold %.3f: %d of %d calibration images answered, %d rightly (accuracy %.4f, lower bound "
        "%.4f; %d other calibration images placed where the search started); %s",
        search.threshold,
        search.answered,
        search.test_samples,
        search.correct,
        search.correct / search.answered,
        search.accuracy_lower_bound,
        search.start_samples,
        guarantee_text(args.selective_target_accuracy, args.selective_confidence),
    )
    return search


__all__ = [
    "CalibrationArguments",
    "CalibrationResult",
    "HierarchicalScores",
    "MIN_CALIBRATION_IMAGES",
    "calibrate_and_select",
    "calibration_count",
    "evaluate_calibration",
    "hierarchical_scores",
    "split_rows",
    "subset_prediction",
]
