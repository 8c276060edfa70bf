"""Tests of calibration and selective prediction: metrics, temperature scaling, the threshold's guarantee, and the
training script's calibration step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.trainer_utils import PredictionOutput

from configuration_hierarchical import HierarchicalEfficientNetV2Config
from conftest import small_config, tiny_args
from hierarchical.evaluation.calibration import (
    MIN_CALIBRATION_IMAGES,
    CalibrationArguments,
    calibrate_and_select,
    evaluate_calibration,
    hierarchical_scores,
    split_rows,
)
from hierarchical.evaluation.metrics import (
    brier_score,
    expected_calibration_error,
    hierarchical_risk_coverage,
    negative_log_likelihood,
    reliability_bins,
    selective_curve,
    selective_scores,
)
from hierarchical.evaluation.report_markdown import selective_answer_lines
from hierarchical.evaluation.selective_threshold import (
    DEFAULT_START_COVERAGES,
    accuracy_lower_bound,
    binomial_cdf,
    choose_selective_threshold,
    start_split,
)
from hierarchical.evaluation.temperature_scaling import fit_temperatures, hierarchical_nll
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification, build_image_processor
from run_classification import main, parse_args


def overconfident_predictions(
    config: HierarchicalEfficientNetV2Config, n: int, sharpen: float = 3.0, seed: int = 0, scale: float = 2.5
) -> dict[str, np.ndarray]:
    """Labels drawn from known probabilities; the model's logits are the true ones times `sharpen` (> 1:
    over-confident), the coarse head the true superclass log-probabilities times `sharpen` plus noise."""
    rng = np.random.default_rng(seed)
    fine_to_coarse = np.asarray(config.fine_to_coarse)
    true_logits = rng.normal(size=(n, config.num_labels)) * scale
    probs = torch.tensor(true_logits).softmax(-1).numpy()
    labels = (probs.cumsum(1) > rng.random((n, 1))).argmax(1)
    coarse_probs = np.stack([probs[:, fine_to_coarse == c].sum(1) for c in range(config.num_coarse_labels)], 1)
    return {
        "logits": true_logits * sharpen,
        "coarse_logits": np.log(coarse_probs) * sharpen + rng.normal(size=coarse_probs.shape),
        "labels": labels,
        "coarse_labels": fine_to_coarse[labels],
    }


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def test_expected_calibration_error_on_a_hand_made_example():
    confidences = np.array([0.9, 0.9, 0.6, 0.6])
    correct = np.array([1, 0, 1, 1])
    # 15 bins: 0.9 falls in bin 13 (accuracy 0.5, gap 0.4), 0.6 in bin 8 (accuracy 1.0, gap 0.4), half the images each
    assert expected_calibration_error(confidences, correct) == pytest.approx(0.4)
    bins = reliability_bins(confidences, correct)
    assert bins["counts"].tolist() == [0] * 8 + [2] + [0] * 4 + [2, 0]
    assert bins["accuracy"][13] == 0.5 and bins["confidence"][8] == pytest.approx(0.6)
    assert expected_calibration_error(np.array([0.75, 0.75, 0.75, 0.75]), np.array([1, 1, 1, 0])) == 0.0
    with pytest.raises(ValueError, match=r"confidences must lie in \[0, 1\]"):
        expected_calibration_error(np.array([1.5]), np.array([1]))


def test_nll_and_brier_on_a_hand_made_example():
    probs = np.array([[0.5, 0.5, 0.0], [0.1, 0.8, 0.1]])
    labels = np.array([0, 1])
    with np.errstate(divide="ignore"):  # log(0) = -inf, never read
        log_probs = np.log(probs)
    assert negative_log_likelihood(log_probs, labels) == pytest.approx(-(math.log(0.5) + math.log(0.8)) / 2)
    # (0.25 + 0.25) and (0.01 + 0.04 + 0.01)
    assert brier_score(probs, labels) == pytest.approx((0.5 + 0.06) / 2)


def test_hierarchical_risk_coverage_on_a_hand_made_example():
    fine_confidence, fine_correct = np.array([0.9, 0.5, 0.2]), np.array([1, 0, 0])
    coarse_confidence, coarse_correct = np.array([0.95, 0.8, 0.3]), np.array([1, 1, 0])
    curve = hierarchical_risk_coverage(fine_confidence, fine_correct, coarse_confidence, coarse_correct)
    assert curve["thresholds"].tolist() == [0.95, 0.9, 0.8, 0.5, 0.3, 0.2]
    np.testing.assert_allclose(curve["coverage"], [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(curve["fine_share"], [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(curve["risk"], [0, 0, 0, 0.5, 2 / 3, 2 / 3])
    assert curve["haurc"] == pytest.approx(2 / 9)  # only the last third is answered with errors (2 of 3)
    at = selective_scores(fine_confidence, fine_correct, coarse_confidence, coarse_correct, 0.8)
    assert at == pytest.approx(
        {
            "selective_fine_coverage": 1 / 3,
            "selective_coarse_coverage": 1 / 3,
            "selective_abstention_rate": 1 / 3,
            "selective_accuracy": 1.0,
        }
    )
    nothing = selective_scores(fine_confidence, fine_correct, coarse_confidence, coarse_correct, 0.99)
    assert nothing["selective_abstention_rate"] == 1.0 and "selective_accuracy" not in nothing


def test_binomial_tail_and_accuracy_bound_are_exact():
    for k, n, p in ((0, 5, 0.1), (3, 30, 0.1), (10, 100, 0.2), (60, 60, 0.5), (7, 40, 0.05)):
        direct = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        assert binomial_cdf(np.array([k]), np.array([n]), p)[0] == pytest.approx(direct, rel=1e-9)
    # all answers right: the Clopper-Pearson lower bound solves accuracy**n = 1 - confidence
    assert accuracy_lower_bound(22, 22, 0.9) == pytest.approx(0.1 ** (1 / 22), abs=1e-9)
    assert accuracy_lower_bound(0, 0, 0.9) == 0.0 and accuracy_lower_bound(0, 10, 0.9) == 0.0
    assert accuracy_lower_bound(90, 100, 0.9) < 0.9 < accuracy_lower_bound(900, 1000, 0.5) + 0.01


# ----------------------------------------------------------------------------------------------------------------
# Temperature scaling
# ----------------------------------------------------------------------------------------------------------------


def test_temperatures_reduce_the_likelihood_loss_of_an_overconfident_model():
    config = small_config()
    data = overconfident_predictions(config, n=600, sharpen=3.0)
    tensors = [torch.as_tensor(data[name]) for name in ("logits", "coarse_logits", "labels", "coarse_labels")]
    fine_to_coarse = config.fine_to_coarse_tensor()
    before = [float(v) for v in hierarchical_nll(*[t.float() if t.is_floating_point() else t for t in tensors],
                                                 fine_to_coarse)]  # fmt: skip
    fine_t, coarse_t = fit_temperatures(**data, config=config)
    assert fine_t > 1.5 and coarse_t > 1.5  # over-confident heads get flattened
    after = [
        float(v)
        for v in hierarchical_nll(
            *[t.float() if t.is_floating_point() else t for t in tensors], fine_to_coarse, fine_t, coarse_t
        )
    ]
    assert after[0] < before[0] - 1.0 and after[1] < before[1] - 1.0

    uncalibrated = evaluate_calibration(**data, config=config)
    config.fine_temperature, config.coarse_temperature = fine_t, coarse_t
    calibrated = evaluate_calibration(**data, config=config)
    for level in ("fine", "coarse"):
        assert calibrated[f"{level}_ece"] < 0.1 < 0.3 < uncalibrated[f"{level}_ece"]
        assert calibrated[f"{level}_ece_uncalibrated"] == uncalibrated[f"{level}_ece"]
        assert calibrated[f"{level}_brier"] < uncalibrated[f"{level}_brier"]
        assert calibrated[f"{level}_nll"] == pytest.approx(after[0 if level == "fine" else 1], rel=1e-5)
    # temperatures never change a head's own argmax
    assert calibrated["coarse_head_accuracy"] == uncalibrated["coarse_head_accuracy"]


def test_temperatures_of_a_calibrated_model_stay_near_one():
    config = small_config()
    data = overconfident_predictions(config, n=800, sharpen=1.0)
    data["coarse_logits"] = np.full_like(data["coarse_logits"], 0.0)  # an uninformative coarse head: no double count
    fine_t, _ = fit_temperatures(**data, config=config)
    assert fine_t == pytest.approx(1.0, abs=0.12)


def test_bad_predictions_are_rejected():
    config = small_config()
    data = overconfident_predictions(config, n=20)
    with pytest.raises(ValueError, match="logits hold 20 NaN"):
        fit_temperatures(**(data | {"logits": np.where(np.eye(20, 100) == 1, np.nan, data["logits"])}), config=config)
    with pytest.raises(ValueError, match=r"coarse_logits must have shape \(20, 20\)"):
        evaluate_calibration(**(data | {"coarse_logits": data["coarse_logits"][:, :5]}), config=config)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 100\), got 1\d\d at row 0"):
        evaluate_calibration(**(data | {"labels": data["labels"] + 100}), config=config)


# ----------------------------------------------------------------------------------------------------------------
# The threshold and its guarantee
# ----------------------------------------------------------------------------------------------------------------


def simulate(n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Images with known chances of being right: the class confidence `p`, right with probability `p**1.5`
    (over-confident scores); the superclass confidence `q >= p`, right whenever the class is, else with probability
    `(q - p) / (1 - p)`."""
    p = rng.beta(2.0, 1.2, n)
    q = p + (1 - p) * rng.beta(1.5, 1.5, n)
    fine_correct = rng.random(n) < p**1.5
    coarse_correct = fine_correct | (rng.random(n) < (q - p) / (1 - p))
    return p, fine_correct, q, coarse_correct


