"""Offline start: every remote resource is checked before any work, and everything missing is named in one error.

No test touches the network: the Hub is simulated offline with HF_HUB_OFFLINE and the probes are replaced."""

import datasets
import huggingface_hub
import pytest
import torch

from conftest import tiny_args
from hierarchical.training import remote_resources
from run_classification import main


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No Hub, no download.pytorch.org, empty caches; the probes count their calls."""
    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(remote_resources, "hub_reachable", lambda: calls.append("hub") or False)
    monkeypatch.setattr(remote_resources, "url_reachable", lambda url: calls.append(url) or False)
    return calls


def run_options(tmp_path, *extra):
    """tiny_args with the given options last (they win over the tiny defaults)."""
    return tiny_args(tmp_path / "unused", tmp_path / "out", "--do_train", "--do_eval", *extra)


def missing_resources_error(tmp_path, *extra) -> str:
    """The message of the `FileNotFoundError` that a run with these options stops with."""
    with pytest.raises(FileNotFoundError) as raised:
        main(run_options(tmp_path, *extra))
    return str(raised.value)


def test_one_error_names_the_dataset_and_the_imagenet_weights(offline, tmp_path):
    message = missing_resources_error(tmp_path, "--dataset_name", "uoft-cs/cifar100", "--backbone_weights", "imagenet")
    assert "'uoft-cs/cifar100'" in message and "python data_utils.py download cifar100-local" in message
    assert "--dataset_name cifar100-local" in message
    assert "efficientnet_v2_s-dd5fe13b.pth" in message and "--backbone_weights none" in message
    assert "python data_utils.py download-weights" in message and "HF_HUB_OFFLINE is set" in message
    assert "cifar100-real" not in message
    assert offline == ["hub", remote_resources.EfficientNet_V2_S_Weights.IMAGENET1K_V1.url]  # one probe each
    assert not (tmp_path / "out").exists(), "nothing is written before the check"


def test_one_error_names_the_dataset_and_the_base_model(offline, tmp_path):
    message = missing_resources_error(
        tmp_path, "--dataset_name", "someone/cifar-copy", "--model_name_or_path", "someone/model"
    )
    assert "'someone/cifar-copy'" in message and "'someone/model'" in message
    assert "ImageNet" not in message  # a saved model never reads the ImageNet weights
    assert offline == ["hub"]


def test_cached_resources_load_in_offline_mode_without_a_download(offline, tmp_path, monkeypatch):
    monkeypatch.setattr(remote_resources, "enable_offline_mode", lambda: offline.append("offline mode"))
    (tmp_path / "datasets" / "uoft-cs___cifar100" / "default").mkdir(parents=True)
    weights = tmp_path / "torch" / "hub" / "checkpoints" / "efficientnet_v2_s-dd5fe13b.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    remote_resources.check_remote_resources("uoft-cs/cifar100", None, "imagenet")
    assert offline == ["hub", "offline mode"]  # the weights are cached: their server is not probed


def test_local_sources_need_no_network(offline, tiny_parquet_dir, tmp_path):
    remote_resources.check_remote_resources(str(tiny_parquet_dir), None, None)
    remote_resources.check_remote_resources(str(tiny_parquet_dir), str(tmp_path), "imagenet")  # a saved model
    assert offline == []
