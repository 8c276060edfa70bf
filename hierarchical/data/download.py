"""Make the local copies a machine without internet access needs: run once where the internet is reachable, then
copy the folder (and the weights file) to the offline machine.

    python data_utils.py download cifar100-local                    # uoft-cs/cifar100 from the Hub, as parquet
    python data_utils.py download cifar100-local --source archive   # the official cifar-100-python.tar.gz
    python data_utils.py download-weights                           # ImageNet weights into the torch hub cache

Then `python run_classification.py --dataset_name cifar100-local ...`.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tarfile
from pathlib import Path

import datasets
from datasets import load_dataset
from torchvision.datasets.utils import check_integrity, download_url
from torchvision.models import EfficientNet_V2_S_Weights
from transformers.utils import logging

from hierarchical.data.sources import CIFAR_PYTHON_FILES
from hierarchical.hub import hub_reachable, imagenet_weights_path, url_reachable
from hierarchical.options import run_command

logger = logging.get_logger(__name__)

HUB_DATASET = "uoft-cs/cifar100"
CIFAR100_ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
DEFAULT_FOLDER = "cifar100-local"
MAX_ROWS_PER_SHARD = 25_000


def _check_reachable(server: str, reachable: bool, instead: str) -> None:
    """`ConnectionError` naming `server` when it does not answer (no download attempts, no retries)."""
    if not reachable:
        raise ConnectionError(
            f"{server} does not answer: this command needs internet access. Run it on a machine that has it and copy "
            f"the result here; offline, it accepts {instead}"
        )


def _prepare_destination(destination: str | Path, overwrite: bool) -> Path:
    """Create `destination`; refuse (unless `overwrite`) when it already holds data, which would be mixed in."""
    folder = Path(destination).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"destination {str(folder)!r} is a file, not a folder")
    existing = [p.name for p in folder.glob("*") if p.suffix == ".parquet" or p.name == "cifar-100-python"]
    if existing and not overwrite:
        raise ValueError(
            f"destination {str(folder)!r} already holds {sorted(existing)[:3]}: choose another folder, or pass "
            "--overwrite to replace them"
        )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_parquet_shards(
    dataset_dict: datasets.DatasetDict, destination: str | Path, overwrite: bool = False
) -> list[Path]:
    """Write every split as `<split>-0000i-of-0000N.parquet` shards (at most `MAX_ROWS_PER_SHARD` rows each), the
    layout of the Hub's parquet datasets that `--dataset_name FOLDER` reads split by split. Returns the files."""
    folder = _prepare_destination(destination, overwrite)
    for old in folder.glob("*.parquet"):
        old.unlink()  # only reached with overwrite=True
    written = []
    for split, dataset in dataset_dict.items():
        num_shards = max(1, math.ceil(len(dataset) / MAX_ROWS_PER_SHARD))
        for index in range(num_shards):
            path = folder / f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
            partial = path.with_name(f".{path.name}.partial")  # hidden and not *.parquet until complete
            dataset.shard(num_shards, index, contiguous=True).to_parquet(str(partial))
            partial.replace(path)
            written.append(path)
    return written


def download_cifar100_parquet(destination: str | Path, overwrite: bool = False) -> list[Path]:
    """Download `uoft-cs/cifar100` (train and test) from the Hub and write it as parquet shards to `destination`."""
    _check_reachable("the Hugging Face Hub", hub_reachable(), "--archive FILE (a cifar-100-python.tar.gz on disk)")
    dataset_dict = load_dataset(HUB_DATASET)
    missing = {"train", "test"} - set(dataset_dict)
    if missing:
        raise ValueError(f"{HUB_DATASET} came without the splits {sorted(missing)}; it has {list(dataset_dict)}")
    return write_parquet_shards(dataset_dict, destination, overwrite)


def safe_extract_tar(archive: str | Path, destination: str | Path) -> list[str]:
    """Extract the regular files and folders of a `.tar.gz` into `destination`; refuse absolute paths, `..`, links
    and device files before anything is written. Returns the member names."""
    destination = Path(destination).resolve()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            target = (destination / member.name).resolve()
            outside = target != destination and destination not in target.parents
            if os.path.isabs(member.name) or ".." in Path(member.name).parts or outside:
                raise ValueError(f"{archive}: refused the member {member.name!r}, which points outside {destination}")
            if not (member.isfile() or member.isdir()):
                raise ValueError(f"{archive}: refused the member {member.name!r}: only files and folders are expected")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the standard library checks once more
            tar.extractall(destination, members=members, filter="data")
        else:
            tar.extractall(destination, members=members)
    return [member.name for member in members]


