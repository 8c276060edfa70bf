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

import base64
import binascii
import os
import urllib.request
from typing import Any

import PIL.Image
from transformers import AutoModelForImageClassification, ImageClassificationPipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging

try:  # loaded as a Hub module (trust_remote_code) or inside a package
    from .configuration_hierarchical import HIERARCHICAL_PIPELINE_TASK
    from .image_processing_hierarchical import DEFAULT_MAX_IMAGE_PIXELS, as_decodable, decode_rgb
except ImportError:  # imported from the project folder
    from configuration_hierarchical import HIERARCHICAL_PIPELINE_TASK
    from image_processing_hierarchical import DEFAULT_MAX_IMAGE_PIXELS, as_decodable, decode_rgb

logger = logging.get_logger(__name__)


class DecodingImageClassificationPipeline(ImageClassificationPipeline):
    r"""
    `pipeline("image-classification")` for the hierarchical models (named in `config.json`'s `custom_pipelines`):
    the standard pipeline, whose images are decoded by the model's own decoder ([`decode_rgb`]) instead of
    `load_image`, which clips 16-bit and float images. Images above the image processor's `max_image_pixels` are
    refused from their header, large ones are reduced while decoded, and a file that is not an image is refused
    naming it: the pixels are those the training script evaluated.

    Images may be file paths, `http(s)://` URLs, base64 strings, encoded bytes, PIL images of any mode, uint8 arrays
    or tensors.
    """

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, Any]:
        image = decode_rgb(
            _encoded_image(image, timeout),
            getattr(self.model.config, "image_size", None),
            getattr(self.image_processor, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
            where="the pipeline input",
        )
        return self.image_processor(images=image, return_tensors="pt").to(self.dtype)


def _encoded_image(image: Any, timeout: float | None) -> str | os.PathLike | bytes | PIL.Image.Image:
    """A pipeline input as `decode_rgb` takes it: a local path, URL content or base64 bytes, a PIL image (arrays
    and tensors become one, as `as_decodable` makes them)."""
    if not isinstance(image, str):
        return as_decodable(image)
    if image.startswith(("http://", "https://")):
        with urllib.request.urlopen(image, timeout=timeout) as response:
            return response.read()
    if os.path.exists(image):
        return image
    try:
        return base64.b64decode(image.split(",", 1)[1] if image.startswith("data:image/") else image, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the image {image!r} is neither a file, a URL nor base64 image data") from None


class HierarchicalImageClassificationPipeline(DecodingImageClassificationPipeline):
    r"""
    Image classification at both levels of the hierarchy with a hierarchical model
    (`HierarchicalEfficientNetV2ForImageClassification`): the model's `predict_from_logits` with its calibrated
    temperatures and consistent probabilities. Images are decoded as by [`DecodingImageClassificationPipeline`].

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

__all__ = ["DecodingImageClassificationPipeline", "HierarchicalImageClassificationPipeline"]
