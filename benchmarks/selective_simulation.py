#!/usr/bin/env python
"""Simulations behind the calibration defaults: the selective threshold's starting coverages, and the fewest
calibration images worth fitting temperatures on.

    python benchmarks/selective_simulation.py                 # both parts, about 3 minutes on 2 cores
    python benchmarks/selective_simulation.py --part threshold --draws 50
    python benchmarks/selective_simulation.py --part temperature --logit_scale 2.5 --sharpen 1.5  # a weaker model

1. threshold: synthetic models whose every image has a known chance of being right. For each model and target
   accuracy, a large population gives the true accuracy at every threshold and the oracle: the most answers any
   threshold gives while its true accuracy reaches the target. Each draw of `--calibration_images` images runs
   `choose_selective_threshold` with each candidate: a set of starting coverages and the share of the images that
   places the starts (the tests run on the others), and the former rule that placed the starts on the tested
   images themselves. The table shows how often a threshold was found, how often the chosen one misses the target
   on new data (must stay <= 1 - confidence), and the share it answers as a fraction of the oracle's.
2. temperatures: labels drawn from known probabilities, logits over-confident by a known factor. Temperatures
   fitted on n images are judged by the negative log-likelihood on 2,000 new images, against temperature 1.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hierarchical.evaluation.metrics import selective_curve  # noqa: E402
from hierarchical.evaluation.selective_threshold import (  # noqa: E402
    THRESHOLD_GRID,
    choose_selective_threshold,
    fixed_sequence_tests,
)

SEED = 0
POPULATION = 400_000
CANDIDATES = {  # column name -> (starting coverages (several: Bonferroni), share placing the starts; 0: same images)
    "1% + 10% on the tested images (former)": ((0.01, 0.1), 0.0),
    "1% + 10%, share 0.05": ((0.01, 0.1), 0.05),
    "**1% + 10%, share 0.1**": ((0.01, 0.1), 0.1),
    "1% + 10%, share 0.2": ((0.01, 0.1), 0.2),
    "1% + 10%, share 0.3": ((0.01, 0.1), 0.3),
    "10%, share 0.1": ((0.1,), 0.1),
    "1%, share 0.1": ((0.01,), 0.1),
}


# Each model gives, per image, the class confidence `p`, its chance of being right, the superclass confidence
# `q >= p`, and the chance that the superclass is right when the class is wrong.


def over_confident(n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """A moderate, over-confident model: the class right with probability `p**1.5`."""
    p = rng.beta(2.0, 1.2, n)
    q = p + (1 - p) * rng.beta(1.5, 1.5, n)
    return p, p**1.5, q, (q - p) / (1 - p)


def strong(n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """A strong, calibrated model: most images confident and right."""
    p = rng.beta(6.0, 0.7, n)
    q = p + (1 - p) * rng.beta(2.0, 1.0, n)
    return p, p, q, (q - p) / (1 - p)


def weak(n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """A weak, calibrated model barely past chance: accurate only on its few most confident images."""
    p = rng.beta(0.6, 8.0, n)
    q = p + (1 - p) * rng.beta(0.8, 5.0, n)
    return p, p, q, (q - p) / (1 - p)


def non_monotone(n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """`over_confident`, except that its most confident images (class confidence above 0.97, about 3%) are right
    only 55% of the time: less accurate than the band below them."""
    p, fine_chance, q, coarse_chance = over_confident(n, rng)
    return p, np.where(p > 0.97, 0.55, fine_chance), q, coarse_chance


def edge(n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """99.5% right on its 5% most confident images, a coin toss elsewhere: high targets only the top 5% reach."""
    p = rng.random(n)
    return p, np.where(p > 0.95, 0.995, 0.5), p, np.zeros(n)


MODELS: dict[str, tuple[Callable[[int, np.random.Generator], tuple[np.ndarray, ...]], tuple[float, ...]]] = {
    "weak": (weak, (0.2, 0.4, 0.5, 0.6, 0.7)),
    "moderate": (over_confident, (0.6, 0.8, 0.9, 0.95, 0.99, 0.995)),
    "strong": (strong, (0.95, 0.99, 0.998)),
    "non-monotone": (non_monotone, (0.6, 0.8, 0.85, 0.9)),
    "edge": (edge, (0.9, 0.95)),
}
WEIGHT = 10**6  # chances as integer weights, for the counts of `selective_curve`


def calibration_draw(model: Callable, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """`(fine_confidence, fine_correct, coarse_confidence, coarse_correct)` of `n` images of `model`."""
    p, fine_chance, q, coarse_chance = model(n, rng)
    fine_correct = rng.random(n) < fine_chance
    return p, fine_correct, q, fine_correct | (rng.random(n) < coarse_chance)


def population_curve(model: Callable, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """True accuracy and coverage at every grid threshold, from the chances of `POPULATION` images (no sampling of
    right and wrong, so the accuracy is exact up to the confidences' sampling)."""
    p, fine_chance, q, coarse_chance = model(POPULATION, rng)
    coarse_chance = fine_chance + (1 - fine_chance) * coarse_chance
    weights = [np.round(chance * WEIGHT).astype(np.int64) for chance in (fine_chance, coarse_chance)]
    counts = selective_curve(p, weights[0], q, weights[1], THRESHOLD_GRID)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = counts["correct"] / WEIGHT / counts["answered"]
    return np.nan_to_num(accuracy, nan=1.0), counts["answered"] / POPULATION


def same_images_threshold(
    draw: tuple[np.ndarray, ...], target: float, confidence: float, starts: tuple[float, ...]
) -> float | None:
    """The former rule: each sequence starts at the first threshold that answers the share `starts[i]` of the
    calibration images (and the count that could pass with no error), and is tested on the same images."""
    counts = selective_curve(*draw, THRESHOLD_GRID)
    error_rate, delta = 1.0 - target, (1.0 - confidence) / len(starts)
    could_pass = math.ceil(math.log(delta) / math.log(1.0 - error_rate))
    first = []
    for coverage in starts:
        enough = counts["answered"] >= max(could_pass, math.ceil(coverage * len(draw[0])))
        first.append(int(np.argmax(enough)) if enough.any() else len(THRESHOLD_GRID))
    best, _ = fixed_sequence_tests(counts["answered"], counts["correct"], first, error_rate, delta)
    return float(THRESHOLD_GRID[best]) if best >= 0 else None


def simulate_thresholds(args: argparse.Namespace) -> list[tuple]:
    """Rows `(model, target, oracle coverage, {candidate: (found, miss rate, coverage / oracle)})`."""
    rng = np.random.default_rng(SEED)
    rows = []
    for model_name, (model, targets) in MODELS.items():
        accuracy, coverage = population_curve(model, rng)
        index = {t: i for i, t in enumerate(THRESHOLD_GRID)}
        draws = [calibration_draw(model, args.calibration_images, rng) for _ in range(args.draws)]
        for target in targets:
            reached = accuracy >= target
            oracle = float(coverage[reached].max()) if reached.any() else 0.0
            cells = {}
            for name, (starts, share) in CANDIDATES.items():
                chosen = [
                    choose_selective_threshold(
                        *draw, target, args.confidence, start_coverages=starts, start_share=share
                    ).threshold
                    if share
                    else same_images_threshold(draw, target, args.confidence, starts)
                    for draw in draws
                ]
                at = np.array([index[t] for t in chosen if t is not None], dtype=np.int64)
                cells[name] = (
                    len(at) / args.draws,
                    float(np.sum(accuracy[at] < target)) / args.draws,
                    float(coverage[at].sum()) / args.draws / oracle if oracle else 0.0,
                )
            rows.append((model_name, target, oracle, cells))
    return rows


def print_threshold_table(rows: list[tuple], args: argparse.Namespace) -> None:
    print(
        f"\nSelective threshold, {args.calibration_images} calibration images, confidence {args.confidence}, "
        f"{args.draws} draws per row. Each cell: found (share of draws with a threshold) / miss (share of draws "
        f"whose threshold has a true accuracy below the target; at most {1 - args.confidence:.2f} is promised) / "
        "coverage (mean share answered, 0 without a threshold, as a fraction of the oracle's).\n"
    )
    print("| model | target | oracle answers | " + " | ".join(f"start {name}" for name in CANDIDATES) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in CANDIDATES) + " |")
    for model, target, oracle, cells in rows:
        text = " | ".join(f"{f:.0%} / {m:.0%} / {c:.2f}" for f, m, c in cells.values())
        print(f"| {model} | {target:g} | {oracle:.1%} | {text} |")


