"""The `hierarchical-image-classification` pipeline: class and superclass with calibrated scores, and a selective
answer (the class, else the superclass, else "unknown") for every image.

Every saved model carries this file and names it in `config.json` (`custom_pipelines`), so that anywhere

    >>> from transformers import pipeline
    >>> classifier = pipeline("hierarchical-image-classification", model="me/model", trust_remote_code=True)
    >>> classifier("photo.png")  # doctest: +SKIP
    {'label': 'maple_tree', 'score': 0.71, 'coarse_label': 'trees', 'coarse_score': 0.93,
     'answer_level': 'coarse', 'answer_label': 'trees', 'answer_score': 0.93, 'min_confidence': 0.8}
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForImageClassification, ImageClassificationPipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging

try:  # loaded as a Hub module (trust_remote_code) or inside a package
    from .configuration_hierarchical import HIERARCHICAL_PIPELINE_TASK
except ImportError:  # imported from the project folder
    from configuration_hierarchical import HIERARCHICAL_PIPELINE_TASK

logger = logging.get_logger(__name__)


class HierarchicalImageClassificationPipeline(ImageClassificationPipeline):
    r"""
    Image classification at both levels of the hierarchy with a hierarchical model
    (`HierarchicalEfficientNetV2ForImageClassification`): the model's `predict_from_logits` with its calibrated
    temperatures and consistent probabilities.

    Call arguments (besides the images and `timeout`):
        min_confidence (`float`, *optional*, defaults to `config.selective_threshold`):
            Threshold of the selective answer, in (0, 1].
        consistent (`bool`, *optional*, defaults to `True`):
            Read the class and superclass from the combined distribution (`False`: each head on its own).

    Returns, per image, a dict: `label` and `score` (class), `coarse_label` and `coarse_score` (superclass), and
    when a threshold is known `answer_level` (`"fine"`, `"coarse"` or `"abstain"`), `answer_label` (a class, a
    superclass or `"unknown"`), `answer_score` and `min_confidence`.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not hasattr(self.model, "predict_from_logits"):
            raise ValueError(
                f"{HIERARCHICAL_PIPELINE_TASK} needs a hierarchical model (with predict_from_logits), "
                f"got {type(self.model).__name__}"
            )
        if getattr(self.model.config, "selective_threshold", None) is None:
            logger.warning(
                "The model has no selective_threshold in its config: pass min_confidence=... to get selective answers"
            )

    def _sanitize_parameters(
        self, min_confidence: float | None = None, consistent: bool | None = None, timeout: float | None = None
    ) -> tuple[dict, dict, dict]:
        preprocess_params = {} if timeout is None else {"timeout": timeout}
        postprocess_params = {}
        if min_confidence is not None:
            postprocess_params["min_confidence"] = min_confidence
        if consistent is not None:
            postprocess_params["consistent"] = consistent
        return preprocess_params, {}, postprocess_params

    def postprocess(
        self, model_outputs: Any, min_confidence: float | None = None, consistent: bool = True
    ) -> dict[str, Any]:
        prediction = self.model.predict_from_logits(
            model_outputs["logits"],
            model_outputs["coarse_logits"],
            consistent=consistent,
            min_confidence=min_confidence,
        )
        result = {
            "label": prediction.fine_labels[0],
            "score": float(prediction.fine_scores[0]),
            "coarse_label": prediction.coarse_labels[0],
            "coarse_score": float(prediction.coarse_scores[0]),
        }
        if prediction.answer_levels is not None:
            result |= {
                "answer_level": prediction.answer_levels[0],
                "answer_label": prediction.answer_labels[0],
                "answer_score": float(prediction.answer_scores[0]),
                "min_confidence": prediction.min_confidence,
            }
        return result


_registered = PIPELINE_REGISTRY.supported_tasks.get(HIERARCHICAL_PIPELINE_TASK)
if _registered is None or _registered["impl"].__name__ != HierarchicalImageClassificationPipeline.__name__:
    # once per process: a model loaded with trust_remote_code imports a second copy of this file
    PIPELINE_REGISTRY.register_pipeline(
        HIERARCHICAL_PIPELINE_TASK,
        pipeline_class=HierarchicalImageClassificationPipeline,
        pt_model=AutoModelForImageClassification,
        type="image",
    )

__all__ = ["HierarchicalImageClassificationPipeline"]
