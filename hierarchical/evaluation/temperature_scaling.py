"""Temperature scaling of both heads: one temperature per head, fitted by L-BFGS on the negative log-likelihood of
the consistent probabilities at both levels (held-out logits, a few seconds on CPU)."""

from __future__ import annotations

import math

import numpy as np
import torch

from configuration_hierarchical import TEMPERATURE_RANGE, HierarchicalEfficientNetV2Config, check_label_range
from prediction_hierarchical import hierarchical_log_probabilities

Array = np.ndarray | torch.Tensor  # predictions as `Trainer.predict` returns them, or tensors

# Temperatures are fitted in the range a config accepts (`TEMPERATURE_RANGE`), as logarithms.
LOG_TEMPERATURE_RANGE = (math.log(TEMPERATURE_RANGE[0]), math.log(TEMPERATURE_RANGE[1]))
MAX_LBFGS_ITERATIONS = 100


def check_predictions(
    logits: Array, coarse_logits: Array, labels: Array, coarse_labels: Array, config: HierarchicalEfficientNetV2Config
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
        check_label_range(array, classes, name)
    return logits, coarse_logits, labels, coarse_labels


def hierarchical_nll(
    logits: torch.Tensor,
    coarse_logits: torch.Tensor,
    labels: torch.Tensor,
    coarse_labels: torch.Tensor,
    fine_to_coarse: torch.Tensor,
    *temperatures: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean negative log-likelihood of the true class and of the true superclass under the consistent
    probabilities (`hierarchical_log_probabilities`) at the given temperatures (fine, coarse; 1 when left out):
    `(fine_nll, coarse_nll)`."""
    log_fine, log_coarse = hierarchical_log_probabilities(logits, coarse_logits, fine_to_coarse, *temperatures)
    fine_nll = -log_fine.gather(1, labels.unsqueeze(1)).mean()
    coarse_nll = -log_coarse.gather(1, coarse_labels.unsqueeze(1)).mean()
    return fine_nll, coarse_nll


def fit_temperatures(
    logits: Array, coarse_logits: Array, labels: Array, coarse_labels: Array, config: HierarchicalEfficientNetV2Config
) -> tuple[float, float]:
    """Fit `(fine_temperature, coarse_temperature)` on held-out predictions.

    The two scalars minimise the negative log-likelihood of the true class plus that of the true superclass under
    the consistent probabilities the model predicts with ([`hierarchical_log_probabilities`]). They are optimised
    as logarithms (so they stay positive), within `TEMPERATURE_RANGE` ([0.01, 100]), with L-BFGS. Dividing logits by a positive
    temperature never changes a head's argmax; it makes the scores mean what they say.

    Example:

    ```python
    >>> fine_t, coarse_t = fit_temperatures(logits, coarse_logits, labels, coarse_labels, model.config)
    >>> model.config.fine_temperature, model.config.coarse_temperature = fine_t, coarse_t
    ```
    """
    logits, coarse_logits, labels, coarse_labels = check_predictions(
        logits, coarse_logits, labels, coarse_labels, config
    )
    fine_to_coarse = config.fine_to_coarse_tensor()
    log_temperatures = torch.zeros(2, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_temperatures], lr=1.0, max_iter=MAX_LBFGS_ITERATIONS, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        temperatures = log_temperatures.clamp(*LOG_TEMPERATURE_RANGE).exp()
        fine_nll, coarse_nll = hierarchical_nll(
            logits, coarse_logits, labels, coarse_labels, fine_to_coarse, *temperatures
        )
        loss = fine_nll + coarse_nll
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = TEMPERATURE_RANGE  # exp(log(x)) in float32 can fall just outside [low, high]
    fine_temperature, coarse_temperature = (
        min(max(float(t), low), high) for t in log_temperatures.detach().clamp(*LOG_TEMPERATURE_RANGE).exp()
    )
    if not all(math.isfinite(t) and t > 0 for t in (fine_temperature, coarse_temperature)):
        raise ValueError(f"temperature fitting diverged: got {fine_temperature}, {coarse_temperature}")
    return fine_temperature, coarse_temperature


__all__ = ["LOG_TEMPERATURE_RANGE", "check_predictions", "fit_temperatures", "hierarchical_nll"]