def download_cifar100_archive(
    destination: str | Path, archive: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Download the official `cifar-100-python.tar.gz` (or use `archive`, a copy already on disk), check its MD5 and
    extract it safely into `destination`. Returns the `cifar-100-python` folder, which `--dataset_name` reads."""
    folder = _prepare_destination(destination, overwrite)
    if archive is None:
        _check_reachable(CIFAR100_ARCHIVE_URL, url_reachable(CIFAR100_ARCHIVE_URL), "--archive FILE (the file on disk)")
        download_url(CIFAR100_ARCHIVE_URL, str(folder), filename="cifar-100-python.tar.gz")
        archive = folder / "cifar-100-python.tar.gz"
    if not check_integrity(str(archive), CIFAR100_ARCHIVE_MD5):
        raise ValueError(
            f"{archive}: MD5 differs from {CIFAR100_ARCHIVE_MD5} (the official archive); the download is incomplete "
            "or the file is another one"
        )
    if overwrite and (folder / "cifar-100-python").is_dir():
        shutil.rmtree(folder / "cifar-100-python")
    safe_extract_tar(archive, folder)
    extracted = folder / "cifar-100-python"
    missing = [name for name in CIFAR_PYTHON_FILES if not (extracted / name).is_file()]
    if missing:
        raise ValueError(f"{archive}: the archive has no cifar-100-python/{', '.join(missing)}")
    return extracted


def download_imagenet_weights(copy_to: str | Path | None = None) -> Path:
    """Fetch torchvision's `IMAGENET1K_V1` EfficientNetV2-S weights into the torch hub cache (hash checked);
    with `copy_to`, also copy the file into that folder to carry it to another machine. Returns the file."""
    weights = EfficientNet_V2_S_Weights.IMAGENET1K_V1
    if not imagenet_weights_path().is_file():
        _check_reachable(weights.url, url_reachable(weights.url), "nothing: the file has to come from there")
    weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    path = imagenet_weights_path()
    if copy_to is not None:
        Path(copy_to).expanduser().mkdir(parents=True, exist_ok=True)
        path = Path(shutil.copy2(path, Path(copy_to).expanduser() / path.name))
    return path


def write_generated_cifar100(
    destination: str | Path, train_per_class: int = 3, test_per_class: int = 1, seed: int = 0
) -> list[Path]:
    """Write small generated images (32 px, a colour per class plus noise) in the `uoft-cs/cifar100` schema, as
    `train` and `test` parquet shards: a stand-in that lets examples run end to end where neither the Hub nor a local
    copy is there. Models learn nothing real from it."""
    import numpy as np

    from configuration_hierarchical import CIFAR100_COARSE_LABELS, CIFAR100_FINE_LABELS, CIFAR100_FINE_TO_COARSE

    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=CIFAR100_FINE_LABELS),
            "coarse_label": datasets.ClassLabel(names=CIFAR100_COARSE_LABELS),
        }
    )
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 200, (len(CIFAR100_FINE_LABELS), 3))  # (classes, 3)
    splits = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = [label for label in range(len(CIFAR100_FINE_LABELS)) for _ in range(per_class)]
        noise = rng.integers(0, 56, (len(labels), 32, 32, 3))  # (rows, 32, 32, 3)
        images = (palette[labels][:, None, None, :] + noise).astype(np.uint8)
        columns = {
            "img": list(images),
            "fine_label": labels,
            "coarse_label": [CIFAR100_FINE_TO_COARSE[label] for label in labels],
        }
        splits[split] = datasets.Dataset.from_dict(columns, features=features)
    return write_parquet_shards(datasets.DatasetDict(splits), destination, overwrite=True)


def build_parser() -> argparse.ArgumentParser:
    """The `download` and `download-weights` commands."""
    parser = argparse.ArgumentParser(
        prog="python data_utils.py",
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data = commands.add_parser(
        "download",
        help="write CIFAR-100 (train and test) to a folder that --dataset_name reads offline",
        description="Write CIFAR-100 (train and test) to DEST, a folder that `run_classification.py --dataset_name "
        "DEST` reads offline: parquet shards in the uoft-cs/cifar100 schema (from the Hub), or the extracted official "
        "cifar-100-python archive (MD5 checked, extracted without links or paths outside DEST).",
        allow_abbrev=False,
    )
    data.add_argument(
        "destination",
        nargs="?",
        default=DEFAULT_FOLDER,
        metavar="DEST",
        help=f"Folder to write (default {DEFAULT_FOLDER}).",
    )
    data.add_argument(
        "--source",
        choices=("hub", "archive"),
        default="hub",
        help=f"hub: {HUB_DATASET} as parquet shards (default); archive: {CIFAR100_ARCHIVE_URL}.",
    )
    data.add_argument(
        "--archive", default=None, help="A cifar-100-python.tar.gz already on disk (implies --source archive)."
    )
    data.add_argument("--overwrite", action="store_true", help="Replace the data already in the folder.")
    weights = commands.add_parser(
        "download-weights",
        help="fetch the ImageNet weights of EfficientNetV2-S into the torch hub cache",
        description="Fetch torchvision's ImageNet weights of EfficientNetV2-S (efficientnet_v2_s-dd5fe13b.pth) into "
        "the torch hub cache, where --backbone_weights imagenet finds them. On the offline machine, put the file in "
        "its torch hub cache (the path printed) or pass --backbone_weights /path/to/the/file.",
        allow_abbrev=False,
    )
    weights.add_argument("--copy_to", default=None, help="Also copy the file into this folder, to carry it elsewhere.")
    return parser


def main(argv: list[str] | None = None) -> Path:
    """Run one command; print what was written and how to use it."""
    args = build_parser().parse_args(argv)
    logging.set_verbosity_info()
    if args.command == "download-weights":
        path = download_imagenet_weights(args.copy_to)
        print(f"Wrote {path}.")
        print(
            f"On a machine without internet access, put it at {imagenet_weights_path()} (its torch hub cache; "
            f"TORCH_HOME changes it) for --backbone_weights imagenet, or pass --backbone_weights {path}."
        )
        return path
    if args.source == "archive" or args.archive is not None:
        folder = download_cifar100_archive(args.destination, args.archive, args.overwrite)
        print(f"Extracted {folder}.")
    else:
        files = download_cifar100_parquet(args.destination, args.overwrite)
        print(f"Wrote {len(files)} parquet files to {args.destination}: {', '.join(p.name for p in files)}.")
    print(f"Use it with: python run_classification.py --dataset_name {args.destination} ...")
    return Path(args.destination)


def cli(argv: list[str] | None = None) -> None:
    """`main` for the command line: a user error as one `error:` line on stderr and exit status 2, as the other
    commands end theirs (`hierarchical.options.run_command`)."""
    run_command(lambda: main(argv))
