"""Hierarchical EfficientNetV2-S for CIFAR-100: a coarse head (superclasses) and a fine head (classes).

How the two heads' logits become predictions (consistent probabilities, selective answers) is in
`prediction_hierarchical.py`, saved with the model; its functions and `HierarchicalPrediction` are importable
from here too.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import EfficientNet_V2_S_Weights, efficientnet_v2_s
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

try:  # loaded as a Hub module (trust_remote_code) or inside a package
    from .configuration_hierarchical import HierarchicalEfficientNetV2Config, check_label_range, check_unit_interval
    from .image_processing_hierarchical import DEFAULT_MAX_IMAGE_PIXELS, HierarchicalImageProcessor
    from .prediction_hierarchical import (
        HierarchicalPrediction,
        hierarchical_log_probabilities,
        hierarchical_probabilities,
        selective_answers,
    )
except ImportError:  # imported from the project folder
    from configuration_hierarchical import HierarchicalEfficientNetV2Config, check_label_range, check_unit_interval
    from image_processing_hierarchical import DEFAULT_MAX_IMAGE_PIXELS, HierarchicalImageProcessor
    from prediction_hierarchical import (
        HierarchicalPrediction,
        hierarchical_log_probabilities,
        hierarchical_probabilities,
        selective_answers,
    )

logger = logging.get_logger(__name__)

BACKBONE_CHANNELS = 1280  # output channels of torchvision's efficientnet_v2_s().features
_LOADING_PRETRAINED = contextvars.ContextVar("hierarchical_loading_pretrained", default=False)


@contextlib.contextmanager
def skip_backbone_weights() -> Iterator[None]:
    """Inside this context, building a model does not load `config.backbone_weights`."""
    token = _LOADING_PRETRAINED.set(True)
    try:
        yield
    finally:
        _LOADING_PRETRAINED.reset(token)


def load_backbone_state_dict(source: str) -> dict[str, torch.Tensor]:
    """Read torchvision EfficientNetV2-S weights: `"imagenet"` (downloaded once into the torch hub cache) or a local
    `.pth`/`.pt`/`.safetensors` state dict (read with `weights_only=True`). Returns the `features.*` entries."""
    if source == "imagenet":
        weights = EfficientNet_V2_S_Weights.IMAGENET1K_V1
        try:
            state_dict = weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
        except OSError as error:  # URLError, socket errors and a missing cache are all OSErrors
            cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
            raise OSError(
                f"Could not download the ImageNet weights of EfficientNetV2-S from {weights.url} ({error}). "
                f"Either place that file at {cache}, pass its local path as backbone_weights "
                "(e.g. --backbone_weights /path/efficientnet_v2_s-dd5fe13b.pth), or pass backbone_weights=None "
                "(--backbone_weights none) to start from random weights."
            ) from error
    else:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"backbone_weights file {source!r} does not exist")
        if source.endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict = load_file(source)
        else:
            try:
                state_dict = torch.load(source, map_location="cpu", weights_only=True)
            except Exception as error:  # the restricted unpickler refuses anything but tensors and containers
                raise ValueError(
                    f"backbone_weights file {source!r} is not a plain state dict that loads with weights_only=True: "
                    f"{type(error).__name__}: {str(error).splitlines()[0]}"
                ) from error
    if not isinstance(state_dict, dict):
        raise ValueError(f"backbone_weights file {source!r} holds a {type(state_dict).__name__}, not a state dict")
    features = {key: value for key, value in state_dict.items() if key.startswith("features.")}
    if not features:
        raise ValueError(
            f"backbone_weights {source!r} has no 'features.*' entries; expected a torchvision efficientnet_v2_s "
            f"state dict, got keys like {list(state_dict)[:3]}"
        )
    return {key.removeprefix("features."): value for key, value in features.items()}


@dataclass
class HierarchicalImageClassifierOutput(ModelOutput):
    """
    Output of [`HierarchicalEfficientNetV2ForImageClassification`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Fine cross-entropy + `coarse_loss_weight` x coarse cross-entropy, when labels are given.
        logits (`torch.FloatTensor` of shape `(batch, num_labels)`):
            Fine-class logits (what the Trainer and pipelines read).
        coarse_logits (`torch.FloatTensor` of shape `(batch, num_coarse_labels)`):
            Superclass logits.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    coarse_logits: torch.FloatTensor | None = None


class HierarchicalEfficientNetV2PreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading shared by the hierarchical models."""

    config_class = HierarchicalEfficientNetV2Config
    base_model_prefix = "hierarchical_efficientnet_v2"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> HierarchicalEfficientNetV2PreTrainedModel:
        """Load a saved model; `config.backbone_weights` is not read (the saved weights are). Weights that hold NaN
        or infinite values are refused with `ValueError` naming the tensors, whatever loads the model (a script, a
        pipeline, `AutoModel`): such a model would answer meaningless classes."""
        wants_info = kwargs.pop("output_loading_info", False)
        with skip_backbone_weights():
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        not_loaded = {  # left to initialisation, judged by whoever accepts them; mismatched: (name, shapes)
            key[0] if isinstance(key, tuple) else key
            for kind in ("missing_keys", "mismatched_keys")
            for key in info.get(kind) or ()
        }
        bad = nonfinite_tensors((name, value) for name, value in model.state_dict().items() if name not in not_loaded)
        if bad:
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise ValueError(
                f"the model {str(source)!r} holds {nonfinite_summary(bad)}; it cannot be trained, evaluated or used "
                "for predictions"
            )
        return (model, info) if wants_info else model

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise the linear heads and the hierarchy buffers; the backbone keeps torchvision's (or loaded)
        weights."""
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=0.01)
            init.zeros_(module.bias)
        elif isinstance(module, HierarchicalEfficientNetV2ForImageClassification):
            # non-persistent buffers are not in the checkpoint: rebuild them from the config
            init.copy_(module.fine_to_coarse, module.config.fine_to_coarse_tensor())
            init.copy_(module.hierarchy, module.config.hierarchy_matrix())
            for name in ("fine_class_weights", "coarse_class_weights"):
                if getattr(module, name) is not None:
                    init.copy_(getattr(module, name), module.config.class_weights_tensor(name))


