#!/usr/bin/env python
"""Write CIFAR-100 images as a `split/superclass/class/image.png` folder tree with 7 superclasses of its own.

A two-level dataset that is not CIFAR-100's hierarchy, for trying `run_classification.py` on any hierarchy:

    python examples/regroup_cifar100.py SOURCE OUTPUT --per_class 100 --test_per_class 20
    python run_classification.py --dataset_name OUTPUT --output_dir outputs/regrouped --do_train --do_eval ...

SOURCE is anything `datasets` reads in the `uoft-cs/cifar100` schema: a Hub id or a local folder of parquet
files with the columns `img` and `fine_label`. The first `per_class` images of each class (in the source's order)
go to `train/`, the next `test_per_class` to `test/`.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections import Counter

import datasets
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configuration_hierarchical import CIFAR100_COARSE_LABELS, CIFAR100_FINE_LABELS, CIFAR100_FINE_TO_COARSE  # noqa: E402

# 7 superclasses of unequal size (25, 10, 15, 15, 10, 15 and 10 classes), each a union of CIFAR-100 superclasses.
REGROUPING = {
    "mammals & people": ["large_carnivores", "large_omnivores_and_herbivores", "medium_mammals", "small_mammals", "people"],
    "water life": ["aquatic_mammals", "fish"],
    "small creatures": ["insects", "non-insect_invertebrates", "reptiles"],
    "plants": ["flowers", "fruit_and_vegetables", "trees"],
    "vehicles": ["vehicles_1", "vehicles_2"],
    "indoor objects": ["food_containers", "household_electrical_devices", "household_furniture"],
    "outdoor places": ["large_man-made_outdoor_things", "large_natural_outdoor_scenes"],
}  # fmt: skip


def new_superclass_of_every_class() -> list[str]:
    """The new superclass name of each of the 100 fine classes, in CIFAR-100's fine order."""
    new_name = {old: new for new, olds in REGROUPING.items() for old in olds}
    if sorted(new_name) != sorted(CIFAR100_COARSE_LABELS):
        raise ValueError("REGROUPING must use every CIFAR-100 superclass exactly once")
    return [new_name[CIFAR100_COARSE_LABELS[coarse]] for coarse in CIFAR100_FINE_TO_COARSE]


def load_source(source: str) -> datasets.Dataset:
    """The `train` split of a Hub id or of a local folder of parquet files."""
    if os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True))
        if not files:
            raise FileNotFoundError(f"{source!r} holds no parquet files")
        return datasets.load_dataset("parquet", data_files={"train": files}, split="train")
    return datasets.load_dataset(source, split="train")


def regroup(source: str, output: str, per_class: int, test_per_class: int) -> Counter:
    """Write the tree; return the number of images written per split."""
    if os.path.exists(output) and os.listdir(output):
        raise ValueError(f"output folder {output!r} is not empty")
    dataset = load_source(source).cast_column("img", datasets.Image(decode=False))
    for column in ("img", "fine_label"):
        if column not in dataset.column_names:
            raise ValueError(f"{source!r} has no column {column!r}; its columns are {dataset.column_names}")
    superclass_of = new_superclass_of_every_class()
    seen: Counter = Counter()
    written: Counter = Counter()
    for row, example in enumerate(tqdm(dataset, desc="Writing images", unit="img")):
        fine = int(example["fine_label"])
        seen[fine] += 1
        if seen[fine] > per_class + test_per_class:
            continue
        split = "train" if seen[fine] <= per_class else "test"
        folder = os.path.join(output, split, superclass_of[fine], CIFAR100_FINE_LABELS[fine])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{row:05d}.png"), "wb") as file:
            file.write(example["img"]["bytes"])  # the source's PNG bytes, as they are
        written[split] += 1
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="Hub id or local folder of parquet files in the uoft-cs/cifar100 schema.")
    parser.add_argument("output", help="Folder to write (must be empty or absent).")
    parser.add_argument("--per_class", type=int, default=100, help="Training images per class.")
    parser.add_argument("--test_per_class", type=int, default=20, help="Test images per class (0: no test split).")
    args = parser.parse_args(argv)
    if args.per_class < 1 or args.test_per_class < 0:
        parser.error("--per_class must be >= 1 and --test_per_class >= 0")
    written = regroup(args.source, args.output, args.per_class, args.test_per_class)
    sizes = Counter(new_superclass_of_every_class())
    print(f"Wrote {dict(written)} images to {args.output}; classes per superclass: {dict(sizes)}")


if __name__ == "__main__":
    main()
