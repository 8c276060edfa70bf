"""The `hierarchical-image-classification` pipeline: class and superclass with calibrated scores, and a selective
answer (the class, else the superclass, else "unknown") for every image.

Every saved model carries this file and names it in `config.json` (`custom_pipelines`), so that anywhere

    >>> from transformers import pipeline
    >>> classifier = pipeline("hierarchical-image-classification", model="me/model", trust_remote_code=True)
    >>> classifier("photo.png")  # doctest: +SKIP
    {'label': 'maple_tree', 'score': 0.71, 'coarse_label': 'trees', 'coarse_score': 0.93,
     'parent_of_label': 'trees', 'answer_level': 'coarse', 'answer_label': 'trees', 'answer_score': 0.93,
     'min_confidence': 0.8}
    >>> classifier(["a.png", "b.png"])  # doctest: +SKIP
    [{...}, {...}]  # a list (a tuple, a generator, a dataset) runs in batches of DEFAULT_BATCH_SIZE
    >>> classifier(dataset["img"], batch_size=64)  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.request
from collections.abc import Iterator
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

# Images per forward pass for a list or a dataset when `batch_size` is not given: on 2 CPU cores at 32 px, batch 1
# ran about 10x slower than batched model calls on the same images (see benchmarks/benchmark.py, part 4).
DEFAULT_BATCH_SIZE = 32
NO_THRESHOLD_WARNING = (
    "The model has no selective_threshold in its config: pass min_confidence=... to get selective answers"
)


class DecodingImageClassificationPipeline(ImageClassificationPipeline):
    r"""
    `pipeline("image-classification")` for the hierarchical models (named in `config.json`'s `custom_pipelines`):
    the standard pipeline, whose images are decoded by the model's own decoder ([`decode_rgb`]) instead of
    `load_image`, which clips 16-bit and float images. Images above the image processor's `max_image_pixels` are
    refused from their header, large ones are reduced while decoded, and a file that is not an image is refused
    naming it: the pixels are those the training script evaluated.

    Images may be file paths, `http(s)://` URLs, base64 strings, encoded bytes, PIL images of any mode, arrays or
    tensors (uint8, or float in [0, 1] or [0, 255]; read as the image processor reads them).
    """

    def __call__(self, inputs: Any = None, **kwargs: Any) -> Any:
        """Classify one image, a list or tuple of images, a generator, a `datasets` column (`dataset["img"]`) or a
        `datasets` dataset with one image column (its images, decoded as they are reached): one result for one image,
        a list for a list, a tuple, a column or a dataset, an iterator for a generator or a streamed dataset."""
        inputs = kwargs.pop("images", inputs)
        if isinstance(inputs, list | tuple) and not inputs:
            return []
        images = _image_iterator(inputs)
        if images is None:
            return super().__call__(inputs, **kwargs)
        results = super().__call__(images, **kwargs)
        return list(results) if hasattr(inputs, "__len__") else results

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, Any]:
        image = decode_rgb(
            _encoded_image(image, timeout),
            getattr(self.model.config, "image_size", None),
            getattr(self.image_processor, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
            where="the pipeline input",
        )
        return self.image_processor(images=image, return_tensors="pt").to(self.dtype)


def _image_iterator(inputs: Any) -> Iterator[Any] | None:
    """A generator over the images of a tuple, a `datasets` column or a `datasets` dataset (`Dataset` or
    `IterableDataset`) with exactly one `Image` column, so that the pipeline runs them in batches like a list; None
    for any other input, which the pipeline takes as it is. `ValueError` naming the columns for a dataset without
    exactly one image column."""
    if isinstance(inputs, tuple):
        return (image for image in inputs)
    if not type(inputs).__module__.startswith("datasets."):
        return None
    if not hasattr(inputs, "column_names"):  # a column: its values are the images
        return (image for image in inputs)
    features = inputs.features or {}
    columns = [name for name, feature in features.items() if type(feature).__name__ == "Image"]
    if len(columns) != 1:
        example = columns[0] if columns else "name"
        raise ValueError(
            f"a dataset given to the pipeline needs exactly one Image column, got {columns or 'none'} among its "
            f"columns {inputs.column_names}: pass the images of one column, e.g. classifier(dataset[{example!r}])"
        )
    return (row[columns[0]] for row in inputs)


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
    temperatures and consistent probabilities. Images are decoded as by [`DecodingImageClassificationPipeline`]. A
    list, a tuple or a generator of images, a `datasets` column or dataset runs in batches of `DEFAULT_BATCH_SIZE`
    (32) unless `batch_size` is given (to `pipeline(...)` or to the call).

    Call arguments (besides the images, `batch_size` and `timeout`):
        min_confidence (`float`, *optional*, defaults to `config.selective_threshold`):
            Threshold of the selective answer, in (0, 1].
        consistent (`bool`, *optional*, defaults to `True`):
            Read the class and superclass from the combined distribution (`False`: each head on its own, every
            score from that head's softmax, and no selective answer).
        top_k (`int`, *optional*):
            Also return the `top_k` most probable classes and superclasses, from the same distribution as `label`
            and `coarse_label`.

    Returns, per image, a dict: `label` and `score` (the most probable class), `coarse_label` and `coarse_score`
    (the most probable superclass, the one a superclass answer names), `parent_of_label` (the superclass of
    `label`; it differs from `coarse_label` when the probability is spread over another superclass's classes), with
    `top_k` also `top_labels` and `top_coarse_labels` (lists of `{"label", "score"}`, best first), and when a
    threshold is known and `consistent` is true `answer_level` (`"fine"`, `"coarse"` or `"abstain"`),
    `answer_label` (a class, a superclass or `"unknown"`), `answer_score` and `min_confidence`.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        if kwargs.get("batch_size") is None:
            kwargs["batch_size"] = DEFAULT_BATCH_SIZE
        super().__init__(*args, **kwargs)
        if not hasattr(self.model, "predict_from_logits"):
            raise ValueError(
                f"{HIERARCHICAL_PIPELINE_TASK} needs a hierarchical model (with predict_from_logits), "
                f"got {type(self.model).__name__}"
            )
        self._warned_no_threshold = False

    def _sanitize_parameters(
        self,
        min_confidence: float | None = None,
        consistent: bool | None = None,
        top_k: int | None = None,
        timeout: float | None = None,
    ) -> tuple[dict, dict, dict]:
        preprocess_params = {} if timeout is None else {"timeout": timeout}
        postprocess_params = {}
        if min_confidence is not None:
            postprocess_params["min_confidence"] = min_confidence
        if consistent is not None:
            if not isinstance(consistent, bool):
                raise TypeError(f"consistent must be True or False, got {consistent!r}")
            postprocess_params["consistent"] = consistent
        if top_k is not None:
            if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
                raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
            postprocess_params["top_k"] = top_k
        return preprocess_params, {}, postprocess_params

    def postprocess(
        self,
        model_outputs: Any,
        min_confidence: float | None = None,
        consistent: bool = True,
        top_k: int | None = None,
    ) -> dict[str, Any]:
        stored = getattr(self.model.config, "selective_threshold", None)
        if consistent and min_confidence is None and stored is None and not self._warned_no_threshold:
            logger.warning(NO_THRESHOLD_WARNING)
            self._warned_no_threshold = True
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
            "parent_of_label": prediction.parent_labels[0],
        }
        if top_k is not None:
            config = self.model.config
            result["top_labels"] = _top(prediction.fine_probs[0], top_k, config.id2label)
            result["top_coarse_labels"] = _top(prediction.coarse_probs[0], top_k, config.coarse_label_names)
        if prediction.answer_levels is not None:
            result |= {
                "answer_level": prediction.answer_levels[0],
                "answer_label": prediction.answer_labels[0],
                "answer_score": float(prediction.answer_scores[0]),
                "min_confidence": prediction.min_confidence,
            }
        return result


def _top(probs: Any, k: int, names: Any) -> list[dict[str, Any]]:
    """The `k` most probable entries of a `(num_classes,)` distribution (fewer when there are fewer classes), as
    `{"label", "score"}` dicts, best first; `names` maps an index to its name."""
    scores, ids = probs.topk(min(k, probs.shape[-1]))
    return [{"label": names[int(i)], "score": float(p)} for p, i in zip(scores, ids, strict=True)]


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
