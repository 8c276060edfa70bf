"""What a model was trained for and on, recorded with every checkpoint and saved model, and compared whenever a run
takes up another's parts.

* The label tables (fine names in order, superclass names, the superclass of every class) are the config's
  `id2label`, `coarse_label_names` and `fine_to_coarse`, saved in `config.json`; [`tables_difference`] names the
  first difference between two of them.
* The data are recorded in `provenance.json` beside `config.json` as a [`DataRecord`]: a fingerprint of the training
  split as the source holds it (before a validation split is carved from it), and where the validation split came
  from: the rows carved from the training split (their positions, in the split's order, with the seed and fraction
  that chose them), the source's own validation split (its fingerprint), or none.

The fingerprint of a split is the SHA-256 over its rows in order, each row the 128-bit BLAKE2b digest of its
encoded image (the stored bytes, or the file a path names; never decoded) followed by its class id as 8 bytes:
the same images and labels in the same order give the same fingerprint whatever the format or folder they come
from. It costs one read of the encoded images, as the duplicate-image check does.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
from datasets import Dataset
from transformers.utils import logging

from configuration_hierarchical import HierarchicalEfficientNetV2Config, is_integer
from hierarchical.data.checks import image_digests, split_train_validation
from hierarchical.data.hierarchy import Hierarchy
from hierarchical.options import reject_duplicate_keys

logger = logging.get_logger(__name__)

PROVENANCE_NAME = "provenance.json"
FORMAT_VERSION = 1
VALIDATION_SOURCES = ("carved", "source", "none")


# ----------------------------------------------------------------------------------------------------------------
# Label tables
# ----------------------------------------------------------------------------------------------------------------


def tables_difference(recorded: Hierarchy, current: Hierarchy, recorded_as: str, current_as: str) -> str | None:
    """The first difference between two label tables, in words (`recorded_as` and `current_as` name their owners,
    e.g. "the checkpoint" and "this run"), or None when they are identical: the number of classes or superclasses,
    then the first class or superclass name that differs by position (saying whether the same names only come in
    another order), then the first class whose superclass differs."""
    for old, new in ((recorded.fine_names, current.fine_names), (recorded.coarse_names, current.coarse_names)):
        if len(old) != len(new):
            return (
                f"another hierarchy: {recorded_as} has {len(recorded.fine_names)} classes in "
                f"{len(recorded.coarse_names)} superclasses, {current_as} {len(current.fine_names)} classes in "
                f"{len(current.coarse_names)} superclasses"
            )
    for level, old, new in (
        ("class", recorded.fine_names, current.fine_names),
        ("superclass", recorded.coarse_names, current.coarse_names),
    ):
        position = next((i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b), None)
        if position is not None:
            how = "the same names in another order" if sorted(old) == sorted(new) else "other names"
            return (
                f"{level} {position} is {old[position]!r} in {recorded_as} and {new[position]!r} in {current_as} "
                f"({how})"
            )
    for fine, (old, new) in enumerate(zip(recorded.fine_to_coarse, current.fine_to_coarse, strict=True)):
        if old != new:
            return (
                f"class {fine} ({recorded.fine_names[fine]!r}) belongs to superclass {recorded.coarse_names[old]!r} "
                f"in {recorded_as} and to {current.coarse_names[new]!r} in {current_as}"
            )
    return None


def folder_tables(folder: str) -> Hierarchy | None:
    """The label tables of the `config.json` in `folder` (a checkpoint or a saved model), or None without one."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    return Hierarchy.from_config(HierarchicalEfficientNetV2Config.from_json_file(path))


