"""Where the data comes from: the Hub, local parquet/arrow files, image folders and `cifar-100-python` pickles
(read with a restricted unpickler). Each loader returns a `DatasetDict` as the source holds it."""

from __future__ import annotations

import fnmatch
import io
import os
import pickle
import re
from collections.abc import Collection
from typing import Any

import datasets
import numpy as np
import PIL.Image
import pyarrow
import pyarrow.ipc
import pyarrow.parquet
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from transformers.utils import logging

from hierarchical.data.arguments import DataArguments
from hierarchical.data.hierarchy_files import (
    HIDDEN_PREFIXES,
    IMAGE_EXTENSIONS,
    image_folder_layout,
    load_hierarchy_tree,
    walk_files,
)
from hierarchical.hub import HUB_ID

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct

logger = logging.get_logger(__name__)


DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}


CIFAR_PYTHON_FILES = ("train", "test", "meta")


LOCAL_DATA_HINT = (
    "make a local copy once on a machine with internet access (`python data_utils.py download cifar100-local`), "
    "copy that folder here and pass --dataset_name cifar100-local (after the recipe's file name, when a recipe "
    "is used: options after it override it)"
)


def load_raw_datasets(args: DataArguments, splits: Collection[str] | None = None) -> DatasetDict:
    """Load the source that `args.dataset_name` names, with the source's own splits and columns.

    `splits` (source split names) restricts what is read to those splits where the source has any of them: the
    files of other splits are not read at all (data files, image folders) or dropped once loaded (other sources).
    A source with none of them is loaded whole, so that the caller can name the splits it has.
    """
    if args.dataset_name == "imagefolder":
        if args.data_dir is None:
            raise ValueError("--dataset_name imagefolder needs --data_dir, the folder with one subfolder per class")
        return only_splits(load_image_folder(_existing_path(args.data_dir, "data_dir"), args, splits), splits)
    path = os.path.expanduser(args.dataset_name)
    if any(char in path for char in "*?["):  # a glob pattern
        files = glob_files(path)
        if not files:
            raise FileNotFoundError(f"--dataset_name {args.dataset_name!r}: the pattern matches no file")
        root = os.path.commonpath([os.path.dirname(p) for p in files])
        return only_splits(load_data_files(files, root, args, splits), splits)
    if os.path.isfile(path):
        return only_splits(load_data_files([path], os.path.dirname(path), args, splits), splits)
    if os.path.isdir(path):
        return only_splits(load_local_folder(path, args, splits), splits)
    if HUB_ID.fullmatch(args.dataset_name) is None:
        raise FileNotFoundError(f"--dataset_name {args.dataset_name!r}: no such file or folder")
    return only_splits(load_hub_dataset(args), splits)


def only_splits(found: dict[str, Any], splits: Collection[str] | None) -> Any:
    """`found` (a `DatasetDict`, or split -> files) restricted to `splits`; whole when `splits` is None or when it
    holds none of them."""
    if splits is None or not any(name in found for name in splits):
        return found
    return type(found)({name: value for name, value in found.items() if name in splits})


def glob_files(pattern: str) -> list[str]:
    """The files (not folders) that a `--dataset_name` glob pattern matches, sorted.

    The folders under the pattern's fixed part are read by [`walk_files`], as every folder is: links to folders
    followed with loop protection, hidden names skipped. `**` matches any number of folders, `*`, `?` and `[...]`
    match within one name.
    """
    parts = pattern.split(os.sep)
    fixed = next((i for i, part in enumerate(parts) if any(char in part for char in "*?[")), len(parts))
    prefix, wanted = parts[:fixed], parts[fixed:]
    root = os.sep.join(prefix) or (os.sep if pattern.startswith(os.sep) else ".")
    if not wanted or not os.path.isdir(root):
        return []
    depth = None if "**" in wanted else len(wanted)
    found = [parts for parts in walk_files(root, depth) if _matches(parts, wanted)]
    return sorted(os.path.join(root, *parts) if prefix else os.path.join(*parts) for parts in found)


def _matches(parts: tuple[str, ...] | list[str], patterns: list[str]) -> bool:
    """Whether the path parts `parts` match the glob pattern parts `patterns` (`**`: any number of parts)."""
    if not patterns:
        return not parts
    if patterns[0] == "**":
        return _matches(parts, patterns[1:]) or (bool(parts) and _matches(parts[1:], patterns))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], patterns[0]) and _matches(parts[1:], patterns[1:])


def source_folder(args: DataArguments) -> str | None:
    """The local folder that a dataset's relative image paths are resolved against (the folder
    [`load_raw_datasets`] loads from); `None` for a Hub dataset."""
    if args.dataset_name == "imagefolder":
        return None if args.data_dir is None else os.path.abspath(os.path.expanduser(args.data_dir))
    path = os.path.expanduser(args.dataset_name)
    if any(char in path for char in "*?["):
        files = glob_files(path)
        return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in files]) if files else None
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    return os.path.abspath(path) if os.path.isdir(path) else None


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


