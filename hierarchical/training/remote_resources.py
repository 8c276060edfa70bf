"""Check, before any work, that every remote resource a run needs is on this machine or can be downloaded.

A run may need the dataset (a Hub id), the model it starts from (a Hub id) and torchvision's ImageNet weights. Each
is looked up in its local cache first; what is not cached needs its server, which is probed once with a short
timeout. When the Hugging Face Hub does not answer, offline mode is switched on, so that cached resources load
without the libraries' download retries; everything still missing is named in one error with what to pass instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub import constants as hub_constants
from torchvision.models import EfficientNet_V2_S_Weights
from transformers.utils import logging

from hierarchical.data.sources import LOCAL_DATA_HINT
from hierarchical.hub import (
    dataset_is_cached,
    enable_offline_mode,
    hub_reachable,
    imagenet_weights_path,
    is_hub_dataset,
    is_hub_id,
    model_is_cached,
    url_reachable,
)

logger = logging.get_logger(__name__)


@dataclass
class Resource:
    """One remote resource of a run: what it is, whether a local copy is there, and what to pass instead."""

    description: str
    cached: bool
    server: str  # "hub" or the URL it downloads from
    instead: str


def needed_resources(
    dataset_name: str | None,
    *,
    model_name_or_path: str | None = None,
    backbone_weights: str | None = None,
    cache_dir: str | None = None,
    revision: str | None = None,
    push_to_hub: bool = False,
) -> list[Resource]:
    """The remote resources a run with these options downloads (or, with `push_to_hub`, uploads to), with whether
    each is cached here (`None`: the option is not given; no model to start from, random backbone weights)."""
    needed = []
    if push_to_hub:
        needed.append(
            Resource(
                "the Hub, to upload the model at the end (--push_to_hub)",
                False,
                "hub",
                "leave out --push_to_hub and upload the output folder later from a machine with internet access "
                "(`hf upload NAME OUTPUT_DIR`)",
            )
        )
    if is_hub_dataset(dataset_name):
        needed.append(
            Resource(
                f"the dataset {dataset_name!r} (--dataset_name: no local folder of that name, not in the cache)",
                dataset_is_cached(dataset_name, cache_dir),
                "hub",
                LOCAL_DATA_HINT,
            )
        )
    if is_hub_id(model_name_or_path):
        needed.append(
            Resource(
                f"the model {model_name_or_path!r} (--model_name_or_path: no local folder of that name, not in the "
                "cache)",
                model_is_cached(model_name_or_path, revision, cache_dir),
                "hub",
                "pass --model_name_or_path with a local folder written by run_classification.py (or save_pretrained)",
            )
        )
    if model_name_or_path is None and backbone_weights == "imagenet":
        path = imagenet_weights_path()
        needed.append(
            Resource(
                f"the ImageNet weights of EfficientNetV2-S (--backbone_weights imagenet: {path.name}, not in "
                f"{path.parent})",
                path.is_file(),
                EfficientNet_V2_S_Weights.IMAGENET1K_V1.url,
                "fetch them once on a machine with internet access with `python data_utils.py download-weights "
                f"--copy_to weights`, then put the file in {path.parent} or pass --backbone_weights "
                f"weights/{path.name}; or pass --backbone_weights none (random initialisation)",
            )
        )
    return needed


def check_remote_resources(
    dataset_name: str | None,
    model_name_or_path: str | None,
    backbone_weights: str | None,
    cache_dir: str | None = None,
    revision: str | None = None,
    push_to_hub: bool = False,
) -> None:
    """Fail fast, naming everything missing at once, when a needed resource is neither cached nor reachable (the
    Hub, with `push_to_hub`, must be reachable).

    Probes the Hub (once, with a short timeout) when the run needs anything from it; when it does not answer,
    switches on offline mode so that cached resources load from the cache. Raises `FileNotFoundError` listing every
    missing resource with what to pass instead.
    """
    needed = needed_resources(
        dataset_name,
        model_name_or_path=model_name_or_path,
        backbone_weights=backbone_weights,
        cache_dir=cache_dir,
        revision=revision,
        push_to_hub=push_to_hub,
    )
    offline_asked = hub_constants.HF_HUB_OFFLINE
    reachable: dict[str, bool] = {}
    for resource in needed:
        if resource.server not in reachable and (resource.server == "hub" or not resource.cached):
            reachable[resource.server] = hub_reachable() if resource.server == "hub" else url_reachable(resource.server)
    if reachable.get("hub") is False:
        enable_offline_mode()
        if any(r.server == "hub" and r.cached for r in needed):
            logger.warning("The Hugging Face Hub does not answer: using the copies in the local cache (offline mode)")
    missing = [r for r in needed if not r.cached and not reachable[r.server]]
    if not missing:
        return
    servers = []
    if any(r.server == "hub" for r in missing):
        why = "HF_HUB_OFFLINE is set" if offline_asked else "it does not answer"
        servers.append(f"the Hugging Face Hub ({hub_constants.ENDPOINT}: {why})")
    servers += [f"{r.server.split('/')[2]} (it does not answer)" for r in missing if r.server != "hub"]
    lines = [
        f"This run needs {'these' if len(missing) > 1 else 'this'}, which {'are' if len(missing) > 1 else 'is'} not "
        f"on this machine and cannot be downloaded now from {' or '.join(servers)}:"
    ]
    lines += [f"  - {r.description}: {r.instead}" for r in missing]
    raise FileNotFoundError("\n".join(lines))


__all__ = [
    "check_remote_resources",
    "enable_offline_mode",
    "hub_reachable",
    "imagenet_weights_path",
    "needed_resources",
    "url_reachable",
]
