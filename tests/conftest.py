"""Shared test parts: tiny datasets in the `uoft-cs/cifar100` schema and in the original cifar-100-python format, a
small model (`small_config`, `model`, `saved_model_dir`), options for short runs (`tiny_args`, `data_args`), a script
runner (`run_script`), and the session's caches kept in its temporary folder."""

from __future__ import annotations

import io
import logging
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import datasets
import hypothesis
import numpy as np
import PIL.Image
import pytest
import torch
import transformers.dynamic_module_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the flat project modules, whatever the pytest rootdir

from configuration_hierarchical import (  # noqa: E402
    CIFAR100_COARSE_LABELS,
    CIFAR100_FINE_LABELS,
    CIFAR100_FINE_TO_COARSE,
    HierarchicalEfficientNetV2Config,
)
from data_utils import DataArguments  # noqa: E402
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification, build_image_processor  # noqa: E402

NUM_FINE = len(CIFAR100_FINE_LABELS)

# Under pytest-xdist (`-n 2`, the README's command) each worker computes on one thread, and so do the scripts it
# starts: two workers then share the two cores without oversubscribing them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

# Property-based tests: the same examples on every run (a CI failure reproduces), no per-example deadline (the
# machine's speed varies), and a small example count so that all of them together stay within a minute.
hypothesis.settings.register_profile(
    "project",
    derandomize=True,
    deadline=None,
    max_examples=25,
    suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.function_scoped_fixture],
)
hypothesis.settings.load_profile("project")


@pytest.fixture(scope="session", autouse=True)
def caches_in_session_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """What the tests load is cached in the session's temporary folder, not the user's ~/.cache (in this process and
    in the scripts the tests start): the datasets cache, and the code copies of models loaded with
    `trust_remote_code`. Both go when the session's folder does."""
    datasets_cache = tmp_path_factory.mktemp("hf-datasets-cache")
    modules_cache = str(tmp_path_factory.mktemp("hf-modules-cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", str(datasets_cache))
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", datasets_cache)
        patch.setenv("HF_MODULES_CACHE", modules_cache)
        patch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", modules_cache)
        yield


@pytest.fixture(autouse=True)
def log_levels_restored() -> Iterator[None]:
    """A script's `main` sets the transformers, datasets and project log levels for its process; each test starts
    from the levels the session began with, whatever ran before it in the same worker."""
    names = ("transformers", "datasets", "hierarchical")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def small_config(**kwargs) -> HierarchicalEfficientNetV2Config:
    """A 32 px config with random backbone weights (no download)."""
    return HierarchicalEfficientNetV2Config(**{"backbone_weights": None, "image_size": 32, **kwargs})


def data_args(tmp_path: Path, dataset_name: str | Path, **kwargs) -> DataArguments:
    """DataArguments whose datasets cache lives in the test's temporary folder."""
    return DataArguments(dataset_name=str(dataset_name), cache_dir=str(tmp_path / "hf_cache"), **kwargs)


@pytest.fixture(scope="module")
def model() -> HierarchicalEfficientNetV2ForImageClassification:
    """A small random model (seed 0) in eval mode."""
    torch.manual_seed(0)
    return HierarchicalEfficientNetV2ForImageClassification(small_config()).eval()


def cifar100_features() -> datasets.Features:
    """The features of `uoft-cs/cifar100`: `img`, `fine_label` and `coarse_label`."""
    return datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=CIFAR100_FINE_LABELS),
            "coarse_label": datasets.ClassLabel(names=CIFAR100_COARSE_LABELS),
        }
    )


def make_image_array(label: int, rng: np.random.Generator, size: int | tuple[int, int] = 32) -> np.ndarray:
    """A (H, W, 3) uint8 image: seeded noise plus a weak colour that depends on the class."""
    height, width = (size, size) if isinstance(size, int) else size
    colour = np.array([(label * 37) % 128, (label * 73) % 128, (label * 11) % 128], dtype=np.uint8)
    return (rng.integers(0, 128, (height, width, 3), dtype=np.uint8) + colour).astype(np.uint8)