def simulate_temperatures(args: argparse.Namespace) -> list[tuple]:
    """Rows `(n, median fitted fine T, share of draws worse than T = 1, median NLL ratio fitted / T = 1)`."""
    import torch

    from configuration_hierarchical import HierarchicalEfficientNetV2Config
    from hierarchical.evaluation.temperature_scaling import fit_temperatures, hierarchical_nll

    config = HierarchicalEfficientNetV2Config(backbone_weights=None)
    fine_to_coarse = np.asarray(config.fine_to_coarse)
    rng = np.random.default_rng(SEED)

    def predictions(n: int) -> tuple[torch.Tensor, ...]:
        true_logits = rng.normal(size=(n, config.num_labels)) * args.logit_scale
        probs = torch.tensor(true_logits).softmax(-1).numpy()
        labels = (probs.cumsum(1) > rng.random((n, 1))).argmax(1)
        coarse = np.stack([probs[:, fine_to_coarse == c].sum(1) for c in range(config.num_coarse_labels)], 1)
        sharpen = args.sharpen
        return (
            torch.tensor(true_logits * sharpen, dtype=torch.float32),
            torch.tensor(np.log(coarse) * sharpen + rng.normal(size=coarse.shape) * 0.5, dtype=torch.float32),
            torch.tensor(labels),
            torch.tensor(fine_to_coarse[labels]),
        )

    test = predictions(2000)
    f2c = config.fine_to_coarse_tensor()

    def nll(*temperatures: float) -> float:
        return float(sum(hierarchical_nll(*test, f2c, *temperatures)))

    baseline = nll(1.0, 1.0)
    rows = []
    for n in args.sizes:
        fitted, ratios = [], []
        for _ in range(args.temperature_draws):
            temperatures = fit_temperatures(*predictions(n), config)
            fitted.append(temperatures[0])
            ratios.append(nll(*temperatures) / baseline)
        ratios = np.array(ratios)
        rows.append((n, float(np.median(fitted)), float(np.mean(ratios > 1.0)), float(np.median(ratios)),
                     float(ratios.max())))  # fmt: skip
    return rows