def test_chosen_threshold_meets_the_target_with_the_stated_confidence():
    target, confidence, draws = 0.85, 0.9, 200
    rng = np.random.default_rng(0)
    grid = np.arange(1000, 0, -1) / 1000
    population = selective_curve(*simulate(200_000, rng), grid)  # true accuracies, to within about 0.002
    with np.errstate(invalid="ignore"):
        true_accuracy = dict(zip(grid, population["correct"] / population["answered"], strict=True))
    coverage = dict(zip(grid, population["answered"] / population["num_samples"], strict=True))

    chosen, naive = [], []
    for draw in range(draws):
        calibration = simulate(500, rng)
        result = choose_selective_threshold(*calibration, target_accuracy=target, confidence=confidence, seed=draw)
        if result.threshold is not None:  # else nothing is certified: the model answers nothing, wrongly or not
            assert result.accuracy_lower_bound >= target
            chosen.append(result.threshold)
        # the plug-in alternative: the lowest threshold whose calibration accuracy reaches the target
        counts = selective_curve(*calibration, grid)
        reached = counts["correct"] >= target * counts["answered"]
        naive.append(grid[np.flatnonzero(reached & (counts["answered"] > 0))[-1]])
    # 50 of the 500 images only place the starts: the search finds a threshold a little less often than it would
    # testing on all 500 (about 88% of draws here)
    assert len(chosen) >= 0.85 * draws, "a threshold should be found in almost every draw"
    met = (np.sum([true_accuracy[t] >= target for t in chosen]) + draws - len(chosen)) / draws
    assert met >= confidence, f"target met in only {met:.0%} of {draws} draws"
    assert np.mean([coverage[t] for t in chosen]) > 0.3, "the guarantee should not come from answering little"
    # a method without the finite-sample bound misses the target far more often: the test can fail
    assert np.mean([true_accuracy[t] >= target for t in naive]) < confidence


