"""Data pipeline of the hierarchical CIFAR-100 classifier: loading, validation, transforms and collation.

`prepare_datasets` turns any supported source into splits with the columns `image`, `labels`, `coarse_labels`
and `index`; `apply_transforms` attaches the transforms; `HierarchicalCollator` builds batches (with
optional MixUp/CutMix on fine and coarse targets alike). All training randomness is drawn from seeds derived from
(seed, epoch, row index), never from the global RNG, so a resumed run sees the same augmentations as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import math
import os
import pickle
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import PIL.Image
import PIL.ImageOps
import pyarrow
import pyarrow.compute
import pyarrow.ipc
import pyarrow.parquet
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from torchvision.transforms import v2
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from configuration_hierarchical import HierarchicalEfficientNetV2Config
from device_preprocess import JITTER_ORDERS, DevicePreprocessor
from hierarchy_data import discover_hierarchy, load_hierarchy_tree

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct

logger = logging.get_logger(__name__)

AUGMENTATION_POLICIES = ("original", "trivialaugment", "randaugment", "autoaugment", "none")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
CIFAR_PYTHON_FILES = ("train", "test", "meta")
LOCAL_DATA_HINT = (
    "make a local copy once on a machine with internet access (`python data_utils.py download cifar100-local`), "
    "copy that folder here and pass --dataset_name cifar100-local"
)
# Known misspellings of class names in published dataset metadata (uoft-cs/cifar100 spells "crab" as "cra").
LABEL_NAME_ALIASES = {"cra": "crab"}
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


@dataclass
class DataArguments:
    """Where the data comes from, which columns and splits to use, and how training images are augmented."""

    dataset_name: str = field(
        default="uoft-cs/cifar100",
        metadata={
            "help": "A Hub dataset id; a local folder, file or glob of parquet/arrow files in the uoft-cs/cifar100 "
            "schema (in a folder: files named train-*/test-* at its top, or files in train/, validation/, test/ "
            "folders; other subfolders are not read); an image folder with one subfolder per class or "
            "superclass/class subfolders (or 'imagefolder' together with --data_dir); or an original cifar-100-python "
            "folder."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Data folder of a Hub dataset, or the folder of --dataset_name imagefolder."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where the datasets library caches what it loads."})
    image_column_name: str = field(default="img", metadata={"help": "Column that holds the images."})
    label_column_name: str = field(default="fine_label", metadata={"help": "Column that holds the fine labels."})
    coarse_label_column_name: str = field(
        default="coarse_label",
        metadata={"help": "Column that holds the superclass labels; derived from the fine labels when absent."},
    )
    hierarchy_file: str | None = field(
        default=None,
        metadata={
            "help": "JSON ({fine: coarse} or {coarse: [fine, ...]}) or CSV (rows fine,coarse) file mapping every class "
            "name to its superclass name, for data with fine labels only (plain integer labels are named by their "
            "decimal strings). Without it the hierarchy comes from the data: superclass/class/image folders, or the "
            "fine and coarse label columns; CIFAR-100 when the data names none."
        },
    )
    train_split_name: str = field(default="train", metadata={"help": "Name of the training split in the source."})
    validation_split_name: str = field(
        default="validation", metadata={"help": "Name of the validation split in the source, if it has one."}
    )
    test_split_name: str = field(default="test", metadata={"help": "Name of the test split in the source."})
    train_val_split: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of the training split carved out (with the training seed, stratified by class) as the "
            "validation split when the source has none; 0 carves nothing."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training rows (after splitting); default all."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N validation rows (after splitting); default all."}
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N test rows; default all."}
    )
    augmentation: str = field(
        default="original",
        metadata={
            "help": "Augmentation policy after crop and flip: 'original' (rotation + colour jitter), "
            "'trivialaugment', 'randaugment', 'autoaugment' (CIFAR-10 policy) or 'none'.",
            "choices": AUGMENTATION_POLICIES,
        },
    )
    rotation_degrees: float = field(
        default=15.0, metadata={"help": "Maximum rotation of the 'original' policy, in degrees; 0 disables it."}
    )
    color_jitter: float = field(
        default=0.4,
        metadata={"help": "Brightness, contrast and saturation jitter of the 'original' policy; 0 disables it."},
    )
    horizontal_flip: bool = field(default=True, metadata={"help": "Flip training images horizontally at random."})
    random_crop: bool = field(
        default=True,
        metadata={"help": "Random crop with zero padding (4 px at 32 px, scaled with larger sources), CIFAR-style."},
    )
    random_erasing: float = field(
        default=0.0, metadata={"help": "Probability of erasing a random rectangle of a training image."}
    )
    mixup_alpha: float = field(default=0.0, metadata={"help": "MixUp Beta(alpha, alpha) parameter; 0 disables it."})
    cutmix_alpha: float = field(default=0.0, metadata={"help": "CutMix Beta(alpha, alpha) parameter; 0 disables it."})
    mix_prob: float = field(
        default=1.0, metadata={"help": "Probability that a training batch is mixed when an alpha is above 0."}
    )
    cutmix_switch_prob: float = field(
        default=0.5, metadata={"help": "Probability of CutMix rather than MixUp when both alphas are above 0."}
    )
    max_image_pixels: int = field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metadata={
            "help": "Largest image (width x height) that is decoded; larger ones are refused from their header, "
            "before decoding, naming the row."
        },
    )
    drop_duplicate_images: bool = field(
        default=False,
        metadata={
            "help": "Images of the validation or test split whose encoded bytes equal those of a training image are "
            "refused by default; true drops them from the evaluation splits instead, and logs how many."
        },
    )

    def __post_init__(self) -> None:
        for option in dataclasses.fields(self):
            value = getattr(self, option.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
                raise ValueError(f"{option.name} must be a finite number, got {value!r}")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be a positive number of pixels, got {self.max_image_pixels!r}")
        if not 0.0 <= self.train_val_split < 1.0:
            raise ValueError(f"train_val_split must be in [0, 1), got {self.train_val_split!r}")
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of rows (or unset for all), got {value!r}")
        if self.augmentation not in AUGMENTATION_POLICIES:
            raise ValueError(f"augmentation must be one of {list(AUGMENTATION_POLICIES)}, got {self.augmentation!r}")
        for name in ("rotation_degrees", "color_jitter", "mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("random_erasing", "mix_prob", "cutmix_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability and must be in [0, 1], got {getattr(self, name)!r}")


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def load_raw_datasets(args: DataArguments) -> DatasetDict:
    """Load the source that `args.dataset_name` names, with the source's own splits and columns."""
    if args.dataset_name == "imagefolder":
        if args.data_dir is None:
            raise ValueError("--dataset_name imagefolder needs --data_dir, the folder with one subfolder per class")
        return load_image_folder(_existing_path(args.data_dir, "data_dir"), args)
    path = os.path.expanduser(args.dataset_name)
    if any(char in path for char in "*?["):  # a glob pattern
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"--dataset_name {args.dataset_name!r}: the pattern matches no file")
        return load_data_files(files, os.path.commonpath([os.path.dirname(p) for p in files]), args)
    if os.path.isfile(path):
        return load_data_files([path], os.path.dirname(path), args)
    if os.path.isdir(path):
        return load_local_folder(path, args)
    if not _is_hub_id(args.dataset_name):
        raise FileNotFoundError(f"--dataset_name {args.dataset_name!r}: no such file or folder")
    return load_hub_dataset(args)


def _is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub dataset id (`name` or `owner/name`) rather than a local path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None


def _existing_path(path: str, option: str) -> str:
    """`path` with `~` expanded; `FileNotFoundError` naming `option` when it does not exist."""
    expanded = os.path.expanduser(path)
    if not os.path.exists(expanded):
        raise FileNotFoundError(f"--{option} {path!r}: no such file or folder")
    return expanded