# ----------------------------------------------------------------------------------------------------------------
# Data record
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataRecord:
    """The data a model was trained on, as `provenance.json` stores it.

    Args:
        train_fingerprint (`str`): [`split_fingerprint`] of the training split as the source holds it.
        train_rows (`int`): its number of rows.
        validation (`str`): where the validation split came from: "carved" from the training split, the "source"'s
            own validation split, or "none".
        seed (`int`, *optional*), fraction (`float`, *optional*): what carved the validation split.
        validation_rows (`tuple[int, ...]`): carved: the positions of its rows in the training split, in its order.
        validation_fingerprint (`str`, *optional*): "source": [`split_fingerprint`] of that split.
    """

    train_fingerprint: str
    train_rows: int
    validation: str
    seed: int | None = None
    fraction: float | None = None
    validation_rows: tuple[int, ...] = field(default=(), repr=False)
    validation_fingerprint: str | None = None

    def trained_on(self) -> str:
        """Which rows of the training split the model trained on, in words."""
        if self.validation == "carved":
            return (
                f"the {self.train_rows - len(self.validation_rows)} rows of the training split that are not in the "
                f"validation split carved with seed {self.seed} and fraction {self.fraction}"
            )
        return f"every one of the {self.train_rows} rows of the training split"


def split_fingerprint(dataset: Dataset) -> str:
    """SHA-256 over the rows of a standardised split (columns `image`, `labels`), see the module's docstring."""
    digest = hashlib.sha256()
    labels = np.asarray(dataset.select_columns(["labels"]).with_format("numpy")[:]["labels"], dtype="<i8")
    for image, label in zip(image_digests(dataset), labels, strict=True):
        digest.update(image)
        digest.update(label.tobytes())
    return digest.hexdigest()


def write_record(folder: str, record: DataRecord) -> str:
    """Write `record` as `provenance.json` into `folder`; return the path."""
    content = {"format": FORMAT_VERSION, **asdict(record), "validation_rows": list(record.validation_rows)}
    path = os.path.join(folder, PROVENANCE_NAME)
    with open(path, "w", encoding="utf-8") as file:
        json.dump(content, file)
    return path


def _reject_constant(name: str) -> float:
    """`json.load` hook: NaN and infinities are not JSON numbers."""
    raise ValueError(f"{name} is not a number JSON allows")


def _record_problem(content: object) -> str | None:
    """Why the parsed `provenance.json` `content` is not a record this code writes, or None: every field present
    with its type (a boolean is not a number), nothing else, and the fields consistent with where the validation
    split came from."""
    if not isinstance(content, dict):
        return f"it holds {type(content).__name__}, not a JSON object"
    expected = {"format", *DataRecord.__dataclass_fields__}
    if set(content) != expected:
        missing, unknown = sorted(expected - set(content)), sorted(set(content) - expected)
        return f"its keys differ from a record's: missing {missing}, unknown {unknown}"
    if content["format"] != FORMAT_VERSION or not is_integer(content["format"]):
        return f"format is {content['format']!r}, not {FORMAT_VERSION}"
    fingerprint, rows = content["train_fingerprint"], content["train_rows"]
    if not isinstance(fingerprint, str) or len(fingerprint) != 64 or not set(fingerprint) <= set("0123456789abcdef"):
        return f"train_fingerprint is {fingerprint!r}, not a SHA-256 in hex"
    if not is_integer(rows) or rows < 1:
        return f"train_rows is {rows!r}, not a number of rows >= 1"
    validation, seed, fraction = content["validation"], content["seed"], content["fraction"]
    validation_rows, validation_fingerprint = content["validation_rows"], content["validation_fingerprint"]
    if validation not in VALIDATION_SOURCES:
        return f"validation is {validation!r}, not one of {list(VALIDATION_SOURCES)}"
    if not isinstance(validation_rows, list) or not all(is_integer(row) and 0 <= row < rows for row in validation_rows):
        return f"validation_rows must be a list of row positions in [0, {rows})"
    if len(set(validation_rows)) != len(validation_rows):
        return "validation_rows names a row more than once"
    if validation == "carved":
        if not is_integer(seed) or not (isinstance(fraction, float) and 0 < fraction < 1):
            return (
                f"a carved validation split needs an integer seed and a fraction in (0, 1), got {seed!r}, {fraction!r}"
            )
        if not 0 < len(validation_rows) < rows:
            return f"a carved validation split holds {len(validation_rows)} of the {rows} training rows"
    elif seed is not None or fraction is not None or validation_rows:
        return f"a validation split {validation!r} has no seed, fraction or validation_rows"
    is_hex = isinstance(validation_fingerprint, str) and len(validation_fingerprint) == 64
    if (validation == "source") != is_hex or (validation != "source" and validation_fingerprint is not None):
        return f"validation_fingerprint is {validation_fingerprint!r} for a validation split {validation!r}"
    return None