def load_local_folder(path: str, args: DataArguments, splits: Collection[str] | None = None) -> DatasetDict:
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
    split_names = tuple(args.source_split_names().values())
    candidates = _visible_files(path)
    for split in split_names:
        if os.path.isdir(os.path.join(path, split)):
            candidates += _visible_files(os.path.join(path, split))
    walked = walk_files(path)
    all_files = [os.path.join(path, *parts) for parts in walked]
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
            return load_data_files(data_files, path, args, splits)
    if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in all_files):
        return load_image_folder(path, args, splits, walked)
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
        return sorted(e.path for e in entries if not e.name.startswith(HIDDEN_PREFIXES) and e.is_file())


def load_data_files(
    files: list[str], root: str, args: DataArguments, splits: Collection[str] | None = None
) -> DatasetDict:
    """Load parquet or arrow files; a file's split is the split name its path (relative to `root`) starts with.
    With `splits`, only the files of those splits are read (see [`load_raw_datasets`])."""
    extensions = {os.path.splitext(f)[1].lower() for f in files}
    if len(extensions) != 1 or next(iter(extensions)) not in DATA_FILE_BUILDERS:
        raise ValueError(
            f"--dataset_name {args.dataset_name!r}: expected only .parquet or only .arrow files, got {sorted(extensions)}"
        )
    builder = DATA_FILE_BUILDERS[extensions.pop()]
    split_names = tuple(args.source_split_names().values())
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
    data_files = only_splits(data_files, splits)
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


def load_image_folder(
    path: str,
    args: DataArguments,
    splits: Collection[str] | None = None,
    files: list[tuple[str, ...]] | None = None,
) -> DatasetDict:
    """Load an image folder: one subfolder per class, whatever the class names, labelled by the folder name.

    Split folders (`train/<class>/...`, per the split options) are read as splits only when every top folder is
    named after a split; otherwise every top-level subfolder is a class (CIFAR-100 has a class named `train`).
    A tree nested as `superclass/class/image` is read by `load_hierarchy_tree`; both layouts come from one walk
    of the folder ([`image_folder_layout`]), which follows links to folders and skips hidden files.
    """
    split_names = tuple(args.source_split_names().values())
    kind, by_split = image_folder_layout(path, split_names, files)
    if kind == "tree":
        return load_hierarchy_tree(path, args, by_split)
    by_split = only_splits(by_split, splits)
    data_files = {}
    for split, images in by_split.items():
        classes = {parts[-2] for parts in images}
        logger.info(f"Reading {len(images)} images in {len(classes)} class folders of {path!r} as split {split!r}")
        data_files[split] = [os.path.join(path, *parts) for parts in images]
    return datasets.load_dataset("imagefolder", data_files=data_files, drop_labels=False, cache_dir=args.cache_dir)


REFUSED_GLOBAL = "refused to load the global"


# The one hand-written loader: no `datasets` builder reads the cifar-100-python pickles without unpickling them.
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
                f"{REFUSED_GLOBAL} {module}.{name}: CIFAR-100 python files only need numpy arrays"
            )
        return self.ALLOWED_GLOBALS[(module, name)]


NPY_MAGIC = b"\x93NUMPY"  # the first bytes of a file written by numpy.save


def read_cifar_pickle(path: str) -> dict[bytes, Any]:
    """Read one file of the original cifar-100-python folder (a dict with bytes keys) with `CifarUnpickler`.

    Every refusal names the file: a `.npy` file written with `numpy.save`, a file that is no pickle, a pickle of
    another shape; a global other than numpy's array reconstruction raises `pickle.UnpicklingError`.
    """
    with open(path, "rb") as file:
        if file.read(len(NPY_MAGIC)) == NPY_MAGIC:
            raise ValueError(
                f"{path}: a numpy .npy file (written with numpy.save), not a pickle as in the cifar-100-python "
                "archive; write the dict with pickle.dump, or use the files of the original archive"
            )
        file.seek(0)
        try:
            content = CifarUnpickler(file, encoding="bytes").load()
        except pickle.UnpicklingError as error:
            if str(error).startswith(REFUSED_GLOBAL):
                raise pickle.UnpicklingError(f"{path}: {error}") from None
            raise ValueError(f"{path}: not a valid cifar-100-python file (not a pickle: {error})") from None
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
            "img": [{"bytes": png_bytes(image), "path": None} for image in images],
            "fine_label": fine,
            "coarse_label": coarse,
        }
        splits[split] = Dataset.from_dict(columns, features=features)
    return DatasetDict(splits)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of one (H, W, 3) uint8 array."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