def print_temperature_table(rows: list[tuple], args: argparse.Namespace) -> None:
    print(
        f"\nTemperatures fitted on n images (true logits spread {args.logit_scale}, model logits {args.sharpen}x "
        f"over-confident; NLL of class + superclass on "
        f"2,000 new images, {args.temperature_draws} draws per n)\n"
    )
    print("| n | median fine T | draws worse than T = 1 | median NLL / NLL at T = 1 | worst NLL / NLL at T = 1 |")
    print("| --- | --- | --- | --- | --- |")
    for n, temperature, worse, median, worst in rows:
        print(f"| {n} | {temperature:.2f} | {worse:.0%} | {median:.3f} | {worst:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("threshold", "temperature", "both"), default="both")
    parser.add_argument("--calibration_images", type=int, default=2000)
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--draws", type=int, default=100, help="Calibration draws per cell of the threshold table.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 10, 20, 50, 100])
    parser.add_argument("--temperature_draws", type=int, default=10)
    parser.add_argument("--sharpen", type=float, default=1.0, help="How over-confident the simulated logits are.")
    parser.add_argument("--logit_scale", type=float, default=6.0, help="Spread of the true logits (higher: a "
                        "more accurate model).")  # fmt: skip
    args = parser.parse_args()
    start = time.perf_counter()
    if args.part in ("threshold", "both"):
        print_threshold_table(simulate_thresholds(args), args)
    if args.part in ("temperature", "both"):
        print_temperature_table(simulate_temperatures(args), args)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
