"""The headline hierarchy metrics on small cases worked out by hand (hierarchical/evaluation/metrics.py)."""

from __future__ import annotations

import numpy as np

from hierarchical.evaluation.metrics import compute_hierarchy_metrics

# 8 fine classes under 3 superclasses: fine 0-2 -> coarse 0, fine 3-5 -> coarse 1, fine 6-7 -> coarse 2.
FINE_TO_COARSE = [0, 0, 0, 1, 1, 1, 2, 2]


def fine_logits(ranking: list[int]) -> list[float]:
    """Logits over the 8 fine classes that rank them in the given order, best first."""
    logits = [0.0] * len(FINE_TO_COARSE)
    for position, fine_class in enumerate(ranking):
        logits[fine_class] = float(len(ranking) - position)
    return logits


def coarse_logits(predicted: int) -> list[float]:
    return [1.0 if superclass == predicted else 0.0 for superclass in range(3)]


# Four images.
#   image  fine label (its coarse)  fine ranking, best first   coarse head says
#   A      0 (0)                    0 1 2 3 4 5 6 7            0
#   B      1 (0)                    2 1 0 3 4 5 6 7            1
#   C      3 (1)                    6 7 0 1 2 3 4 5            2
#   D      7 (2)                    7 0 1 2 3 4 5 6            1
RANKINGS = [[0, 1, 2, 3, 4, 5, 6, 7], [2, 1, 0, 3, 4, 5, 6, 7], [6, 7, 0, 1, 2, 3, 4, 5], [7, 0, 1, 2, 3, 4, 5, 6]]
LABELS = [0, 1, 3, 7]
COARSE_LABELS = [0, 0, 1, 2]
COARSE_PREDICTED = [0, 1, 2, 1]


def test_headline_metrics_by_hand():
    # Per image:
    #   fine prediction:        A 0, B 2, C 6, D 7   -> right: A, D                      fine_accuracy 2/4
    #   label in the top five:  A yes, B yes (1 is 2nd), C no (top five 6 7 0 1 2), D yes -> fine_top5 3/4
    #   coarse head right:      A 0=0, B 1!=0, C 2!=1, D 1!=2 -> right: A              coarse_accuracy 1/4
    #   fine prediction's superclass: A 0, B 0, C 2, D 2; against the coarse labels 0 0 1 2
    #                           -> right: A, B, D                             coarse_from_fine_accuracy 3/4
    #   that superclass against the coarse head 0 1 2 1 -> equal: A, C                  consistency 2/4
    #   fine and coarse both right: A only (D's coarse head is wrong)                   both_correct 1/4
    #   wrong fine predictions: B (2 under the right superclass 0: distance 1) and C (6 under superclass 2, the
    #   label under 1: distance 2)                                               mistake_severity (1 + 2) / 2
    metrics = compute_hierarchy_metrics(
        np.array([fine_logits(ranking) for ranking in RANKINGS]),
        np.array([coarse_logits(coarse) for coarse in COARSE_PREDICTED]),
        np.array(LABELS),
        np.array(COARSE_LABELS),
        FINE_TO_COARSE,
    )
    assert metrics == {
        "fine_accuracy": 0.5,
        "fine_top5_accuracy": 0.75,
        "coarse_accuracy": 0.25,
        "coarse_from_fine_accuracy": 0.75,
        "consistency": 0.5,
        "both_correct": 0.25,
        "mistake_severity": 1.5,
        "num_samples": 4.0,
    }


def test_mistakes_within_the_superclass_by_hand():
    # Images A and B only, with B's coarse head right (0): fine right on A only -> 1/2; both top fives hold the
    # label -> 1; coarse head right on both -> 1; fine prediction's superclass 0 and 0, right on both -> 1;
    # consistent on both -> 1; both right on A only -> 1/2; the one mistake (B: 2 for 1, same superclass) has
    # distance 1.
    metrics = compute_hierarchy_metrics(
        np.array([fine_logits(RANKINGS[0]), fine_logits(RANKINGS[1])]),
        np.array([coarse_logits(0), coarse_logits(0)]),
        np.array([0, 1]),
        np.array([0, 0]),
        FINE_TO_COARSE,
    )
    assert metrics["fine_accuracy"] == 0.5 and metrics["fine_top5_accuracy"] == 1.0
    assert metrics["coarse_accuracy"] == metrics["coarse_from_fine_accuracy"] == metrics["consistency"] == 1.0
    assert metrics["both_correct"] == 0.5 and metrics["mistake_severity"] == 1.0


def test_no_mistake_has_severity_zero_and_few_classes_no_top5():
    # Two fine classes under one superclass; both images right: every accuracy 1, severity 0 (no mistake to
    # measure), and no top-5 accuracy with 5 classes or fewer.
    metrics = compute_hierarchy_metrics(
        np.array([[2.0, 1.0], [1.0, 2.0]]), np.array([[1.0], [1.0]]), np.array([0, 1]), np.array([0, 0]), [0, 0]
    )
    assert metrics == {
        "fine_accuracy": 1.0,
        "coarse_accuracy": 1.0,
        "coarse_from_fine_accuracy": 1.0,
        "consistency": 1.0,
        "both_correct": 1.0,
        "mistake_severity": 0.0,
        "num_samples": 2.0,
    }
