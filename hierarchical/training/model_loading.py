"""Loading the model a run trains or evaluates: a fresh one for the data's classes, or a saved one, checked
tensor by tensor."""

from __future__ import annotations

import logging
import os

import torch

from configuration_hierarchical import HierarchicalEfficientNetV2Config
from hierarchical.data.hierarchy import Hierarchy, reinitialize_heads
from hierarchical.hub import is_hub_id
from hierarchical.training.arguments import ModelArguments
from hierarchical.training.checkpoints import safetensors_problem
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification, skip_backbone_weights

logger = logging.getLogger(__name__)


def load_model(
    model_args: ModelArguments, cache_dir: str | None = None, hierarchy: Hierarchy | None = None
) -> HierarchicalEfficientNetV2ForImageClassification:
    """Load a saved model (folder or Hub id, Hub files cached in `cache_dir`) or build a fresh one for the classes of
    `hierarchy` (the data's, from `discover_hierarchy`; CIFAR-100 when None). A saved model of another hierarchy is
    refused, or with `--reinitialize_heads` gets new heads for `hierarchy`."""
    overrides = model_args.config_overrides()
    if model_args.model_name_or_path is None:
        classes = hierarchy.config_kwargs() if hierarchy is not None else {}
        config = HierarchicalEfficientNetV2Config(backbone_weights=model_args.backbone_weights, **classes, **overrides)
        return HierarchicalEfficientNetV2ForImageClassification(config)
    model = load_saved_model(model_args, cache_dir, overrides)
    if model_args.reinitialize_heads:
        if hierarchy is None:
            raise ValueError(
                "--reinitialize_heads needs the classes of the data, but it names no hierarchy (plain integer labels, "
                "or class names without superclasses): pass a --hierarchy_file, a coarse label column or "
                "superclass/class image folders"
            )
        return reinitialize_heads(model, hierarchy)
    if hierarchy is not None and (problem := hierarchy.mismatch(model.config)):
        raise ValueError(
            f"--model_name_or_path {model_args.model_name_or_path!r} was trained for other classes: {problem}. Pass "
            "--reinitialize_heads true to keep its backbone and train new heads for the data's classes"
        )
    return model


def check_model_folder(source: str) -> None:
    """`ValueError` naming what the model folder `source` lacks: its config, a weights file, or complete
    safetensors files."""
    missing = [name for name in ("config.json",) if not os.path.isfile(os.path.join(source, name))]
    if not any(name.endswith((".safetensors", ".bin")) for name in os.listdir(source)):
        missing.append("model.safetensors")
    if missing:
        raise ValueError(f"--model_name_or_path {source!r} is not a saved model: it has no {', '.join(missing)}")
    for name in sorted(os.listdir(source)):
        problem = safetensors_problem(os.path.join(source, name)) if name.endswith(".safetensors") else None
        if problem:
            raise ValueError(
                f"--model_name_or_path {source!r}: {problem}; copy the model folder again or pass another one"
            )


def load_saved_model(
    model_args: ModelArguments, cache_dir: str | None, overrides: dict
) -> HierarchicalEfficientNetV2ForImageClassification:
    """Load `--model_name_or_path` (folder or Hub id) with the config options given on the command line. Weights
    that hold NaN or infinite values are refused by the model's own `from_pretrained`."""
    source = model_args.model_name_or_path
    if os.path.isdir(source):
        check_model_folder(source)
    elif not is_hub_id(source):
        raise ValueError(f"--model_name_or_path {source!r} is neither a folder nor a Hub id (owner/name)")
    try:
        model, info = HierarchicalEfficientNetV2ForImageClassification.from_pretrained(
            source,
            cache_dir=cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, with the other differences
            **overrides,
        )
    except OSError as error:
        raise ValueError(
            f"could not load the model {source!r}: {str(error).splitlines()[0]} "
            "(offline? pass a local folder written by this script)"
        ) from error
    problems = [
        f"{len(info[kind])} {what} ({', '.join(sorted(map(str, info[kind]))[:5])}{', ...' if len(info[kind]) > 5 else ''})"
        for kind, what in (
            ("missing_keys", "tensors missing from the weights file"),
            ("unexpected_keys", "unexpected tensors in the weights file"),
            ("mismatched_keys", "tensors of another shape"),
        )
        if info.get(kind)
    ]
    if problems and not model_args.allow_missing_weights:
        raise ValueError(
            f"--model_name_or_path {source!r} does not match the model: {'; '.join(problems)}. Pass a complete "
            "model folder, or --allow_missing_weights to keep fresh weights for the missing tensors"
        )
    if problems:
        logger.warning("Loaded %s with --allow_missing_weights: %s", source, "; ".join(problems))
    not_loaded = {  # mismatched keys come as (name, shape in the file, shape in the model)
        key[0] if isinstance(key, tuple) else key
        for kind in ("missing_keys", "mismatched_keys")
        for key in info.get(kind) or ()
    }
    if not_loaded:
        initialise_fresh(model, not_loaded)
    return model


def initialise_fresh(model: HierarchicalEfficientNetV2ForImageClassification, names: set[str]) -> None:
    """Give the tensors `names` of `model` (those its weights file did not hold, or held at another shape) the
    values of a freshly built model of the same config: loading skips their initialisation, which would leave
    whatever the memory held."""
    with skip_backbone_weights():
        fresh = type(model)(model.config).state_dict()
    state = model.state_dict()
    with torch.no_grad():
        for name in names:
            if name in state and name in fresh:
                state[name].copy_(fresh[name])