def load_hub_dataset(args: DataArguments) -> DatasetDict:
    """Load a Hub dataset; a clear error (no network traceback) when it cannot be reached."""
    try:
        return datasets.load_dataset(
            args.dataset_name, args.dataset_config_name, data_dir=args.data_dir, cache_dir=args.cache_dir
        )
    except OSError as error:  # ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError, HfHubHTTPError
        raise FileNotFoundError(
            f"The dataset {args.dataset_name!r} could not be downloaded from the Hugging Face Hub "
            f"({type(error).__name__}: {error}), and there is no local file or folder of that name. This machine "
            f"may be offline: {LOCAL_DATA_HINT} (parquet shards in the uoft-cs/cifar100 schema); an image folder "
            "with one subfolder per class or an extracted cifar-100-python folder work too."
        ) from None


def load_local_folder(path: str, args: DataArguments) -> DatasetDict:
    """Load a local folder: `save_to_disk` output, cifar-100-python files, parquet/arrow shards or an image folder.

    Parquet/arrow shards follow the conventional layout: split-named files at the top of the folder
    (`train-00000-of-00009.parquet`, `test.parquet`) or files in split-named folders (`train/`, `validation/`,
    `test/`). Data files anywhere else (a `backup/` copy, say) are not read; a warning names them.
    """
    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
        loaded = datasets.load_from_disk(path)
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({args.train_split_name: loaded})
    for folder in (path, os.path.join(path, "cifar-100-python")):
        if all(os.path.isfile(os.path.join(folder, name)) for name in CIFAR_PYTHON_FILES):
            return load_cifar_python(folder)
    split_names = (args.train_split_name, args.validation_split_name, args.test_split_name)
    candidates = _visible_files(path)
    for split in split_names:
        if os.path.isdir(os.path.join(path, split)):
            candidates += _visible_files(os.path.join(path, split))
    all_files = _list_files(path)
    for extension in DATA_FILE_BUILDERS:
        data_files = [f for f in candidates if f.endswith(extension)]
        if data_files:
            ignored = sorted(set(f for f in all_files if f.endswith(extension)) - set(data_files))
            if ignored:
                folders = sorted({os.path.relpath(os.path.dirname(f), path) for f in ignored})
                logger.warning(
                    f"Not reading {len(ignored)} {extension} files of {path!r} outside its top level and its split "
                    f"folders {list(split_names)}: they are in {folders}"
                )
            return load_data_files(data_files, path, args)
    if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in all_files):
        return load_image_folder(path, args)
    nested = sorted(
        {os.path.relpath(os.path.dirname(f), path) for f in all_files if f.endswith(tuple(DATA_FILE_BUILDERS))}
    )
    raise FileNotFoundError(
        f"--dataset_name {path!r} holds no parquet or arrow files at its top level or in split folders "
        f"{list(split_names)}, no images and no cifar-100-python files ({', '.join(CIFAR_PYTHON_FILES)})"
        + (f"; data files were found in {nested}: pass that folder, or a glob of the files" if nested else "")
    )


def _visible_files(folder: str) -> list[str]:
    """The regular, non-hidden files directly in `folder`, sorted."""
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries if not e.name.startswith((".", "__")) and e.is_file())


def _visible_subfolders(folder: str) -> list[str]:
    """The names of the non-hidden subfolders of `folder`, sorted."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith((".", "__")) and e.is_dir())


def _list_files(root: str) -> list[str]:
    """Every file under `root`, sorted, skipping hidden files and folders."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith((".", "__")))
        found.extend(os.path.join(folder, n) for n in sorted(names) if not n.startswith((".", "__")))
    return found


def load_data_files(files: list[str], root: str, args: DataArguments) -> DatasetDict:
    """Load parquet or arrow files; a file's split is the split name its path (relative to `root`) starts with."""
    extensions = {os.path.splitext(f)[1].lower() for f in files}
    if len(extensions) != 1 or next(iter(extensions)) not in DATA_FILE_BUILDERS:
        raise ValueError(
            f"--dataset_name {args.dataset_name!r}: expected only .parquet or only .arrow files, got {sorted(extensions)}"
        )
    builder = DATA_FILE_BUILDERS[extensions.pop()]
    split_names = (args.train_split_name, args.validation_split_name, args.test_split_name)
    split_of = {f: _split_of(os.path.relpath(f, root), split_names) for f in files}
    unnamed = [f for f, split in split_of.items() if split is None]
    if len(unnamed) == len(files):
        data_files = {args.train_split_name: files}
    elif unnamed:
        raise ValueError(
            f"{len(unnamed)} of {len(files)} data files are not named after a split {list(split_names)}, e.g. "
            f"{unnamed[0]!r}; name every file (or its folder) after its split, or none of them to use all as training"
        )
    else:
        data_files = {split: [f for f in files if split_of[f] == split] for split in dict.fromkeys(split_of.values())}
    if builder == "parquet":  # datasets cannot build an empty split: say so before it tries
        for split, split_files in data_files.items():
            if sum(_parquet_metadata(f).num_rows for f in split_files) == 0:
                raise ValueError(f"split {split!r} of {args.dataset_name!r} is empty (files: {split_files})")
    for split, split_files in data_files.items():
        logger.info(f"Reading {len(split_files)} {builder} files as split {split!r}: {split_files}")
    try:
        return datasets.load_dataset(builder, data_files=data_files, cache_dir=args.cache_dir)
    except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException) as error:
        for file in files:
            _check_data_file(file, builder)
        raise ValueError(
            f"could not read the {builder} files of {args.dataset_name!r} ({type(error).__name__}: {error}); "
            f"files: {data_files}"
        ) from error


def _parquet_metadata(file: str) -> pyarrow.parquet.FileMetaData:
    """The footer of a parquet file; `ValueError` naming the file when it is corrupt or truncated."""
    try:
        return pyarrow.parquet.read_metadata(file)
    except (pyarrow.ArrowException, OSError) as error:
        raise ValueError(
            f"{file}: not a readable parquet file, it is corrupt or truncated ({error}); replace it with a complete "
            "copy or remove it"
        ) from None


def _check_data_file(file: str, builder: str) -> None:
    """Read `file` in full; `ValueError` naming it when it is corrupt or truncated."""
    try:
        if builder == "parquet":
            pyarrow.parquet.read_table(file)
        else:
            with pyarrow.memory_map(file) as source:
                try:
                    pyarrow.ipc.open_stream(source).read_all()
                except pyarrow.ArrowInvalid:
                    pyarrow.ipc.open_file(source).read_all()
    except (pyarrow.ArrowException, OSError) as error:
        raise ValueError(
            f"{file}: not a readable {builder} file, it is corrupt or truncated ({error}); replace it with a "
            "complete copy or remove it"
        ) from None


def _split_of(relative_path: str, split_names: tuple[str, ...]) -> str | None:
    """The split whose name starts a component of `relative_path` (`train-00000-of-00001.parquet`, `test/x.arrow`)."""
    for part in relative_path.split(os.sep):
        for name in split_names:
            if re.match(rf"{re.escape(name)}([-_.]|$)", part):
                return name
    return None