class HierarchicalEfficientNetV2ForImageClassification(HierarchicalEfficientNetV2PreTrainedModel):
    r"""
    EfficientNetV2-S features, global average pooling and dropout, then a coarse linear head (superclasses) and a
    fine linear head (classes) whose input is the pooled features concatenated with the coarse logits.

    Args:
        config ([`HierarchicalEfficientNetV2Config`]):
            Model configuration. A model built from a config loads `config.backbone_weights` into the backbone;
            `from_pretrained` loads the saved weights instead.

    Example:

    ```python
    >>> import torch
    >>> from configuration_hierarchical import HierarchicalEfficientNetV2Config
    >>> from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification
    >>> config = HierarchicalEfficientNetV2Config(backbone_weights=None, image_size=32)
    >>> model = HierarchicalEfficientNetV2ForImageClassification(config).eval()
    >>> outputs = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([4, 95]))
    >>> outputs.logits.shape, outputs.coarse_logits.shape
    (torch.Size([2, 100]), torch.Size([2, 20]))
    ```
    """

    def __init__(self, config: HierarchicalEfficientNetV2Config):
        super().__init__(config)
        self.features = efficientnet_v2_s(weights=None, stochastic_depth_prob=config.drop_path_rate).features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(config.dropout)
        self.coarse_classifier = nn.Linear(BACKBONE_CHANNELS, config.num_coarse_labels)
        fine_inputs = BACKBONE_CHANNELS + (config.num_coarse_labels if config.fine_head_uses_coarse_logits else 0)
        self.fine_classifier = nn.Linear(fine_inputs, config.num_labels)
        self.register_buffer("fine_to_coarse", config.fine_to_coarse_tensor(), persistent=False)
        self.register_buffer("hierarchy", config.hierarchy_matrix(), persistent=False)
        for name in ("fine_class_weights", "coarse_class_weights"):
            self.register_buffer(name, config.class_weights_tensor(name), persistent=False)

        if config.backbone_weights is not None and not _LOADING_PRETRAINED.get():
            self.load_backbone_weights(config.backbone_weights)
        for stage in self.frozen_stages():
            stage.requires_grad_(False)
        if config.channels_last:
            self.to(memory_format=torch.channels_last)
        self.post_init()

    def frozen_stages(self) -> list[nn.Module]:
        """The first `config.num_frozen_stages` feature stages."""
        return list(self.features[: self.config.num_frozen_stages])

    def train(self, mode: bool = True) -> HierarchicalEfficientNetV2ForImageClassification:
        """Set train/eval mode; frozen stages always stay in eval mode (BatchNorm statistics unchanged)."""
        super().train(mode)
        for stage in self.frozen_stages():
            stage.eval()
        return self

    def load_backbone_weights(self, source: str) -> None:
        """Load torchvision EfficientNetV2-S weights (`"imagenet"` or a local file) into the backbone."""
        state_dict = load_backbone_state_dict(source)
        try:
            self.features.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"backbone_weights {source!r} does not match EfficientNetV2-S: {str(error).splitlines()[0]}"
            ) from error
        logger.info("Loaded EfficientNetV2-S backbone weights from %s", source)

    def _check_inputs(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None, coarse_labels: torch.Tensor | None
    ):
        """Raise `ValueError` describing what was expected when an input has the wrong shape, dtype or range.

        The range of class indices is checked on the CPU only: on an accelerator, reading their minimum and maximum
        back would make the host wait for the device at every step (`HierarchicalCollator` checks them on the CPU).
        """
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must be a (batch, 3, height, width) tensor, got {shape}")
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have {self.config.num_channels} channels (RGB) in dim 1, got shape "
                f"{tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a floating-point tensor (normalised pixels), got {pixel_values.dtype}"
            )
        batch = pixel_values.shape[0]
        for name, target, classes in (
            ("labels", labels, self.config.num_labels),
            ("coarse_labels", coarse_labels, self.config.num_coarse_labels),
        ):
            if target is None:
                continue
            if target.is_floating_point():  # soft targets (mixup/cutmix, smoothing)
                if target.shape != (batch, classes):
                    raise ValueError(f"soft {name} must have shape ({batch}, {classes}), got {tuple(target.shape)}")
            elif target.shape != (batch,):
                raise ValueError(f"{name} must have shape ({batch},), got {tuple(target.shape)}")
            elif target.device.type == "cpu":
                check_label_range(target, classes, name)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        coarse_labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> HierarchicalImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 3, height, width)`):
                Normalised images.
            labels (`torch.LongTensor` of shape `(batch,)` or `torch.FloatTensor` of shape `(batch, num_labels)`, *optional*):
                Fine class indices, or soft targets (mixup/cutmix).
            coarse_labels (`torch.LongTensor` of shape `(batch,)` or `torch.FloatTensor` of shape `(batch, num_coarse_labels)`, *optional*):
                Superclass indices or soft targets. Derived from `labels` through the hierarchy when omitted.
            return_dict (`bool`, *optional*):
                Return a [`HierarchicalImageClassifierOutput`] (default) or a tuple.
        """
        if not torch.compiler.is_compiling():
            self._check_inputs(pixel_values, labels, coarse_labels)
        if self.config.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        pooled = self.pool(self.features(pixel_values)).flatten(1)  # (batch, 1280)
        pooled = self.dropout(pooled)
        coarse_logits = self.coarse_classifier(pooled)  # (batch, num_coarse)
        if self.config.fine_head_uses_coarse_logits:
            pooled = torch.cat([pooled, coarse_logits], dim=1)  # (batch, 1280 + num_coarse)
        logits = self.fine_classifier(pooled)  # (batch, num_labels)

        loss = None
        if labels is not None:
            if coarse_labels is None:
                coarse_labels = labels @ self.hierarchy if labels.is_floating_point() else self.fine_to_coarse[labels]
            smoothing = self.config.label_smoothing
            fine_loss = F.cross_entropy(
                logits.float(), labels, weight=self.fine_class_weights, label_smoothing=smoothing
            )
            coarse_loss = F.cross_entropy(
                coarse_logits.float(), coarse_labels, weight=self.coarse_class_weights, label_smoothing=smoothing
            )
            loss = fine_loss + self.config.coarse_loss_weight * coarse_loss

        if return_dict is False:
            output = (logits, coarse_logits)
            return ((loss,) + output) if loss is not None else output
        return HierarchicalImageClassifierOutput(loss=loss, logits=logits, coarse_logits=coarse_logits)

    @torch.no_grad()
    def predict_hierarchical(
        self, pixel_values: torch.Tensor, consistent: bool = True, min_confidence: float | None = None
    ) -> HierarchicalPrediction:
        """Predict superclass and class for a batch of normalised images; see [`predict_from_logits`]."""
        outputs = self(pixel_values)
        return self.predict_from_logits(outputs.logits, outputs.coarse_logits, consistent, min_confidence)

    @torch.no_grad()
    def predict_from_logits(
        self,
        logits: torch.Tensor,
        coarse_logits: torch.Tensor,
        consistent: bool = True,
        min_confidence: float | None = None,
    ) -> HierarchicalPrediction:
        """Predictions from the two heads' logits (`(batch, num_labels)`, `(batch, num_coarse_labels)`).

        Each head's logits are divided by its calibrated temperature (`config.fine_temperature`,
        `config.coarse_temperature`; 1 when the model was not calibrated). A temperature never changes a head's own
        argmax, but it changes how the two heads weigh against each other, and so can change the consistent
        prediction. With `consistent=True` both predictions come from the combined distribution of
        [`hierarchical_probabilities`] (`p_fine(f) * p_coarse(parent(f))`, renormalised; a superclass's probability
        is the sum of its classes'): the predicted class is the most probable class and the predicted superclass the
        most probable superclass, the one superclass answers use. When the probability is spread over a
        superclass's classes the two can disagree with the hierarchy; `parent_ids`/`parent_labels` name the
        superclass of the predicted class. With `consistent=False` each head is read on its own (softmax and argmax)
        and no selective answer is given (the threshold is chosen on the combined distribution).

        Selective answers (consistent predictions only): with `min_confidence` (or, when it is not given,
        `config.selective_threshold`), each image also gets the class when its probability reaches the threshold,
        else the most probable superclass when its probability reaches it, else `"unknown"` ([`selective_answers`]).
        """
        config = self.config
        if not consistent and min_confidence is not None:
            raise ValueError(
                f"min_confidence={min_confidence!r} with consistent=False: selective answers read the consistent "
                "distribution; leave consistent=True to get them"
            )
        threshold = (
            config.selective_threshold
            if min_confidence is None
            else check_unit_interval("min_confidence", min_confidence, "(0, 1]")
        )
        fine_to_coarse = self.fine_to_coarse.to(logits.device)
        temperatures = (config.fine_temperature, config.coarse_temperature)
        if consistent:
            fine_probs, coarse_probs = hierarchical_probabilities(logits, coarse_logits, fine_to_coarse, *temperatures)
        else:
            fine_probs = (logits.float() / temperatures[0]).softmax(-1)
            coarse_probs = (coarse_logits.float() / temperatures[1]).softmax(-1)
        fine_scores, fine_ids = fine_probs.max(-1)
        coarse_scores, coarse_ids = coarse_probs.max(-1)
        parent_ids = fine_to_coarse[fine_ids]
        prediction = HierarchicalPrediction(
            fine_ids=fine_ids,
            fine_scores=fine_scores,
            coarse_ids=coarse_ids,
            coarse_scores=coarse_scores,
            fine_labels=[config.id2label[int(i)] for i in fine_ids],
            coarse_labels=[config.coarse_label_names[int(i)] for i in coarse_ids],
            parent_ids=parent_ids,
            parent_labels=[config.coarse_label_names[int(i)] for i in parent_ids],
            fine_probs=fine_probs,
            coarse_probs=coarse_probs,
        )
        if consistent and threshold is not None:
            prediction.add_selective_answers(
                fine_probs, coarse_probs, threshold, (config.id2label, config.coarse_label_names)
            )
        return prediction


def build_image_processor(
    config: HierarchicalEfficientNetV2Config, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> HierarchicalImageProcessor:
    """The image processor that prepares images for `config`, saved beside the model for pipelines: the model's own
    decoder (every PIL mode, images above `max_image_pixels` refused from their header, large ones reduced), resize
    to `image_size` and normalisation with `image_mean`/`image_std`, as the training script evaluates."""
    return HierarchicalImageProcessor(
        max_image_pixels=max_image_pixels,
        size={"height": config.image_size, "width": config.image_size},
        image_mean=config.image_mean,
        image_std=config.image_std,
    )


# The hierarchical pipeline: importing it registers the task, and this relative import makes `save_pretrained` copy
# its file beside the model (config.json names it in `custom_pipelines`).
try:
    from .pipeline_hierarchical import HierarchicalImageClassificationPipeline  # noqa: E402, F401
except ImportError:
    from pipeline_hierarchical import HierarchicalImageClassificationPipeline  # noqa: E402, F401

HierarchicalEfficientNetV2Config.register_for_auto_class()
HierarchicalEfficientNetV2ForImageClassification.register_for_auto_class("AutoModelForImageClassification")
AutoConfig.register(HierarchicalEfficientNetV2Config.model_type, HierarchicalEfficientNetV2Config, exist_ok=True)
AutoModelForImageClassification.register(
    HierarchicalEfficientNetV2Config, HierarchicalEfficientNetV2ForImageClassification, exist_ok=True
)
AutoImageProcessor.register(
    HierarchicalEfficientNetV2Config, fast_image_processor_class=HierarchicalImageProcessor, exist_ok=True
)


def nonfinite_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the floating-point tensors of `(name, tensor)` pairs that hold NaN or infinite values: the one
    test of loaded weights (a saved model's, a checkpoint's file)."""
    return [name for name, value in tensors if value.is_floating_point() and not torch.isfinite(value).all()]


def nonfinite_summary(names: list[str]) -> str:
    """`names` of [`nonfinite_tensors`] as messages give them: "NaN or infinite values in N tensors: a, b, ..."."""
    return (
        f"NaN or infinite values in {len(names)} tensors: " + ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    )


__all__ = [
    "build_image_processor",
    "HierarchicalEfficientNetV2ForImageClassification",
    "HierarchicalEfficientNetV2PreTrainedModel",
    "HierarchicalImageClassifierOutput",
    "HierarchicalPrediction",
    "hierarchical_log_probabilities",
    "hierarchical_probabilities",
    "load_backbone_state_dict",
    "nonfinite_summary",
    "nonfinite_tensors",
    "skip_backbone_weights",
    "selective_answers",
]
