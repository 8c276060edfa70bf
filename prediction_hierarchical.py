"""The consistent probabilities of both heads and the selective answer rule: what a hierarchical model predicts.

Saved with every model beside `modeling_hierarchical.py`, which imports it (relative import), so it imports only
torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ANSWER_LEVELS = ("fine", "coarse", "abstain")  # the values of `HierarchicalPrediction.answer_levels`
UNKNOWN_LABEL = "unknown"  # the answer label of an abstention


@dataclass
class HierarchicalPrediction:
    """
    Predictions of [`HierarchicalEfficientNetV2ForImageClassification.predict_hierarchical`] for a batch.

    Args:
        fine_ids (`torch.LongTensor` of shape `(batch,)`): predicted classes: the most probable class.
        fine_scores (`torch.FloatTensor` of shape `(batch,)`): their probabilities.
        coarse_ids (`torch.LongTensor` of shape `(batch,)`): predicted superclasses: the most probable superclass
            (with consistent probabilities, the superclass whose classes hold the most probability; superclass
            answers use the same one). It need not contain the predicted class when the probability is spread.
        coarse_scores (`torch.FloatTensor` of shape `(batch,)`): their probabilities.
        fine_labels (`list[str]`): class names.
        coarse_labels (`list[str]`): superclass names.
        parent_ids (`torch.LongTensor` of shape `(batch,)`, *optional*): the superclass of each predicted class.
        parent_labels (`list[str]`, *optional*): their names.
        fine_probs (`torch.FloatTensor` of shape `(batch, num_labels)`, *optional*): the class distribution read.
        coarse_probs (`torch.FloatTensor` of shape `(batch, num_coarse_labels)`, *optional*): the superclass
            distribution read.
        answer_levels (`list[str]`, *optional*): with a confidence threshold, the level answered for each image:
            `"fine"`, `"coarse"` or `"abstain"`.
        answer_ids (`torch.LongTensor` of shape `(batch,)`, *optional*): the class id (fine answers), the superclass
            id (coarse answers) or -1 (abstentions).
        answer_labels (`list[str]`, *optional*): the class or superclass name, or `"unknown"`.
        answer_scores (`torch.FloatTensor` of shape `(batch,)`, *optional*): the probability of the answer (for an
            abstention, that of the most probable superclass, which stayed below the threshold).
        min_confidence (`float`, *optional*): the threshold the answers were selected with.
    """

    fine_ids: torch.Tensor
    fine_scores: torch.Tensor
    coarse_ids: torch.Tensor
    coarse_scores: torch.Tensor
    fine_labels: list[str]
    coarse_labels: list[str]
    parent_ids: torch.Tensor | None = None
    parent_labels: list[str] | None = None
    fine_probs: torch.Tensor | None = None
    coarse_probs: torch.Tensor | None = None
    answer_levels: list[str] | None = None
    answer_ids: torch.Tensor | None = None
    answer_labels: list[str] | None = None
    answer_scores: torch.Tensor | None = None
    min_confidence: float | None = None

    def add_selective_answers(
        self,
        fine_probs: torch.Tensor,
        coarse_probs: torch.Tensor,
        min_confidence: float,
        label_names: tuple[dict[int, str], list[str]],
    ) -> None:
        """Fill the answer fields with [`selective_answers`] at `min_confidence`; `label_names` are the class names
        (`config.id2label`) and the superclass names (`config.coarse_label_names`)."""
        levels, ids, scores = selective_answers(fine_probs, coarse_probs, min_confidence)
        self.answer_levels = [ANSWER_LEVELS[level] for level in levels.tolist()]
        self.answer_ids, self.answer_scores = ids, scores
        self.answer_labels = [
            UNKNOWN_LABEL if level == 2 else label_names[level][answer]
            for level, answer in zip(levels.tolist(), ids.tolist(), strict=True)
        ]
        self.min_confidence = min_confidence


def hierarchical_log_probabilities(
    logits: torch.Tensor,
    coarse_logits: torch.Tensor,
    fine_to_coarse: torch.Tensor,
    fine_temperature: float | torch.Tensor = 1.0,
    coarse_temperature: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logarithms of [`hierarchical_probabilities`], computed without underflow (for likelihoods and fitting).

    Each head's logits are divided by its temperature first. Returns `(log_fine (batch, num_labels),
    log_coarse (batch, num_coarse_labels))`.
    """
    log_fine = F.log_softmax(logits.float() / fine_temperature, dim=-1)
    log_coarse = F.log_softmax(coarse_logits.float() / coarse_temperature, dim=-1)
    log_joint = log_fine + log_coarse[:, fine_to_coarse]  # (batch, num_labels)
    log_joint = log_joint - log_joint.logsumexp(-1, keepdim=True)
    # log of the summed joint probabilities of each superclass's classes: a log-sum-exp per superclass
    index = fine_to_coarse.expand_as(log_joint)  # (batch, num_labels)
    peak = torch.full_like(log_coarse, -torch.inf).scatter_reduce(1, index, log_joint, "amax").detach()
    summed = torch.zeros_like(log_coarse).scatter_add(1, index, (log_joint - peak.gather(1, index)).exp())
    return log_joint, summed.log() + peak


def hierarchical_probabilities(
    logits: torch.Tensor,
    coarse_logits: torch.Tensor,
    fine_to_coarse: torch.Tensor,
    *temperatures: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine both heads into one consistent distribution.

    The joint score of fine class `f` is `p_fine(f) * p_coarse(parent(f))`, renormalised over the classes; the
    probability of a superclass is the sum of the joint scores of its classes. A class scores high only when both
    heads agree, and a prediction read from the joint scores is consistent with the hierarchy by construction.
    `p_fine` and `p_coarse` are the softmax of each head's logits divided by its temperature: `temperatures` are
    the fine and the coarse one, as [`hierarchical_log_probabilities`] takes them (1 when left out: as trained).
    Returns `(fine_probs (batch, num_labels), coarse_probs (batch, num_coarse_labels))`.
    """
    log_fine, log_coarse = hierarchical_log_probabilities(logits, coarse_logits, fine_to_coarse, *temperatures)
    return log_fine.exp(), log_coarse.exp()


def selective_answers(
    fine_probs: torch.Tensor, coarse_probs: torch.Tensor, min_confidence: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hierarchical selective rule on consistent probabilities (from [`hierarchical_probabilities`]).

    Answer the most probable class when its probability reaches `min_confidence`; else the most probable
    superclass when its probability reaches it; else abstain. Returns `(levels, ids, scores)`, each `(batch,)`:
    levels index `ANSWER_LEVELS` (0 fine, 1 coarse, 2 abstain), ids are class ids, superclass ids or -1, scores
    the probability of the answer (of the most probable superclass for abstentions).
    """
    fine_scores, fine_ids = fine_probs.max(-1)
    coarse_scores, coarse_ids = coarse_probs.max(-1)
    answer_fine = fine_scores >= min_confidence
    answer_coarse = ~answer_fine & (coarse_scores >= min_confidence)
    levels = torch.full_like(fine_ids, 2)
    levels[answer_coarse] = 1
    levels[answer_fine] = 0
    ids = torch.where(answer_fine, fine_ids, torch.where(answer_coarse, coarse_ids, -1))
    scores = torch.where(answer_fine, fine_scores, coarse_scores)
    return levels, ids, scores


__all__ = [
    "ANSWER_LEVELS",
    "HierarchicalPrediction",
    "UNKNOWN_LABEL",
    "hierarchical_log_probabilities",
    "hierarchical_probabilities",
    "selective_answers",
]
