"""The Hugging Face Hub and download servers as the project meets them: what reads as a Hub id, whether a server
answers, what is already cached, and offline mode. It imports nothing of the project."""

from __future__ import annotations

import os
import re
import urllib.request
from pathlib import Path

import datasets
import huggingface_hub
import torch
from huggingface_hub import constants as hub_constants
from torchvision.models import EfficientNet_V2_S_Weights

PROBE_TIMEOUT_S = 5.0
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # `name` or `owner/name`


def is_hub_id(name: str | None) -> bool:
    """Whether `name` reads as a Hub id (`name` or `owner/name`) and names nothing on this machine."""
    return bool(name) and HUB_ID.fullmatch(name) is not None and not os.path.exists(os.path.expanduser(name))


def is_hub_dataset(name: str | None) -> bool:
    """Whether `--dataset_name` names a Hub dataset: a Hub id other than the `imagefolder` builder."""
    return name != "imagefolder" and is_hub_id(name)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face Hub answers within `timeout` seconds (False in offline mode, without a request)."""
    if hub_constants.HF_HUB_OFFLINE:
        return False
    try:
        huggingface_hub.get_session().head(hub_constants.ENDPOINT, timeout=timeout)
    except Exception:  # offline mode, DNS, connection or timeout errors: all mean "not reachable now"
        return False
    return True


def url_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the server of `url` answers a HEAD request within `timeout` seconds."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except Exception:  # URLError, socket timeouts, HTTP errors
        return False


def enable_offline_mode() -> None:
    """Make huggingface_hub, datasets and transformers read their caches without trying the network (and without
    retrying), in this process and in the processes it starts."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers
    datasets.config.HF_HUB_OFFLINE = True  # datasets keeps its own copy, read at call time


def dataset_is_cached(repo_id: str, cache_dir: str | None = None) -> bool:
    """Whether `datasets` has `repo_id` prepared (`<cache>/<owner>___<name>`) or its files sit in the Hub cache."""
    prepared = Path(cache_dir or datasets.config.HF_DATASETS_CACHE, repo_id.replace("/", "___"))
    snapshots = Path(hub_constants.HF_HUB_CACHE, f"datasets--{repo_id.replace('/', '--')}", "snapshots")
    return any(folder.is_dir() and any(folder.iterdir()) for folder in (prepared, snapshots))


def model_is_cached(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> bool:
    """Whether the Hub cache holds the `config.json` of the model `repo_id`."""
    found = huggingface_hub.try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    return isinstance(found, str)


def imagenet_weights_path() -> Path:
    """Where torchvision keeps the ImageNet weights of EfficientNetV2-S: the torch hub cache (`$TORCH_HOME/hub`)."""
    return Path(torch.hub.get_dir(), "checkpoints", os.path.basename(EfficientNet_V2_S_Weights.IMAGENET1K_V1.url))