def read_record(folder: str) -> DataRecord | None:
    """The `provenance.json` of `folder`, or None when it has none. `ValueError` naming the file and the problem
    when it is not a record this code writes ([`_record_problem`]): a record is trusted whole or not at all."""
    path = os.path.join(folder, PROVENANCE_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file, object_pairs_hook=reject_duplicate_keys, parse_constant=_reject_constant)
    except (OSError, ValueError) as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} cannot be read: {error}") from error
    problem = _record_problem(content)
    if problem is not None:
        raise ValueError(f"{path} is not a valid record of the training data: {problem}")
    fields = {key: content[key] for key in DataRecord.__dataclass_fields__}
    return DataRecord(**{**fields, "validation_rows": tuple(fields["validation_rows"])})


def record_difference(recorded: DataRecord, current: DataRecord, recorded_as: str, current_as: str) -> str | None:
    """The first difference between two data records, in words, or None when they are the same."""
    if (recorded.train_fingerprint, recorded.train_rows) != (current.train_fingerprint, current.train_rows):
        return (
            f"the training data differ: {recorded_as} was trained on {recorded.train_rows} rows with fingerprint "
            f"{recorded.train_fingerprint[:16]}, {current_as} has {current.train_rows} rows with fingerprint "
            f"{current.train_fingerprint[:16]}"
        )
    if recorded.validation != current.validation:
        return (
            f"the validation split is {describe_validation(recorded)} in {recorded_as}, "
            f"{describe_validation(current)} in {current_as}"
        )
    if recorded != current:
        return (
            f"the validation split holds other rows: {describe_validation(recorded)} in {recorded_as}, "
            f"{describe_validation(current)} in {current_as}"
        )
    return None


def describe_validation(record: DataRecord) -> str:
    """Where the validation split of `record` came from, in words."""
    if record.validation == "carved":
        return f"{len(record.validation_rows)} rows carved with seed {record.seed} and fraction {record.fraction}"
    if record.validation == "source":
        return f"the source's own validation split (fingerprint {str(record.validation_fingerprint)[:16]})"
    return "none (every training row trained on)"


def _carve(train: Dataset, rows: list[int] | tuple[int, ...]) -> tuple[Dataset, Dataset]:
    """`train` without and with the rows at positions `rows` (the latter in the order of `rows`)."""
    held_out = set(rows)
    return train.select([row for row in range(len(train)) if row not in held_out]), train.select(list(rows))


