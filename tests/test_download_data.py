"""`python data_utils.py download DEST` and `download-weights`: the local copies an offline machine needs.

The downloads themselves cannot run here (no internet access): each test replaces the network call
(`load_dataset`, torchvision's `download_url`, the weights' `get_state_dict`) with one that returns or
writes small generated data, and checks everything after it: the files written, their names and schema, the MD5
check, the safe extraction, and that `--dataset_name DEST` reads the result.
"""

import hashlib
import io
import shutil
import tarfile

import datasets
import pytest
import torch

from conftest import make_parquet_dataset, run_script, small_config, write_cifar_python
from data_utils import DataArguments, prepare_datasets
from hierarchical.data import download as download_data


@pytest.fixture
def hub_copy(tiny_parquet_dir):
    """What `load_dataset("uoft-cs/cifar100")` returns, built from the generated parquet shards."""
    files = {split: str(tiny_parquet_dir / f"{split}-00000-of-00001.parquet") for split in ("train", "test")}
    return datasets.load_dataset("parquet", data_files=files)


def read_back(folder):
    config = small_config()
    return prepare_datasets(DataArguments(dataset_name=str(folder), train_val_split=0.0), config, seed=0)


def test_download_writes_parquet_shards_in_the_hub_schema(hub_copy, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(download_data, "load_dataset", lambda name: calls.append(name) or hub_copy)
    monkeypatch.setattr(download_data, "hub_reachable", lambda: True)
    monkeypatch.setattr(download_data, "MAX_ROWS_PER_SHARD", 150)  # the 200 training rows make two shards
    download_data.main(["download", str(tmp_path / "cifar100-local")])
    assert calls == ["uoft-cs/cifar100"]
    names = sorted(p.name for p in (tmp_path / "cifar100-local").iterdir())
    assert names == ["test-00000-of-00001.parquet", "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    written = datasets.load_dataset("parquet", data_dir=str(tmp_path / "cifar100-local"))
    assert written["train"].features == hub_copy["train"].features
    assert written["train"]["fine_label"] == hub_copy["train"]["fine_label"]
    splits = read_back(tmp_path / "cifar100-local")
    assert {name: len(split) for name, split in splits.items()} == {"train": 200, "test": 100}


def test_download_refuses_a_folder_that_already_holds_data(hub_copy, tmp_path, monkeypatch):
    monkeypatch.setattr(download_data, "load_dataset", lambda name: hub_copy)
    monkeypatch.setattr(download_data, "hub_reachable", lambda: True)
    make_parquet_dataset(tmp_path / "dest", split="train")
    with pytest.raises(ValueError, match="already holds.*--overwrite"):
        download_data.main(["download", str(tmp_path / "dest")])
    download_data.main(["download", str(tmp_path / "dest"), "--overwrite"])
    assert len(read_back(tmp_path / "dest")["train"]) == 200


def make_archive(path, members=None):
    """A cifar-100-python.tar.gz with generated train/test/meta files (or the given raw members)."""
    source = write_cifar_python(path.parent / "source" / "cifar-100-python", [0, 1, 2], [3])
    with tarfile.open(path, "w:gz") as tar:
        if members is None:
            tar.add(source, arcname="cifar-100-python")
        for name, data in (members or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_archive_download_checks_the_md5_and_extracts(tmp_path, monkeypatch):
    archive = tmp_path / "generated.tar.gz"
    monkeypatch.setattr(download_data, "CIFAR100_ARCHIVE_MD5", make_archive(archive))
    calls = []

    def fake_download_url(url, root, filename=None, md5=None):
        calls.append(url)
        shutil.copy(archive, f"{root}/{filename}")

    monkeypatch.setattr(download_data, "download_url", fake_download_url)
    monkeypatch.setattr(download_data, "url_reachable", lambda url: True)
    download_data.main(["download", str(tmp_path / "local"), "--source", "archive"])
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]
    splits = read_back(tmp_path / "local")
    assert {name: len(split) for name, split in splits.items()} == {"train": 3, "test": 1}


def test_archive_with_another_md5_is_refused(tmp_path):
    archive = tmp_path / "cifar-100-python.tar.gz"
    make_archive(archive)
    with pytest.raises(ValueError, match="MD5 differs from eb9058c3a382ffc7106e4002c42a8d85"):
        download_data.main(["download", str(tmp_path / "local"), "--archive", str(archive)])
    assert not (tmp_path / "local" / "cifar-100-python").exists()


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute-escaped", "cifar-100-python/../../escaped"])
def test_archive_members_outside_the_destination_are_refused(tmp_path, name):
    archive = tmp_path / "evil.tar.gz"
    make_archive(archive, members={"cifar-100-python/meta": b"x", name: b"payload"})
    destination = tmp_path / "dest" / "inner"
    destination.mkdir(parents=True)
    with pytest.raises(ValueError, match="points outside"):
        download_data.safe_extract_tar(archive, destination)
    assert not list((tmp_path / "dest").rglob("*escaped*")) and not list(destination.iterdir())


def test_archive_links_are_refused(tmp_path):
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-100-python/train")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ValueError, match="only files and folders"):
        download_data.safe_extract_tar(archive, tmp_path / "dest")


def test_download_weights_fetches_into_the_torch_hub_cache_and_copies(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch" / "hub"))
    weights = download_data.EfficientNet_V2_S_Weights.IMAGENET1K_V1

    def fake_get_state_dict(*args, **kwargs):  # what torchvision does: download into the torch hub cache
        path = tmp_path / "torch" / "hub" / "checkpoints" / "efficientnet_v2_s-dd5fe13b.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"features.0.0.weight": torch.zeros(1)}, path)
        return torch.load(path, weights_only=True)

    monkeypatch.setattr(type(weights), "get_state_dict", fake_get_state_dict)
    monkeypatch.setattr(download_data, "url_reachable", lambda url: True)
    path = download_data.main(["download-weights", "--copy_to", str(tmp_path / "carry")])
    assert path == tmp_path / "carry" / "efficientnet_v2_s-dd5fe13b.pth" and path.is_file()
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "efficientnet_v2_s-dd5fe13b.pth").is_file()


def test_help_lists_the_commands():
    completed = run_script("data_utils.py", "--help")
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "download" in completed.stdout and "download-weights" in completed.stdout
    assert "cifar100-local" in completed.stdout


def test_without_internet_the_commands_stop_at_once_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download_data, "hub_reachable", lambda: False)
    monkeypatch.setattr(download_data, "url_reachable", lambda url: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch" / "hub"))
    monkeypatch.setattr(download_data, "load_dataset", lambda name: pytest.fail("no download may be attempted"))
    monkeypatch.setattr(download_data, "download_url", lambda *args, **kwargs: pytest.fail("no download"))
    for command in (["download", str(tmp_path / "a")], ["download", str(tmp_path / "b"), "--source", "archive"]):
        with pytest.raises(SystemExit) as exit_info:
            download_data.cli(command)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and "does not answer: this command needs internet access" in error
        assert error.count("\n") == 1, "one line"
    with pytest.raises(SystemExit) as exit_info:
        download_data.cli(["download-weights"])
    assert exit_info.value.code == 2 and "download.pytorch.org" in capsys.readouterr().err