def load_image_folder(path: str, args: DataArguments) -> DatasetDict:
    """Load an image folder: one subfolder per class, whatever the class names, labelled by the folder name.

    Only a folder whose every subfolder is named after a split (`train`, `validation`, `test`, per the split
    options) and holds class subfolders is read as split folders (`train/<class>/...`); otherwise every top-level
    subfolder is a class (CIFAR-100 has a class named `train`). Images directly in a class folder are read.
    A tree nested as `superclass/class/image` (optionally under split folders) is read by `load_hierarchy_tree`.
    """
    tree = load_hierarchy_tree(path, args)
    if tree is not None:
        return tree
    split_names = (args.train_split_name, args.validation_split_name, args.test_split_name)
    subfolders = _visible_subfolders(path)
    split_layout = bool(subfolders) and all(
        name in split_names and _visible_subfolders(os.path.join(path, name)) for name in subfolders
    )
    roots = {name: os.path.join(path, name) for name in subfolders} if split_layout else {args.train_split_name: path}
    data_files = {}
    for split, root in roots.items():
        class_names = _visible_subfolders(root)
        files = [
            file
            for name in class_names
            for file in _visible_files(os.path.join(root, name))
            if file.lower().endswith(IMAGE_EXTENSIONS)
        ]
        loose = [f for f in _visible_files(root) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if loose:
            logger.warning(f"Not reading {len(loose)} images of {root!r} that are in no class folder, e.g. {loose[0]}")
        if not files:
            raise ValueError(f"image folder {root!r} has no images in class subfolders (found {class_names})")
        logger.info(f"Reading {len(files)} images in {len(class_names)} class folders of {root!r} as split {split!r}")
        data_files[split] = files
    return datasets.load_dataset("imagefolder", data_files=data_files, drop_labels=False, cache_dir=args.cache_dir)


class CifarUnpickler(pickle.Unpickler):
    """Unpickler for the original CIFAR-100 python files that refuses every global but numpy array reconstruction.

    Those files only hold dicts of lists, bytes and numpy arrays; any other global (such as `os.system` in a
    crafted file) raises `pickle.UnpicklingError` before anything is called.
    """

    ALLOWED_GLOBALS = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed numpy global; refuse anything else."""
        if (module, name) not in self.ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load the global {module}.{name}: CIFAR-100 python files only need numpy arrays"
            )
        return self.ALLOWED_GLOBALS[(module, name)]


def read_cifar_pickle(path: str) -> dict[bytes, Any]:
    """Read one file of the original cifar-100-python folder (a dict with bytes keys) with `CifarUnpickler`."""
    with open(path, "rb") as file:
        try:
            content = CifarUnpickler(file, encoding="bytes").load()
        except pickle.UnpicklingError:
            raise
        except Exception as error:  # numpy refuses inconsistent arrays with ValueError, truncation gives EOFError
            raise ValueError(f"{path}: not a valid cifar-100-python file ({type(error).__name__}: {error})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a dict as in the cifar-100-python files, got {type(content).__name__}")
    return content


def _cifar_images(content: dict[bytes, Any], path: str) -> np.ndarray:
    """The `(N, 3072)` uint8 `b"data"` array of a cifar-100-python file, checked against the file's own size.

    A crafted pickle can rebuild an array whose shape promises far more data than the file holds (zero strides,
    zero-size items); such an array is refused before anything reads or converts it.
    """
    data = content.get(b"data")
    if not isinstance(data, np.ndarray):
        raise ValueError(f"{path}: b'data' must be a numpy array, got {type(data).__name__}")
    problems = []
    if data.dtype != np.uint8:
        problems.append(f"dtype {data.dtype} instead of uint8")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        problems.append(f"shape {data.shape} instead of (N, 3072)")
    if not data.flags.c_contiguous or 0 in data.strides:
        problems.append(f"strides {data.strides} of a non-contiguous array")
    if data.nbytes > os.path.getsize(path):
        problems.append(f"{data.nbytes} bytes of pixels in a file of {os.path.getsize(path)} bytes")
    if problems:
        raise ValueError(f"{path}: b'data' is not a CIFAR image array: {'; '.join(problems)}")
    return data


def _cifar_labels(content: dict[bytes, Any], key: bytes, rows: int, path: str) -> np.ndarray:
    """The list of integer labels `key` of a cifar-100-python file, one per image row."""
    values = content.get(key)
    if not isinstance(values, (list, np.ndarray)) or len(values) != rows:
        length = len(values) if isinstance(values, (list, np.ndarray)) else type(values).__name__
        raise ValueError(f"{path}: {key!r} must be a list of {rows} labels (one per image), got {length}")
    try:
        return np.asarray(values, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"{path}: {key!r} must hold integer labels ({error})") from None


def load_cifar_python(folder: str) -> DatasetDict:
    """Load the original `cifar-100-python` folder (`train`, `test`, `meta`) into the Hub's `uoft-cs/cifar100` schema.

    The class names of `meta` become `ClassLabel` names, so labels are later matched to the model's by name.
    """
    meta_path = os.path.join(folder, "meta")
    meta = read_cifar_pickle(meta_path)
    names = {}
    for key in (b"fine_label_names", b"coarse_label_names"):
        values = meta.get(key)
        if not isinstance(values, list) or not all(isinstance(name, bytes) for name in values):
            raise ValueError(f"{meta_path}: {key!r} must be a list of class names (bytes)")
        names[key] = [name.decode() for name in values]
    features = Features(
        {
            "img": ImageFeature(),
            "fine_label": ClassLabel(names=names[b"fine_label_names"]),
            "coarse_label": ClassLabel(names=names[b"coarse_label_names"]),
        }
    )
    splits = {}
    for split in ("train", "test"):
        path = os.path.join(folder, split)
        content = read_cifar_pickle(path)
        data = _cifar_images(content, path)
        fine, coarse = (_cifar_labels(content, key, len(data), path) for key in (b"fine_labels", b"coarse_labels"))
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3), stored channel-first
        columns = {
            "img": [{"bytes": _png_bytes(image), "path": None} for image in images],
            "fine_label": fine,
            "coarse_label": coarse,
        }
        splits[split] = Dataset.from_dict(columns, features=features)
    return DatasetDict(splits)


def _png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of one (H, W, 3) uint8 array."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Validation and standard columns
# ----------------------------------------------------------------------------------------------------------------


def prepare_datasets(
    args: DataArguments, config: HierarchicalEfficientNetV2Config, seed: int, raw: DatasetDict | None = None
) -> DatasetDict:
    """Load (unless `raw` is given: the output of `load_raw_datasets`), validate and standardise the source; carve
    a validation split if needed; apply `max_*_samples`. The data's hierarchy (`discover_hierarchy`) must fit
    `config`: every class of the data a class of the config, under the same superclass.

    Returns the available splits among "train", "validation" and "test", each with the columns `image` (`Image`),
    `labels` and `coarse_labels` (`ClassLabel`) and `index` (the row's position in its source split).
    """
    raw = load_raw_datasets(args) if raw is None else raw
    source_names = dict(train=args.train_split_name, validation=args.validation_split_name, test=args.test_split_name)
    if not any(name in raw for name in source_names.values()):
        raise ValueError(
            f"the dataset has the splits {list(raw)}, none named {list(source_names.values())}; "
            "pass --train_split_name / --validation_split_name / --test_split_name"
        )
    ignored = [name for name in raw if name not in source_names.values()]
    if ignored:
        logger.warning(f"Ignoring the splits {ignored} of {args.dataset_name!r}")
    root = source_folder(args)
    splits = {
        split: resolve_image_paths(standardise_split(raw[name], args, config, split_name=name), root, split_name=name)
        for split, name in source_names.items()
        if name in raw
    }
    hierarchy = discover_hierarchy(raw, args)  # rows checked above; now the superclasses of a hierarchy file too
    if hierarchy is not None and (problem := hierarchy.mismatch(config)):
        raise ValueError(f"the data {args.dataset_name!r} does not fit the model's classes: {problem}")
    if "validation" not in splits and "train" in splits and args.train_val_split > 0:
        splits["train"], splits["validation"] = split_train_validation(splits["train"], args.train_val_split, seed)
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_predict_samples}
    for split, limit in limits.items():
        if split in splits and limit is not None and limit < len(splits[split]):
            splits[split] = splits[split].select(range(limit))
    splits = check_duplicate_images(splits, drop=args.drop_duplicate_images)
    logger.info(f"Prepared splits: { {split: len(dataset) for split, dataset in splits.items()} }")
    return DatasetDict(splits)


def standardise_split(
    dataset: Dataset, args: DataArguments, config: HierarchicalEfficientNetV2Config, split_name: str
) -> Dataset:
    """Validate one source split and return it with the columns `image`, `labels`, `coarse_labels`, `index`."""
    if len(dataset) == 0:
        raise ValueError(f"split {split_name!r} of {args.dataset_name!r} is empty")
    from_image_folder = dataset.info.builder_name == "imagefolder"  # its columns are always "image" and "label"
    image_column = "image" if from_image_folder else args.image_column_name
    label_column = "label" if from_image_folder else args.label_column_name
    missing = [column for column in (image_column, label_column) if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"split {split_name!r} has no column {missing}; its columns are {dataset.column_names}. Name the image and "
            "fine-label columns with --image_column_name and --label_column_name "
            f"(now {args.image_column_name!r} and {args.label_column_name!r})"
        )
    labels = _column_to_numpy(dataset, label_column)
    label_feature = dataset.features[label_column]
    class_names = _class_names(label_feature)
    where = f"{label_column!r} of split {split_name!r}"
    if class_names is not None:
        check_label_range(labels, len(class_names), label_column, split_name)
    by_name = labels.dtype.kind in "OUS" or (args.hierarchy_file is not None and labels.dtype.kind in "iu")
    if class_names is not None or by_name:  # plain integers with a hierarchy file: named by their decimal strings
        try:
            labels = labels_from_names(labels, class_names, config, where)
        except ValueError as error:
            raise ValueError(
                f"{error}; give the superclasses in a column (--coarse_label_column_name, now "
                f"{args.coarse_label_column_name!r}) or a --hierarchy_file, or use superclass/class image folders"
            ) from None
    if labels.dtype.kind not in "iu":
        raise ValueError(f"column {label_column!r} of split {split_name!r} must hold integers, got {label_feature}")
    check_label_range(labels, config.num_labels, label_column, split_name)
    coarse_labels = config.fine_to_coarse_tensor().numpy()[labels]
    coarse_column = args.coarse_label_column_name
    if coarse_column in dataset.column_names and not from_image_folder and args.hierarchy_file is None:
        given = _column_to_numpy(dataset, coarse_column)
        coarse_names = _class_names(dataset.features[coarse_column])
        where = f"{coarse_column!r} of split {split_name!r}"
        if coarse_names is not None:
            check_label_range(given, len(coarse_names), coarse_column, split_name)
        numbered = all(name.lstrip("-").isdigit() for name in config.coarse_label_names)  # read from integer labels
        if coarse_names is not None or given.dtype.kind in "OUS" or numbered:
            given = ids_from_names(given, coarse_names, config.coarse_label_names, where)
        check_coarse_labels(given, labels, config, coarse_column, split_name)
    else:
        logger.info(f"Split {split_name!r} has no column {coarse_column!r}: superclasses follow config.fine_to_coarse")

    standard = dataset.select_columns([image_column])
    if image_column != "image":
        standard = standard.rename_column(image_column, "image")
    image_feature = standard.features["image"]
    if isinstance(image_feature, dict) and "bytes" in image_feature and set(image_feature) <= {"bytes", "path"}:
        standard = standard.cast_column("image", ImageFeature())  # a struct{bytes, path} written without metadata
    elif not isinstance(image_feature, ImageFeature):
        if not hasattr(image_feature, "dtype") or image_feature.dtype not in (
            "binary",
            "large_binary",
            "string",
            "large_string",
        ):
            raise ValueError(
                f"column {image_column!r} of split {split_name!r} must hold images, image bytes or image paths, "
                f"got {standard.features['image']}"
            )
        standard = standard.cast_column("image", ImageFeature())
    standard = standard.add_column("labels", labels.astype(np.int64))
    standard = standard.add_column("coarse_labels", coarse_labels.astype(np.int64))
    standard = standard.add_column("index", np.arange(len(standard), dtype=np.int64))
    standard = standard.cast_column("labels", ClassLabel(names=[config.id2label[i] for i in range(config.num_labels)]))
    return standard.cast_column("coarse_labels", ClassLabel(names=config.coarse_label_names))


def _column_to_numpy(dataset: Dataset, column: str) -> np.ndarray:
    """One column as a numpy array, read in one go from Arrow."""
    return dataset.select_columns([column]).with_format("numpy")[:][column]


def _class_names(feature: Any) -> list[str] | None:
    """The names of a `ClassLabel` feature; `None` for other features and for the placeholder names "0", "1", ..."""
    if not isinstance(feature, ClassLabel):
        return None
    if feature.names == [str(i) for i in range(feature.num_classes)]:  # ClassLabel(num_classes=n) carries no names
        return None
    return list(feature.names)


def labels_from_names(
    values: np.ndarray, class_names: list[str] | None, config: HierarchicalEfficientNetV2Config, where: str
) -> np.ndarray:
    """Map class names (or ClassLabel ids with their `class_names`) onto the ids of `config.label2id`."""
    return ids_from_names(values, class_names, [config.id2label[i] for i in range(config.num_labels)], where)


def ids_from_names(
    values: np.ndarray, class_names: list[str] | None, target_names: list[str], where: str
) -> np.ndarray:
    """Map names (or ids into `class_names`) onto positions in `target_names`; `ValueError` naming unknown names.

    Names listed in `LABEL_NAME_ALIASES` (known misspellings in published metadata) are read as their correction
    when `target_names` has the correction and not the misspelling.
    """
    names = (np.asarray(class_names, dtype=object)[values] if class_names is not None else values).astype(str)
    unique_names, inverse = np.unique(names, return_inverse=True)
    target_ids = {name: i for i, name in enumerate(target_names)}
    for alias, name in LABEL_NAME_ALIASES.items():
        if alias in unique_names and alias not in target_ids and name in target_ids:
            logger.info(f"Reading the class name {alias!r} in {where} as {name!r}")
            target_ids[alias] = target_ids[name]
    unknown = [str(name) for name in unique_names if name not in target_ids]
    if unknown:
        raise ValueError(
            f"{len(unknown)} class names in {where} are not among the config's {len(target_names)} labels: "
            f"{unknown[:20]}{' ...' if len(unknown) > 20 else ''}"
        )
    return np.array([target_ids[name] for name in unique_names], dtype=np.int64)[inverse]


def check_label_range(labels: np.ndarray, num_labels: int, column: str, split_name: str) -> None:
    """Raise `ValueError` (count and first example row) when labels fall outside `[0, num_labels)`."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_labels))
    if bad.size:
        raise ValueError(
            f"{bad.size} of {labels.size} rows of split {split_name!r} have a {column!r} outside [0, {num_labels}); "
            f"first: row {bad[0]} has {column}={labels[bad[0]]}"
        )


def check_coarse_labels(
    coarse_labels: np.ndarray,
    labels: np.ndarray,
    config: HierarchicalEfficientNetV2Config,
    column: str,
    split_name: str,
) -> None:
    """Raise `ValueError` (count and first example row) when coarse labels disagree with `config.fine_to_coarse`."""
    expected = config.fine_to_coarse_tensor().numpy()[labels]
    bad = np.flatnonzero(coarse_labels != expected)
    if bad.size:
        row = bad[0]
        raise ValueError(
            f"{bad.size} of {labels.size} rows of split {split_name!r} have a {column!r} that disagrees with "
            f"config.fine_to_coarse; first: row {row} has fine label {labels[row]} ({config.id2label[labels[row]]}) "
            f"and {column}={coarse_labels[row]}, but that class belongs to superclass {expected[row]} "
            f"({config.coarse_label_names[expected[row]]})"
        )


def source_folder(args: DataArguments) -> str | None:
    """The local folder that a dataset's relative image paths are resolved against; `None` for a Hub dataset."""
    if args.dataset_name == "imagefolder":
        return None if args.data_dir is None else os.path.abspath(os.path.expanduser(args.data_dir))
    path = os.path.expanduser(args.dataset_name)
    if any(char in path for char in "*?["):
        matches = [os.path.dirname(os.path.abspath(p)) for p in glob.glob(path, recursive=True)]
        return os.path.commonpath(matches) if matches else None
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    return os.path.abspath(path) if os.path.isdir(path) else None


def _image_structs(dataset: Dataset) -> pyarrow.StructArray:
    """The `image` column (struct of `bytes` and `path`) as one Arrow array, read without decoding."""
    column = dataset.select_columns(["image"]).with_format("arrow")[:]["image"]
    return column.combine_chunks() if isinstance(column, pyarrow.ChunkedArray) else column


def resolve_image_paths(dataset: Dataset, root: str | None, split_name: str) -> Dataset:
    """Check the rows whose image is given by a `path` (no bytes) and make relative paths absolute.

    Each path must name a regular file; relative paths are resolved against `root`, the dataset's own folder.
    `ValueError` naming the row otherwise (a FIFO, a folder, a device, a missing file, a relative path without a
    local folder).
    """
    structs = _image_structs(dataset)
    without_bytes = pyarrow.compute.is_null(pyarrow.compute.struct_field(structs, "bytes")).to_numpy(
        zero_copy_only=False
    )
    rows = np.flatnonzero(without_bytes)
    if rows.size == 0:
        return dataset
    paths = pyarrow.compute.struct_field(structs, "path").take(pyarrow.array(rows)).to_pylist()
    resolved = {}
    for row, path in zip(rows.tolist(), paths, strict=True):
        if path is None:
            raise ValueError(f"row index={row} of split {split_name!r} has neither image bytes nor an image path")
        if not os.path.isabs(path):
            if root is None:
                raise ValueError(
                    f"row index={row} of split {split_name!r} gives its image as the relative path {path!r}, and "
                    "the dataset has no local folder to resolve it against"
                )
            resolved[row] = path = os.path.join(root, path)
        check_regular_file(path, f"row index={row} of split {split_name!r}")
    if not resolved:
        return dataset

    def absolute(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        return {
            "image": [
                {"bytes": value["bytes"], "path": resolved.get(index, value["path"])}
                for value, index in zip(batch["image"], indices, strict=True)
            ]
        }

    logger.info(f"Resolved {len(resolved)} relative image paths of split {split_name!r} against {root!r}")
    dataset = dataset.cast_column("image", ImageFeature(decode=False))
    dataset = dataset.map(absolute, batched=True, with_indices=True, desc=f"Resolving image paths of {split_name}")
    return dataset.cast_column("image", ImageFeature())


def check_regular_file(path: str, where: str) -> None:
    """`ValueError` naming `where` unless `path` is a regular file (a FIFO would block, a device never ends)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise ValueError(f"the image of {where} is the path {path!r}, which cannot be read: {error}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"the image of {where} is the path {path!r}, which is not a regular file")


def image_digests(dataset: Dataset) -> list[bytes]:
    """A 128-bit BLAKE2b digest of every row's encoded image (its bytes, or the file its path names), undecoded."""
    structs = _image_structs(dataset)
    contents = pyarrow.compute.struct_field(structs, "bytes").to_pylist()
    paths = pyarrow.compute.struct_field(structs, "path").to_pylist()
    digests = []
    for row, content in enumerate(contents):
        if content is None:  # a path, checked again right before it is opened
            check_regular_file(paths[row], f"row {row} of the split being hashed")
            with open(paths[row], "rb") as file:
                content = file.read()
        digests.append(hashlib.blake2b(content, digest_size=16).digest())
    return digests


def check_duplicate_images(splits: dict[str, Dataset], drop: bool = False) -> dict[str, Dataset]:
    """Refuse evaluation images that are exact copies (same encoded bytes) of training images, or drop them.

    Compares the "validation" and "test" splits with "train"; with `drop`, the copies are removed from the
    evaluation splits and counted in the log. Rows are named by their `index` in the source split.
    """
    evaluation = [split for split in ("validation", "test") if split in splits]
    if "train" not in splits or not evaluation:
        return splits
    start = time.perf_counter()
    train_rows = {}
    for row, digest in enumerate(image_digests(splits["train"])):
        train_rows.setdefault(digest, row)
    copies = {}
    for split in evaluation:
        digests = image_digests(splits[split])
        copies[split] = [(row, train_rows[d]) for row, d in enumerate(digests) if d in train_rows]
    hashed = sum(len(splits[split]) for split in ("train", *evaluation))
    logger.info(f"Duplicate-image check: {hashed} images hashed in {time.perf_counter() - start:.2f} s")
    found = {split: pairs for split, pairs in copies.items() if pairs}
    if not found:
        return splits
    counts = ", ".join(f"{len(pairs)} of {len(splits[split])} {split} images" for split, pairs in found.items())
    if not drop:
        split, pairs = next(iter(found.items()))
        row, train_row = pairs[0]
        eval_index = splits[split].select_columns(["index"])[row]["index"]
        train_index = splits["train"].select_columns(["index"])[train_row]["index"]
        raise ValueError(
            f"{counts} are exact copies (same encoded bytes) of training images, which would leak training data "
            f"into evaluation; e.g. {split} row index={eval_index} equals train row index={train_index}. Remove them "
            "from the data, or pass --drop_duplicate_images true to drop them from the evaluation splits"
        )
    splits = dict(splits)
    for split, pairs in found.items():
        duplicated = {row for row, _ in pairs}
        splits[split] = splits[split].select([row for row in range(len(splits[split])) if row not in duplicated])
    logger.warning(f"Dropped {counts} that are exact copies of training images (--drop_duplicate_images)")
    return splits


def split_train_validation(train: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Carve `fraction` of `train` out as validation with `seed`, stratified by `labels` where possible."""
    try:
        parts = train.train_test_split(test_size=fraction, seed=seed, stratify_by_column="labels")
    except ValueError as error:  # a class with too few rows, or fewer validation rows than classes
        logger.warning(f"Cannot stratify the validation split by class ({error}); splitting at random")
        parts = train.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


# ----------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------


def derive_seed(*values: int) -> int:
    """A 63-bit seed from a few integers (a splitmix64 chain): the same in every process, run and platform."""
    mask = (1 << 64) - 1
    state = 0
    for value in values:
        state = ((state ^ (int(value) & mask)) + 0x9E3779B97F4A7C15) & mask
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & mask
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & mask
        state ^= state >> 31
    return state >> 1


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert a PIL image of any mode (L, P, RGBA, I;16, F, ...) to 8-bit RGB; see `to_eight_bit` for deep pixels."""
    if image.mode == "RGB":
        return image
    image = to_eight_bit(image)
    if image.mode == "P":
        image = image.convert("RGBA")  # palettes may carry transparency
    return image.convert("RGB")


def to_eight_bit(image: PIL.Image.Image, where: str = "the image") -> PIL.Image.Image:
    """Grey images deeper than 8 bits -> 8-bit "L", scaled by the range their mode stands for; others unchanged.

    "I;16*" (16-bit): divided by 257. "I" (32-bit integers): read as 8-bit when every value is within [0, 255], as
    16-bit (divided by 257) within [0, 65535], refused beyond. "F" (32-bit float): [0, 1] is scaled by 255, [0, 255]
    kept; negative, larger or non-finite values are refused. `ValueError` names `where`.
    """
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    array = np.asarray(image, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: {image.mode} pixels include NaN or infinity")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        array = array / 257.0
    elif image.mode == "F":
        if low < 0 or high > 255:
            raise ValueError(
                f"{where}: 32-bit float pixels in [{low:g}, {high:g}], neither in [0, 1] nor in [0, 255]; "
                "convert the image to 8 bits"
            )
        if high <= 1.0:
            array = array * 255.0
    else:
        if low < 0 or high > 65535:
            raise ValueError(
                f"{where}: 32-bit integer pixels in [{low:g}, {high:g}], beyond the 16-bit range [0, 65535]; "
                "convert the image to 8 or 16 bits"
            )
        if high > 255:
            array = array / 257.0  # 16-bit data
    return PIL.Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))


class RandomCropWithPadding(torch.nn.Module):
    """CIFAR-style random crop of a PIL image: zero-pad every side, then crop back to the original size.

    The padding is `padding_fraction` of the shorter side (4 px at 32 px with the default 0.125), so a larger source
    image is shifted by the same share of its size. Same distribution as `v2.RandomCrop(size, padding)`, cheaper.
    """

    def __init__(self, padding_fraction: float = 4 / 32):
        super().__init__()
        self.padding_fraction = padding_fraction

    def forward(self, image: PIL.Image.Image) -> PIL.Image.Image:
        pad = max(1, round(min(image.size) * self.padding_fraction))
        dx, dy = torch.randint(-pad, pad + 1, (2,)).tolist()
        if dx == 0 and dy == 0:
            return image
        shifted = PIL.Image.new(image.mode, image.size)  # black, as zero padding
        shifted.paste(image, (-dx, -dy))
        return shifted


def uniform_draws(seeds: list[int], count: int) -> torch.Tensor:
    """`(len(seeds), count)` float64 uniforms in [0, 1), a pure function of each seed (a splitmix64 counter)."""
    state = np.asarray(seeds, dtype=np.uint64)[:, None] + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(
        0x9E3779B97F4A7C15
    )
    state = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    state ^= state >> np.uint64(31)
    return torch.from_numpy((state >> np.uint64(11)).astype(np.float64) / 2.0**53)


NO_BOX = (0, 0, 0, 0)  # an empty (top, left, bottom, right) rectangle


class TrainAugment:
    """A training augmentation split in two: `sample` runs in the DataLoader workers at the source resolution and
    draws every random parameter; `DevicePreprocessor` applies the rest to whole batches on the training device.

    Args:
        config (`HierarchicalEfficientNetV2Config`):
            Model image size and normalisation.
        args (`DataArguments`):
            The augmentation options.

    `sample(images, seeds)` returns 8-bit `(3, H, W)` tensors at the source size and a dict of per-image parameter
    tensors (see `DevicePreprocessor`); image i draws only from `seeds[i]`, so its augmentation does not depend on
    the batch it is in. Calling the object on one PIL image runs both parts, with a seed drawn from the global torch
    RNG like a torchvision transform, and returns a normalised `(3, S, S)` float tensor.
    """

    def __init__(self, config: HierarchicalEfficientNetV2Config, args: DataArguments):
        self.image_size = config.image_size
        self.random_erasing = v2.RandomErasing(p=args.random_erasing, value=0) if args.random_erasing > 0 else None
        self.preprocessor = DevicePreprocessor(config)

    def sample(self, images: list[PIL.Image.Image], seeds: list[int]) -> tuple[list[torch.Tensor], dict]:
        """8-bit tensors at the source size and the per-image parameters of the device-side steps."""
        raise NotImplementedError

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        """Augment one PIL image (any mode) into a normalised `(3, S, S)` float tensor."""
        images, parameters = self.sample([image], [int(torch.randint(2**62, ()))])
        return self.preprocessor({"pixel_values": images[0][None], "augmentation": parameters})["pixel_values"][0]

    def _erase_box(self) -> tuple[int, int, int, int]:
        """The rectangle `v2.RandomErasing` would erase at the model size, drawn from the current torch RNG."""
        if self.random_erasing is None or torch.rand(1) >= self.random_erasing.p:  # as its forward draws
            return NO_BOX
        shape_only = torch.zeros(1, 1, 1).expand(3, self.image_size, self.image_size)  # only its size is read
        params = self.random_erasing.make_params([shape_only])
        if params["v"] is None:  # no rectangle fitted in ten tries: nothing is erased
            return NO_BOX
        return params["i"], params["j"], params["i"] + params["h"], params["j"] + params["w"]


class PolicyAugment(TrainAugment):
    """Crop, flip and a torchvision policy ('trivialaugment', 'randaugment', 'autoaugment') on 8-bit PIL images at
    their source resolution, where they are cheapest, then random erasing on the device.

    Each image runs under the torch CPU RNG seeded with its seed (inside `torch.random.fork_rng`); the erased
    rectangle is drawn right after the policy from the same stream, as when `v2.RandomErasing` ended the transform.
    """

    POLICIES = {
        "trivialaugment": v2.TrivialAugmentWide,
        "randaugment": v2.RandAugment,
        "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
    }

    def __init__(self, config: HierarchicalEfficientNetV2Config, args: DataArguments):
        super().__init__(config, args)
        steps: list[Callable] = [to_rgb]
        if args.random_crop:
            steps.append(RandomCropWithPadding())
        if args.horizontal_flip:
            steps.append(v2.RandomHorizontalFlip())
        steps += [self.POLICIES[args.augmentation](), v2.PILToTensor()]
        self.transform = v2.Compose(steps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform}, random_erasing={self.random_erasing})"

    def sample(self, images: list[PIL.Image.Image], seeds: list[int]) -> tuple[list[torch.Tensor], dict]:
        outputs, boxes = [], []
        with torch.random.fork_rng(devices=[]):
            for image, seed in zip(images, seeds, strict=True):
                torch.default_generator.manual_seed(seed)
                outputs.append(self.transform(image))
                boxes.append(self._erase_box())
        parameters = {"erase_box": torch.tensor(boxes, dtype=torch.long)} if self.random_erasing is not None else {}
        return outputs, parameters


class BatchedAugment(TrainAugment):
    """The 'original' (or 'none') training augmentation, drawn per image and applied to whole batches.

    Per image: CIFAR-style random crop with zero padding, horizontal flip and rotation (bilinear, black fill), done
    together by one `grid_sample` at the source resolution; then brightness, contrast and saturation jitter in a
    random order (`v2.ColorJitter`'s factors and blends); then the resize to the model size, normalisation and
    random erasing. The workers only decode the image and draw these parameters from the image's seed; every step
    runs on the batch in `DevicePreprocessor`.

    Args:
        config (`HierarchicalEfficientNetV2Config`):
            Model image size and normalisation.
        args (`DataArguments`):
            `random_crop`, `horizontal_flip`, `rotation_degrees` and `color_jitter` (used with the 'original'
            policy only) and `random_erasing`.
    """

    def __init__(self, config: HierarchicalEfficientNetV2Config, args: DataArguments):
        super().__init__(config, args)
        original = args.augmentation == "original"
        self.random_crop = args.random_crop
        self.horizontal_flip = args.horizontal_flip
        self.rotation_degrees = args.rotation_degrees if original else 0.0
        self.color_jitter = args.color_jitter if original else 0.0

    def __repr__(self) -> str:
        options = ("random_crop", "horizontal_flip", "rotation_degrees", "color_jitter", "image_size")
        return f"{type(self).__name__}({', '.join(f'{name}={getattr(self, name)}' for name in options)})"

    def sample(self, images: list[PIL.Image.Image], seeds: list[int]) -> tuple[list[torch.Tensor], dict]:
        tensors = [v2.functional.pil_to_tensor(to_rgb(image)) for image in images]
        return tensors, self.parameters([tuple(tensor.shape[-2:]) for tensor in tensors], seeds)

    def batch(self, images: list[torch.Tensor], seeds: list[int]) -> list[torch.Tensor]:
        """Augment 8-bit `(3, H, W)` RGB tensors completely, image i with `seeds[i]`; sizes may differ."""
        parameters = self.parameters([tuple(image.shape[-2:]) for image in images], seeds)
        return list(self.preprocessor({"pixel_values": list(images), "augmentation": parameters})["pixel_values"])

    def parameters(self, sizes: list[tuple[int, int]], seeds: list[int]) -> dict[str, torch.Tensor]:
        """The per-image parameters of images of `sizes` (height, width), image i drawn from `seeds[i]`."""
        draws = uniform_draws(seeds, 8)
        parameters = {}
        if self.random_crop or self.horizontal_flip or self.rotation_degrees > 0:
            parameters["affine"] = self._affine(sizes, draws)
        if self.color_jitter > 0:
            low = max(0.0, 1.0 - self.color_jitter)
            parameters["jitter_factors"] = (low + draws[:, 4:7] * (1.0 + self.color_jitter - low)).float()
            parameters["jitter_order"] = JITTER_ORDERS[(draws[:, 7] * len(JITTER_ORDERS)).long()]
        if self.random_erasing is not None:
            with torch.random.fork_rng(devices=[]):
                boxes = []
                for seed in seeds:
                    torch.default_generator.manual_seed(derive_seed(seed, 1))
                    boxes.append(self._erase_box())
            parameters["erase_box"] = torch.tensor(boxes, dtype=torch.long)
        return parameters

    def _affine(self, sizes: list[tuple[int, int]], draws: torch.Tensor) -> torch.Tensor:
        """`(n, 2, 3)` `affine_grid` matrices that shift (crop with padding), flip and rotate each image."""
        n = len(sizes)
        height = torch.tensor([size[0] for size in sizes], dtype=torch.float64)
        width = torch.tensor([size[1] for size in sizes], dtype=torch.float64)
        shift = torch.zeros(n, 2, dtype=torch.float64)  # pixels, (x, y)
        if self.random_crop:
            pad = torch.tensor([max(1, round(min(size) * 4 / 32)) for size in sizes], dtype=torch.float64)[:, None]
            shift = torch.floor(draws[:, 0:2] * (2 * pad + 1)) - pad
        flip = torch.ones(n, dtype=torch.float64)
        if self.horizontal_flip:
            flip = torch.where(draws[:, 2] < 0.5, -1.0, 1.0)
        angle = torch.deg2rad((2 * draws[:, 3] - 1) * self.rotation_degrees)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # Output point p (normalised coordinates) samples the source at S^-1 F R S p + 2 shift / size, where S scales
        # normalised coordinates to pixels, R rotates and F flips: crop, then flip, then rotate, as applied in turn.
        theta = torch.empty(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 1] = flip * cos, -flip * sin * height / width
        theta[:, 1, 0], theta[:, 1, 1] = sin * width / height, cos
        theta[:, 0, 2], theta[:, 1, 2] = 2 * shift[:, 0] / width, 2 * shift[:, 1] / height
        return theta.float()


class ToNormalizedFloat(torch.nn.Module):
    """uint8 (3, H, W) tensor -> float32 `(x / 255 - mean) / std`: `v2.ToDtype(scale=True)` + `v2.Normalize`, fused.

    One multiply-add instead of four passes with their per-call dispatch, which dominate at 32 px.
    """

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        std_tensor = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale = 1.0 / (255.0 * std_tensor)
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_tensor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, image, self.scale)  # float32 by type promotion


def _model_input_steps(config: HierarchicalEfficientNetV2Config) -> list[Callable]:
    """8-bit RGB PIL image -> normalised (3, S, S) float tensor: the tail of both transforms."""
    return [
        v2.PILToTensor(),
        v2.Resize((config.image_size, config.image_size), antialias=True),  # bilinear; no-op at the model size
        ToNormalizedFloat(config.image_mean, config.image_std),
    ]


def build_eval_transform(config: HierarchicalEfficientNetV2Config) -> v2.Compose:
    """PIL image of any mode -> normalised (3, S, S) float tensor, as `ViTImageProcessor` with size S does."""
    return v2.Compose([to_rgb, *_model_input_steps(config)])


def build_train_transform(config: HierarchicalEfficientNetV2Config, args: DataArguments) -> TrainAugment:
    """The training augmentation of `args.augmentation`, split between the DataLoader workers and the device.

    'original' and 'none' give a `BatchedAugment`: the workers only decode and draw parameters, every step runs on
    the batch on the device. The torchvision policies give a `PolicyAugment`: crop, flip and the policy run image by
    image on the 8-bit PIL image at its source resolution, where they are cheapest (at 32 px, PIL beats tensor
    kernels). In both cases the resize to the model size, the normalisation (as in `build_eval_transform`) and random
    erasing on the normalised image run on the device (`DevicePreprocessor`). Called on one PIL image, the result
    runs everything and returns a normalised `(3, S, S)` float tensor.
    """
    if args.augmentation in ("original", "none"):
        return BatchedAugment(config, args)
    return PolicyAugment(config, args)


def decode_image(
    value: Any, index: int, split: str = "train", max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> PIL.Image.Image:
    """Decode one value of an `Image(decode=False)` column (a PIL image passes through); `ValueError` names the row.

    An image larger than `max_pixels` (width x height) is refused from its header, before it is decoded; a `path`
    must name a regular file; grey images deeper than 8 bits are converted by `to_eight_bit`.
    """
    if isinstance(value, PIL.Image.Image):
        return value
    where = f"row index={index} of split {split!r}"
    if value.get("bytes") is None and value.get("path") is not None:
        check_regular_file(value["path"], where)  # before opening: a FIFO would block
    try:
        if value.get("bytes") is not None:
            image = PIL.Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path") is not None:
            image = PIL.Image.open(value["path"])
        else:
            raise ValueError("the row has neither image bytes nor an image path")
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise _ImageTooLarge(
                f"the image of {where} is {image.width}x{image.height} = {image.width * image.height:,} pixels, "
                f"above the limit of {max_pixels:,} (--max_image_pixels)"
            )
        image.load()
    except _ImageTooLarge as error:
        raise ValueError(str(error)) from None
    except Exception as error:  # PIL raises OSError, SyntaxError, struct.error, ... for broken files
        raise ValueError(
            f"could not decode the image of row index={index} of split {split!r}: {type(error).__name__}: {error}"
        ) from error
    if image.getexif().get(PIL.Image.ExifTags.Base.Orientation) is not None:  # as datasets' Image feature does
        image = PIL.ImageOps.exif_transpose(image)
    return to_eight_bit(image, where)


class _ImageTooLarge(Exception):
    """An image above the pixel limit, raised inside `decode_image`'s guarded block."""


def decode_to_tensor(
    value: Any, index: int, split: str = "train", max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """`decode_image`, then convert to an 8-bit RGB `(3, H, W)` tensor."""
    return v2.functional.pil_to_tensor(to_rgb(decode_image(value, index, split, max_pixels)))


class ImageTransform:
    """Batch transform for `Dataset.with_transform`: decode every image, transform it, keep the labels.

    Args:
        transform (`Callable`, *optional*):
            `None` (evaluation): every image becomes an 8-bit RGB `(3, H, W)` tensor at its source size, for
            `DevicePreprocessor` to resize and normalise on the device. A `TrainAugment` from
            `build_train_transform` (training) gives 8-bit tensors at the source size too, after its per-image
            policy, plus the per-image parameters of the device-side steps under `augmentation`. Any other
            callable (such as `build_eval_transform`) maps one PIL image to the model's input.
        seed (`int`, *optional*):
            For random (training) transforms: image `index` of epoch `e` is augmented from the seed
            `derive_seed(seed, e, index)` (per-image transforms run under the torch CPU RNG seeded with it inside
            `torch.random.fork_rng`), so the draw depends on nothing else (global RNG, batch, dataloader workers,
            resuming). Such outputs also carry `epoch`, which marks them as
            training examples for `HierarchicalCollator`. `None` for deterministic (evaluation) transforms.
        split (`str`, *optional*, defaults to `"train"`):
            Split name used in error messages.
        max_image_pixels (`int`, *optional*, defaults to 50,000,000):
            Images larger than this (width x height) are refused from their header, before decoding.

    Example:

    ```python
    >>> transform = ImageTransform(build_train_transform(config, data_args), seed=42)
    >>> train = prepared["train"].cast_column("image", Image(decode=False)).with_transform(transform)
    >>> transform.set_epoch(1)
    >>> train[0]["pixel_values"].shape, train[0]["pixel_values"].dtype
    (torch.Size([3, 32, 32]), torch.uint8)
    ```
    """

    def __init__(
        self,
        transform: Callable | None = None,
        seed: int | None = None,
        split: str = "train",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.transform = transform
        self.seed = seed
        self.split = split
        self.max_image_pixels = max_image_pixels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the next draws."""
        self.epoch = int(epoch)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        indices = batch["index"]
        values = zip(batch["image"], indices, strict=True)
        output = {}
        if self.transform is None:
            pixel_values = [
                decode_to_tensor(value, index, self.split, self.max_image_pixels) for value, index in values
            ]
        elif self.seed is None:
            pixel_values = [
                self.transform(decode_image(value, index, self.split, self.max_image_pixels)) for value, index in values
            ]
        elif isinstance(self.transform, TrainAugment):
            images = [decode_image(value, index, self.split, self.max_image_pixels) for value, index in values]
            seeds = [derive_seed(self.seed, self.epoch, index) for index in indices]
            pixel_values, parameters = self.transform.sample(images, seeds)
            if parameters:
                output["augmentation"] = [{k: v[i] for k, v in parameters.items()} for i in range(len(indices))]
        else:
            with torch.random.fork_rng(devices=[]):
                pixel_values = []
                for value, index in values:
                    image = decode_image(value, index, self.split, self.max_image_pixels)
                    torch.default_generator.manual_seed(derive_seed(self.seed, self.epoch, index))
                    pixel_values.append(self.transform(image))
        output.update(pixel_values=pixel_values, index=indices)
        for key in ("labels", "coarse_labels"):
            if key in batch:
                output[key] = batch[key]
        if self.seed is not None:
            output["epoch"] = [self.epoch] * len(indices)
        return output


def apply_transforms(
    datasets: DatasetDict, config: HierarchicalEfficientNetV2Config, args: DataArguments, seed: int
) -> DatasetDict:
    """Attach the seeded training transform to "train"; the other splits decode to 8-bit tensors at the source
    size. `DevicePreprocessor` (which `HierarchicalTrainer` runs on the device) turns both into model inputs."""
    transformed = {}
    for split, dataset in datasets.items():
        if split == "train":
            transform = ImageTransform(
                build_train_transform(config, args), seed=seed, split=split, max_image_pixels=args.max_image_pixels
            )
        else:
            transform = ImageTransform(split=split, max_image_pixels=args.max_image_pixels)
        transformed[split] = dataset.cast_column("image", ImageFeature(decode=False)).with_transform(transform)
    return DatasetDict(transformed)


class EpochCallback(TrainerCallback):
    """Tell the training transform which epoch the Trainer is starting, so augmentations follow (seed, epoch, index).

    Args:
        targets (`Any` or `list`):
            Objects with `set_epoch(epoch)` (an `ImageTransform`), or datasets whose `with_transform` transform has
            one (the "train" split returned by `apply_transforms`).

    With `dataloader_num_workers > 0`, workers receive a copy of the transform each epoch; persistent workers keep
    the copy of the first epoch, so the callback warns about `dataloader_persistent_workers`.
    """

    def __init__(self, targets: Any):
        targets = targets if isinstance(targets, (list, tuple)) else [targets]
        self.targets = [_epoch_target(target) for target in targets]

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.dataloader_num_workers > 0 and args.dataloader_persistent_workers:
            logger.warning(
                "dataloader_persistent_workers keeps each worker's copy of the training transform, which never "
                "learns the epoch: every epoch would repeat the augmentations of the first"
            )

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        epoch = math.floor(state.epoch + 1e-6)  # a resumed run starts inside the checkpoint's epoch
        for target in self.targets:
            target.set_epoch(epoch)


def _epoch_target(target: Any) -> Any:
    """`target` itself if it has `set_epoch`, else the transform of a dataset that has one."""
    if hasattr(target, "set_epoch"):
        return target
    transform = getattr(target, "format", {}).get("format_kwargs", {}).get("transform")
    if hasattr(transform, "set_epoch"):
        return transform
    raise TypeError(f"EpochCallback needs objects with set_epoch or datasets with such a transform, got {target!r}")


# ----------------------------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class HierarchicalCollator:
    """Stack examples into a batch and draw the MixUp/CutMix parameters of training batches.

    Args:
        config (`HierarchicalEfficientNetV2Config`, *optional*):
            The number of classes (labels are checked against it) and the model image size (the CutMix rectangle);
            needed when mixing.
        mixup_alpha (`float`, *optional*, defaults to 0.0):
            MixUp Beta(alpha, alpha) parameter; 0 disables MixUp.
        cutmix_alpha (`float`, *optional*, defaults to 0.0):
            CutMix Beta(alpha, alpha) parameter; 0 disables CutMix.
        mix_prob (`float`, *optional*, defaults to 1.0):
            Probability that a batch is mixed.
        cutmix_switch_prob (`float`, *optional*, defaults to 0.5):
            Probability of CutMix rather than MixUp when both alphas are above 0.
        seed (`int`, *optional*, defaults to 0):
            Seed of the mixing draws, together with the batch's epoch and row indices.

    The batch holds `labels` and `coarse_labels` as `(batch,)` int64 (checked against `config` here, on the CPU,
    so the training step never reads them back from the device), `pixel_values` stacked as the examples give them
    (8-bit images at the source size from `ImageTransform`; a list when their sizes differ) and, for training
    examples, `augmentation`: their per-image parameters stacked, plus the mixing parameters when mixing is on.
    Training examples are those that carry `epoch` (set by the seeded `ImageTransform`); evaluation batches are
    never mixed, so one collator serves the Trainer's training and evaluation. `DevicePreprocessor` applies the
    parameters on the device; mixed batches then get soft `(batch, num_labels)` and `(batch, num_coarse_labels)`
    targets, with `coarse_labels == labels @ config.hierarchy_matrix()`.

    Example:

    ```python
    >>> collator = HierarchicalCollator(config, mixup_alpha=0.2, cutmix_alpha=1.0, seed=42)
    >>> batch = DevicePreprocessor(config)(collator([train[i] for i in range(8)]))
    >>> batch["labels"].shape, batch["coarse_labels"].shape
    (torch.Size([8, 100]), torch.Size([8, 20]))
    ```
    """

    config: HierarchicalEfficientNetV2Config | None = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    cutmix_switch_prob: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {self.mixup_alpha}, {self.cutmix_alpha}")
        if self.mixes and self.config is None:
            raise ValueError("HierarchicalCollator needs the config (class hierarchy) when mixup or cutmix is enabled")

    @property
    def mixes(self) -> bool:
        """Whether training batches are mixed at all."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = {  # labels first: the Trainer reads the batch size from the first tensor it finds
            "labels": torch.tensor([example["labels"] for example in examples], dtype=torch.long),
            "coarse_labels": torch.tensor([example["coarse_labels"] for example in examples], dtype=torch.long),
        }
        if self.config is not None:
            self.check_labels(batch, examples)
        images = [example["pixel_values"] for example in examples]
        same_size = all(image.shape == images[0].shape for image in images)
        batch["pixel_values"] = torch.stack(images) if same_size else images  # (batch, 3, H, W)
        augmentation = {}
        if "augmentation" in examples[0]:
            keys = examples[0]["augmentation"]
            augmentation = {key: torch.stack([example["augmentation"][key] for example in examples]) for key in keys}
        if self.mixes and all("epoch" in example for example in examples):
            seed = derive_seed(self.seed, examples[0]["epoch"], *(example["index"] for example in examples))
            augmentation.update(self.mix_parameters(len(examples), np.random.default_rng(seed)))
        if augmentation:
            batch["augmentation"] = augmentation
        return batch

    def check_labels(self, batch: dict[str, torch.Tensor], examples: list[dict[str, Any]]) -> None:
        """Raise `ValueError` naming the example when a label is outside the config's classes."""
        for name, classes in (("labels", self.config.num_labels), ("coarse_labels", self.config.num_coarse_labels)):
            bad = ((batch[name] < 0) | (batch[name] >= classes)).nonzero()
            if len(bad):
                row = int(bad[0, 0])
                raise ValueError(
                    f"{name} must be in [0, {classes}), got {int(batch[name][row])} for the example with "
                    f"index={examples[row].get('index', row)} ({len(bad)} of {len(examples)} in this batch)"
                )

    def mix_parameters(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """MixUp or CutMix parameters for one batch (mixed with probability `mix_prob`), per image: the partner
        (`mix_index`), the rectangle taken from it at the model size (`mix_box`) and the weights (`mix_weights`)."""
        index = torch.arange(batch_size)
        box = NO_BOX
        pixel_lam = target_lam = 1.0
        if rng.random() < self.mix_prob:
            index = torch.from_numpy(rng.permutation(batch_size))
            use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.cutmix_switch_prob)
            if use_cutmix:
                lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
                height = width = self.config.image_size
                cut_height, cut_width = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
                center_y, center_x = rng.integers(height), rng.integers(width)
                top, bottom = max(center_y - cut_height // 2, 0), min(center_y + cut_height // 2, height)
                left, right = max(center_x - cut_width // 2, 0), min(center_x + cut_width // 2, width)
                box = (top, left, bottom, right)
                target_lam = 1.0 - (bottom - top) * (right - left) / (height * width)  # the share actually kept
            else:
                pixel_lam = target_lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
        return {
            "mix_index": index,
            "mix_box": torch.tensor(box, dtype=torch.long).expand(batch_size, 4).contiguous(),
            "mix_weights": torch.tensor([pixel_lam, target_lam], dtype=torch.float32)
            .expand(batch_size, 2)
            .contiguous(),
        }


__all__ = [
    "BatchedAugment",
    "DataArguments",
    "EpochCallback",
    "HierarchicalCollator",
    "ImageTransform",
    "PolicyAugment",
    "TrainAugment",
    "apply_transforms",
    "build_eval_transform",
    "build_train_transform",
    "load_raw_datasets",
    "prepare_datasets",
]


if __name__ == "__main__":  # `python data_utils.py download DEST`: a local copy of CIFAR-100, see download_data.py
    from download_data import cli

    cli()