def split_with_record(
    splits: dict[str, Dataset],
    fraction: float,
    seed: int,
    recorded: DataRecord | None = None,
    recorded_in: str = "the model",
    allow_data_mismatch: bool = False,
) -> tuple[dict[str, Dataset], DataRecord | None]:
    """The splits with the validation split in place, and the record of the data (None without a training split).

    Without `recorded`: the source's validation split, or `fraction` of the training split carved with `seed`
    ([`split_train_validation`]). With `recorded` (a saved model's record, read from `recorded_in`): the
    validation split that model was evaluated on during training, whatever `seed` and `fraction` say (a validation
    split of the source's own is evaluated as it is: its rows are not training rows); refused with
    `ValueError` when the training data differ from the recorded ones or when the validation split would hold rows
    the model trained on, unless `allow_data_mismatch` (then a warning, and the split is carved as without a
    record)."""
    splits = dict(splits)
    if "train" not in splits:
        return splits, None
    fingerprint = split_fingerprint(splits["train"])
    if recorded is not None:
        problem = _recorded_split_problem(splits, recorded, fingerprint)
        if problem is None and recorded.validation == "carved" and "validation" not in splits:
            splits["train"], splits["validation"] = _carve(splits["train"], recorded.validation_rows)
            message = (
                f"Validation split: the {len(recorded.validation_rows)} rows recorded in {recorded_in} (carved "
                f"with seed {recorded.seed} and fraction {recorded.fraction}); --seed and --train_val_split do not "
                "change it"
            )
            unused = [
                f"--{name} {given}"
                for name, given, used in (
                    ("seed", seed, recorded.seed),
                    ("train_val_split", fraction, recorded.fraction),
                )
                if given != used
            ]
            if unused:
                logger.warning(f"{message}: {' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used")
            else:
                logger.info(message)
            return splits, recorded
        if problem is not None:
            message = f"{problem}; pass --allow_data_mismatch true to evaluate these rows anyway"
            if not allow_data_mismatch:
                raise ValueError(f"{recorded_in} records its training data: {message}")
            logger.warning(f"{recorded_in}: {problem} (--allow_data_mismatch: evaluated anyway)")
    if "validation" in splits:
        validation_fingerprint = split_fingerprint(splits["validation"])
        record = DataRecord(fingerprint, len(splits["train"]), "source", validation_fingerprint=validation_fingerprint)
    elif fraction > 0:
        train, validation = split_train_validation(splits["train"], fraction, seed)
        rows = tuple(validation.select_columns(["index"]).with_format("numpy")[:]["index"].tolist())  # positions
        splits["train"], splits["validation"] = train, validation
        record = DataRecord(fingerprint, len(train) + len(validation), "carved", seed, fraction, rows)
    else:
        record = DataRecord(fingerprint, len(splits["train"]), "none")
    return splits, record


def _recorded_split_problem(splits: dict[str, Dataset], recorded: DataRecord, fingerprint: str) -> str | None:
    """Why the validation split recorded with a model cannot be evaluated on `splits`, or None."""
    if (fingerprint, len(splits["train"])) != (recorded.train_fingerprint, recorded.train_rows):
        return (
            f"the training split here ({len(splits['train'])} rows, fingerprint {fingerprint[:16]}) is not the one it "
            f"was trained on ({recorded.train_rows} rows, fingerprint {recorded.train_fingerprint[:16]}), so its "
            "validation rows cannot be told apart from its training rows"
        )
    if "validation" in splits:  # rows outside the training split: never trained on
        if (
            recorded.validation == "source"
            and split_fingerprint(splits["validation"]) != recorded.validation_fingerprint
        ):
            logger.warning("The validation split here is not the one recorded with the model: its figures differ")
        return None
    if recorded.validation != "carved":
        return (
            f"a validation split carved from the training split would hold rows it trained on: it trained on "
            f"{recorded.trained_on()}"
        )
    return None


def check_resumed_data(checkpoint: str, record: DataRecord | None, allow_data_mismatch: bool = False) -> None:
    """Refuse (`ValueError`) to resume from `checkpoint` when the data it recorded are not this run's `record`
    (other training rows, another validation split) or when it records none (no `provenance.json`), unless
    `allow_data_mismatch` (then a warning). An unreadable record is refused whatever `allow_data_mismatch` says."""
    if record is None:
        return
    try:
        recorded = read_record(checkpoint)
    except ValueError as error:
        raise ValueError(
            f"cannot resume from {checkpoint!r}: {error}. Move the checkpoint aside or pass another --output_dir"
        ) from error
    if recorded is None:
        difference = (
            f"it records no training data ({PROVENANCE_NAME} is missing), so it cannot be told whether it was "
            "trained on this run's data and validation split"
        )
    else:
        difference = record_difference(recorded, record, "the checkpoint", "this run")
    if difference is None:
        return
    if allow_data_mismatch:
        logger.warning(f"Resuming from {checkpoint} although {difference} (--allow_data_mismatch)")
        return
    raise ValueError(
        f"cannot resume from {checkpoint!r}: {difference}. Resume with the data, --seed and --train_val_split of the "
        "run that wrote it, pass another --output_dir, or --allow_data_mismatch true to resume anyway"
    )