def encode_image(image: PIL.Image.Image, format: str = "PNG") -> bytes:
    """The bytes of `image` saved in `format`."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def make_parquet_dataset(
    path: str | Path,
    rows_per_class: int = 1,
    *,
    split: str = "train",
    seed: int = 0,
    image_size: int | tuple[int, int] = 32,
    image_mode: str = "RGB",
    fine_labels: list[int] | None = None,
    coarse_labels: list[int] | None = None,
    image_bytes: dict[int, bytes] | None = None,
    rename: dict[str, str] | None = None,
    drop_columns: tuple[str, ...] = (),
    file_name: str | None = None,
) -> Path:
    """Write one parquet shard in the `uoft-cs/cifar100` schema and return its path.

    Rows are `rows_per_class` images of every fine class in class order. Variants for tests: `fine_labels` /
    `coarse_labels` replace the label columns (stored as plain integers, so they may be out of range),
    `image_bytes` replaces the encoded image of given rows, `image_mode` converts every image (`"L"`, `"P"`,
    `"RGBA"`, `"I;16"`, ...), `rename` and `drop_columns` change the columns. The file is
    `{split}-00000-of-00001.parquet` unless `file_name` says otherwise.
    """
    rng = np.random.default_rng(seed)
    labels = [label for label in range(NUM_FINE) for _ in range(rows_per_class)]
    images = []
    for row, label in enumerate(labels):
        if image_bytes is not None and row in image_bytes:
            images.append({"bytes": image_bytes[row], "path": None})
            continue
        image = PIL.Image.fromarray(make_image_array(label, rng, image_size))
        if image_mode == "I;16":
            image = PIL.Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
        elif image_mode != "RGB":
            image = image.convert(image_mode)
        images.append({"bytes": encode_image(image), "path": None})
    features = cifar100_features()
    if fine_labels is not None or coarse_labels is not None:
        features["fine_label"] = features["coarse_label"] = datasets.Value("int64")
    if coarse_labels is None:
        coarse_labels = [CIFAR100_FINE_TO_COARSE[label] for label in labels]
    columns = {
        "img": images,
        "fine_label": labels if fine_labels is None else fine_labels,
        "coarse_label": coarse_labels,
    }
    dataset = datasets.Dataset.from_dict(columns, features=features)
    dataset = dataset.remove_columns(list(drop_columns))
    for old, new in (rename or {}).items():
        dataset = dataset.rename_column(old, new)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / (file_name or f"{split}-00000-of-00001.parquet")
    dataset.to_parquet(str(file))
    return file


def write_cifar_python(folder: str | Path, train_labels: list[int], test_labels: list[int], seed: int = 0) -> Path:
    """Write `train`, `test` and `meta` as in the original cifar-100-python archive (dicts with bytes keys)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, labels in (("train", train_labels), ("test", test_labels)):
        images = np.stack([make_image_array(label, rng) for label in labels])  # (N, 32, 32, 3)
        content = {
            b"batch_label": f"{split} batch 1 of 1".encode(),
            b"filenames": [f"{split}_{row}.png".encode() for row in range(len(labels))],
            b"fine_labels": list(labels),
            b"coarse_labels": [CIFAR100_FINE_TO_COARSE[label] for label in labels],
            b"data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1),  # (N, 3072), channel-first rows
        }
        (folder / split).write_bytes(pickle.dumps(content, protocol=4))
    meta = {
        b"fine_label_names": [name.encode() for name in CIFAR100_FINE_LABELS],
        b"coarse_label_names": [name.encode() for name in CIFAR100_COARSE_LABELS],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=4))
    return folder


@pytest.fixture(scope="session")
def tiny_parquet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with `train-00000-of-00001.parquet` (2 images per class) and `test-00000-of-00001.parquet` (1 per class)."""
    folder = tmp_path_factory.mktemp("tiny_parquet")
    make_parquet_dataset(folder, rows_per_class=2, split="train", seed=0)
    make_parquet_dataset(folder, rows_per_class=1, split="test", seed=1)
    return folder


@pytest.fixture(scope="session")
def tiny_cifar_python_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `cifar-100-python` folder with `train` (1 image per class), `test` (50 images) and `meta`."""
    folder = tmp_path_factory.mktemp("cifar_python") / "cifar-100-python"
    return write_cifar_python(folder, train_labels=list(range(NUM_FINE)), test_labels=list(range(0, NUM_FINE, 2)))


PROJECT_DIR = Path(__file__).resolve().parents[1]
METRIC_NAMES = {
    "fine_accuracy",
    "fine_top5_accuracy",
    "coarse_accuracy",
    "coarse_from_fine_accuracy",
    "consistency",
    "both_correct",
    "mistake_severity",
}


def tiny_args(data: Path, output_dir: Path, *extra: str) -> list[str]:
    """Options for a run of a few seconds: 32 px, random backbone, 64 training images."""
    return [
        "--dataset_name", str(data), "--output_dir", str(output_dir), "--image_size", "32",
        "--backbone_weights", "none", "--max_train_samples", "64", "--max_eval_samples", "20",
        "--max_predict_samples", "30", "--epochs", "1", "--batch_size", "16", "--report_to", "none",
        "--logging_steps", "1", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory: pytest.TempPathFactory, model) -> Path:
    """The `model` saved with its image processor, as `run_classification.py` writes it."""
    path = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(path)
    build_image_processor(model.config).save_pretrained(path)
    return path


HANG_TIMEOUT_S = 1800  # only stops a hung process: far above what any script run of the suite takes


def run_script(*argv: str) -> subprocess.CompletedProcess:
    """`python *argv` in a fresh process started in the project folder, its output captured as text."""
    return subprocess.run(
        [sys.executable, *argv], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=HANG_TIMEOUT_S
    )