def edge_model(n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """A model that is 99.5% right on its 5% most confident images and a coin toss elsewhere: a target of 0.95 is
    reached only by thresholds that answer less than 6% of the images."""
    p = rng.random(n)
    right = rng.random(n) < np.where(p > 0.95, 0.995, 0.5)
    return p, right, p, right


def edge_model_accuracy(threshold: float) -> float:
    """The true accuracy of `edge_model`'s answers at `threshold`."""
    high = 1 - max(threshold, 0.95)
    low = max(0.95 - threshold, 0.0)
    return (0.995 * high + 0.5 * low) / (high + low)


def test_a_high_target_reached_only_by_the_most_confident_images_gets_a_threshold():
    rng = np.random.default_rng(0)
    draws = [edge_model(2000, rng) for _ in range(40)]
    chosen = [choose_selective_threshold(*draw, target_accuracy=0.95).threshold for draw in draws]
    found = [t for t in chosen if t is not None]
    # about 35% of draws: the 10% of images that place the starts place the first testable threshold less exactly
    # than counting on the tested images did (about 70%), but that count is not an exact test
    assert len(found) >= 0.2 * len(draws), f"a threshold in only {len(found)} of {len(draws)} draws"
    misses = sum(edge_model_accuracy(t) < 0.95 for t in found)
    assert misses <= 0.1 * len(draws) + 2  # marginal guarantee, with sampling slack for 40 draws
    # one start at 10% of the images (the former rule) never tests a threshold that answers less
    assert all(choose_selective_threshold(*d, 0.95, start_coverages=0.1).threshold is None for d in draws[:10])


@pytest.mark.parametrize(
    ("num_images", "start_coverages"),
    [(30, DEFAULT_START_COVERAGES), (120, DEFAULT_START_COVERAGES), (400, (0.0, 0.02, 0.1))],
)
def test_the_guarantee_holds_by_simulation_with_few_images_and_any_starts(num_images, start_coverages):
    """P(a threshold is chosen and its true accuracy is below the target) <= 1 - confidence, by simulation, also
    with few calibration images, where the search must mostly decline."""
    target, confidence, draws = 0.8, 0.9, 100
    rng = np.random.default_rng(num_images)
    grid = np.arange(1000, 0, -1) / 1000
    population = selective_curve(*simulate(100_000, rng), grid)
    with np.errstate(invalid="ignore"):
        true_accuracy = dict(zip(grid, population["correct"] / population["answered"], strict=True))
    misses = found = 0
    for _ in range(draws):
        result = choose_selective_threshold(
            *simulate(num_images, rng), target, confidence, start_coverages=start_coverages
        )
        if result.threshold is not None:
            found += 1
            misses += true_accuracy[result.threshold] < target
            assert result.answered >= math.log(0.1 / len(start_coverages)) / math.log(1 - (1 - target))
    assert misses / draws <= (1 - confidence) + 0.05, f"missed in {misses} of {draws} draws"
    if num_images >= 120:
        assert found >= 0.3 * draws  # and the search still finds thresholds (about 45% of draws with 120 images)


def non_monotone(n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """`simulate`, except that the most confident images (class confidence above 0.97, about 3%) are right only 55%
    of the time: less accurate than the band below them, so thresholds that certify and thresholds that miss
    alternate down the grid."""
    p, fine_correct, q, coarse_correct = simulate(n, rng)
    top = p > 0.97
    fine_correct = np.where(top, rng.random(n) < 0.55, fine_correct)
    return p, fine_correct, q, np.where(top, fine_correct | (rng.random(n) < (q - p) / (1 - p)), coarse_correct)


@pytest.mark.parametrize("target", [0.8, 0.9])
def test_the_guarantee_holds_by_simulation_where_the_most_confident_answers_are_less_accurate(target):
    """P(a threshold is chosen and its true accuracy is below the target) <= 1 - confidence when the accuracy is not
    monotone in the confidence. At 0.9 no threshold reaches the target, so every threshold chosen is a miss; at 0.8
    the search must still find thresholds, and a plug-in rule misses in most draws."""
    confidence, draws = 0.9, 150
    rng = np.random.default_rng(7)
    grid = np.arange(1000, 0, -1) / 1000
    population = selective_curve(*non_monotone(200_000, rng), grid)
    with np.errstate(invalid="ignore"):
        true_accuracy = dict(zip(grid, population["correct"] / population["answered"], strict=True))
    misses = found = naive_misses = 0
    for draw in range(draws):
        calibration = non_monotone(2000, rng)
        result = choose_selective_threshold(*calibration, target, confidence, seed=draw)
        if result.threshold is not None:
            found += 1
            misses += true_accuracy[result.threshold] < target
        counts = selective_curve(*calibration, grid)  # the lowest threshold whose calibration accuracy reaches it
        reached = np.flatnonzero((counts["correct"] >= target * counts["answered"]) & (counts["answered"] > 0))
        naive_misses += bool(len(reached)) and true_accuracy[grid[reached[-1]]] < target
    # 1 - confidence, plus about 2.5 binomial standard deviations for 150 draws
    assert misses / draws <= (1 - confidence) + 0.06, f"missed in {misses} of {draws} draws"
    assert naive_misses / draws > 0.3  # the test can fail: without the finite-sample bound the target is missed
    if target == 0.8:
        assert found >= 0.5 * draws, f"a threshold in only {found} of {draws} draws"
    else:
        assert np.nanmax(list(true_accuracy.values())) < target  # no threshold reaches 0.9: any choice misses


def test_the_starts_are_placed_on_other_images_than_the_tests():
    """The thresholds are tested on the images `start_split` leaves for testing, and only those: what the result
    reports is counted on them, and the images that placed the starts can change without changing a test's
    counts, only where it starts."""
    rng = np.random.default_rng(3)
    scores = simulate(1000, rng)
    result = choose_selective_threshold(*scores, 0.8, start_share=0.1, seed=5)
    start_rows, test_rows = start_split(1000, 0.1, seed=5)
    assert (result.start_samples, result.test_samples) == (100, 900) == (len(start_rows), len(test_rows))
    assert not set(start_rows) & set(test_rows) and len(set(start_rows) | set(test_rows)) == 1000
    counts = selective_curve(*(np.asarray(a)[test_rows] for a in scores), np.array([result.threshold]))
    assert (result.answered, result.correct) == (counts["answered"][0], counts["correct"][0])
    assert result.accuracy_lower_bound == accuracy_lower_bound(result.correct, result.answered, 1 - 0.1 / 2)
    assert (
        choose_selective_threshold(*scores, 0.8, start_share=0.1, seed=5) == result
    )  # seeded: the same split every time
    assert not np.array_equal(start_split(1000, 0.1, seed=6)[0], start_rows)
    # wrong answers among the start images do not count against any test
    fine_correct, coarse_correct = scores[1].copy(), scores[3].copy()
    fine_correct[start_rows] = coarse_correct[start_rows] = False
    spoiled = choose_selective_threshold(
        scores[0], fine_correct, scores[2], coarse_correct, 0.8, start_share=0.1, seed=5
    )
    assert (spoiled.threshold, spoiled.answered, spoiled.correct) == (result.threshold, result.answered, result.correct)
    with pytest.raises(ValueError, match="start_share must be in"):
        choose_selective_threshold(*scores, 0.8, start_share=1.0)


def test_unreachable_target_gives_no_threshold():
    rng = np.random.default_rng(1)
    p, fine_correct, q, coarse_correct = simulate(300, rng)
    result = choose_selective_threshold(p, fine_correct, q, coarse_correct, target_accuracy=0.999, confidence=0.9)
    assert result.threshold is None and result.answered == 0
    with pytest.raises(ValueError, match="target_accuracy must be in"):
        choose_selective_threshold(p, fine_correct, q, coarse_correct, target_accuracy=1.0)


# ----------------------------------------------------------------------------------------------------------------
# After training
# ----------------------------------------------------------------------------------------------------------------


def test_calibrate_and_select_stores_the_results_and_measures_the_held_out_part(caplog):
    config = small_config()
    data = overconfident_predictions(config, n=1200, sharpen=2.0, seed=3, scale=4.0)
    prediction = PredictionOutput(
        predictions=(data["logits"], data["coarse_logits"]),
        label_ids=(data["labels"], data["coarse_labels"]),
        metrics={},
    )
    args = CalibrationArguments(selective_target_accuracy=0.6, selective_confidence=0.9, calibration_split_fraction=0.5)
    with caplog.at_level("INFO"):
        result = calibrate_and_select(config, prediction, args, seed=0)
    assert "below 0.6 in at most 10% of calibration draws" in caplog.text  # the log states the true guarantee
    assert "never changes a head's own argmax, but can change the consistent prediction" in caplog.text
    assert len(result.calibration_rows) == len(result.heldout_rows) == 600
    assert not set(result.calibration_rows) & set(result.heldout_rows)
    assert config.fine_temperature > 1.2 and config.selective_threshold == result.threshold.threshold
    assert (config.selective_target_accuracy, config.selective_confidence) == (0.6, 0.9)
    metrics = result.metrics
    assert metrics["eval_calibration_samples"] == 600 and metrics["eval_heldout_samples"] == 600
    assert metrics["eval_selective_accuracy"] >= metrics["eval_selective_accuracy_lower_bound"] >= 0.6
    search = result.threshold
    assert (metrics["eval_selective_answered"], metrics["eval_selective_correct"]) == (search.answered, search.correct)
    assert metrics["eval_selective_correct"] / metrics["eval_selective_answered"] >= 0.6
    assert "at most 10% of calibration draws" in metrics["eval_selective_guarantee"]
    assert "can be higher" in metrics["eval_selective_guarantee"]
    held = {name: data[name][result.heldout_rows] for name in data}
    expected = evaluate_calibration(**held, config=config)
    assert metrics["eval_heldout_selective_accuracy"] == expected["selective_accuracy"]
    assert metrics["eval_heldout_fine_ece"] < metrics["eval_heldout_fine_ece_uncalibrated"]
    assert 0 < metrics["eval_heldout_selective_fine_coverage"] + metrics["eval_heldout_selective_coarse_coverage"] < 1

    report = "\n".join(selective_answer_lines(expected, config))
    assert "whose accuracy on new data is below 0.6 in at most 10% of calibration draws" in report
    assert "can be higher" in report

    # without a target, a threshold chosen for other temperatures is dropped
    result = calibrate_and_select(config, prediction, CalibrationArguments(selective_target_accuracy=0), seed=0)
    assert config.selective_threshold is None and result.threshold is None and result.heldout_rows is None
    assert "eval_selective_accuracy" not in result.metrics


def test_too_few_calibration_images_keep_temperature_one_and_no_threshold(caplog):
    config = small_config(fine_temperature=2.0, selective_threshold=0.5)  # from an earlier calibration
    data = overconfident_predictions(config, n=3, sharpen=3.0)
    prediction = PredictionOutput(
        predictions=(data["logits"], data["coarse_logits"]), label_ids=(data["labels"], data["coarse_labels"]),
        metrics={},
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        result = calibrate_and_select(config, prediction, CalibrationArguments(), seed=0)
    assert (config.fine_temperature, config.coarse_temperature, config.selective_threshold) == (1.0, 1.0, None)
    assert result.threshold is None
    reason = result.metrics["eval_calibration_skipped"]
    assert f"only 3 calibration images, fewer than the {MIN_CALIBRATION_IMAGES}" in reason
    assert reason in caplog.text
    assert result.metrics["eval_calibration_samples"] == 3 and result.metrics["eval_fine_temperature"] == 1.0
    assert "eval_selective_threshold" not in result.metrics
    json.dumps(result.metrics)  # eval_results.json takes every value


def test_scores_read_the_configs_temperatures():
    config = small_config(fine_temperature=2.0, coarse_temperature=0.5)
    data = overconfident_predictions(config, n=50)
    calibrated, raw = hierarchical_scores(**data, config=config), hierarchical_scores(**data, config=config,
                                                                                     calibrated=False)  # fmt: skip
    assert not np.allclose(calibrated.fine_confidence, raw.fine_confidence)
    assert np.all(calibrated.coarse_confidence >= calibrated.fine_confidence - 1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"selective_target_accuracy": float("nan")}, "--selective_target_accuracy must be in"),
        ({"selective_target_accuracy": 1.0}, "--selective_target_accuracy must be in"),
        ({"selective_confidence": 0.0}, "--selective_confidence must be in"),
        ({"selective_confidence": float("nan")}, "--selective_confidence must be in"),
        ({"calibration_split_fraction": 0.0}, "--calibration_split_fraction must be in"),
        ({"calibration_split_fraction": float("nan")}, "--calibration_split_fraction must be in"),
        ({"selective_start_coverage": []}, "--selective_start_coverage must be one or more numbers in"),
        ({"selective_start_coverage": [0.1, 1.0]}, r"--selective_start_coverage must be in \[0, 1\), got 1.0"),
        ({"selective_start_coverage": [-0.1]}, r"--selective_start_coverage must be in \[0, 1\), got -0.1"),
        ({"selective_start_coverage": [True]}, r"--selective_start_coverage must be in \[0, 1\), got True"),
    ],
)
def test_calibration_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CalibrationArguments(**kwargs)


def test_calibration_options_parse_with_the_training_script():
    model_args, _, _ = parse_args(["--output_dir", "x", "--selective_target_accuracy", "0.8",
                                   "--calibration_split_fraction", "0.5"])  # fmt: skip
    assert model_args.selective_target_accuracy == 0.8 and model_args.calibration_split_fraction == 0.5
    assert parse_args(["--output_dir", "x", "--selective_target_accuracy", "0"])[0].selective_target_accuracy is None
    assert model_args.selective_start_coverage == list(DEFAULT_START_COVERAGES)
    starts = parse_args(["--output_dir", "x", "--selective_start_coverage", "0.05", "0.2"])[0]
    assert starts.selective_start_coverage == [0.05, 0.2]
    with pytest.raises(ValueError, match="--selective_confidence must be in"):
        parse_args(["--output_dir", "x", "--selective_confidence", "nan"])
    with pytest.raises(ValueError, match="leaves an empty part"):
        split_rows(10, 0.01, seed=0)


@pytest.mark.slow
def test_evaluation_run_calibrates_a_saved_model(tiny_parquet_dir, tmp_path):
    torch.manual_seed(0)
    model = HierarchicalEfficientNetV2ForImageClassification(small_config()).eval()
    with torch.no_grad():  # confident random heads: over-confident, so the fitted temperatures move away from 1
        model.fine_classifier.weight.mul_(1e4)
        model.coarse_classifier.weight.mul_(1e4)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    build_image_processor(model.config).save_pretrained(model_dir)
    output_dir = tmp_path / "eval"
    metrics = main(
        tiny_args(tiny_parquet_dir, output_dir, "--model_name_or_path", str(model_dir), "--do_eval", "--do_predict",
                  "--calibration_split_fraction", "0.5")
    )  # fmt: skip
    saved = json.loads((output_dir / "config.json").read_text())
    assert saved["fine_temperature"] == pytest.approx(metrics["eval_fine_temperature"])
    # 10 calibration images: too few to fit temperatures or certify a threshold, and the results say so
    assert saved["fine_temperature"] == saved["coarse_temperature"] == 1.0
    assert saved["selective_threshold"] is None
    results = json.loads(Path(output_dir, "eval_results.json").read_text())
    assert results["eval_calibration_samples"] == results["eval_heldout_samples"] == 10
    assert "only 10 calibration images" in results["eval_calibration_skipped"]
    assert {"eval_fine_ece", "eval_heldout_coarse_ece_uncalibrated", "eval_selective_haurc"} <= set(results)
    tests = json.loads(Path(output_dir, "test_results.json").read_text())
    assert {"test_fine_ece", "test_coarse_brier", "test_coarse_summed_fine_accuracy"} <= set(tests)
    assert tests["test_fine_temperature"] == pytest.approx(saved["fine_temperature"])
    reloaded = HierarchicalEfficientNetV2ForImageClassification.from_pretrained(output_dir)
    assert reloaded.config.fine_temperature == pytest.approx(saved["fine_temperature"])
