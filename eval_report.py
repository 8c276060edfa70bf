#!/usr/bin/env python
"""Evaluation report of the hierarchical classifier: metrics at both levels, accuracy per superclass and class,
confusions, calibration and selective answers.

`write_eval_report` turns predictions into `eval_report.md` and PNG figures; `evaluate_saved_model` runs a saved
model on a dataset split with `Trainer.predict`, as the training script evaluates, and writes that report:

    python eval_report.py outputs/run --dataset_name cifar100-local --split test

Each report has its own folder, `MODEL/reports/<split>/` unless `--output_dir` says otherwise (the training script
writes its reports the same way), and a report already there is replaced only with `--overwrite`.

`cifar100-local` is a local copy of CIFAR-100 (`python data_utils.py download cifar100-local`); a Hub id works too.

The numbers come from `hierarchical/evaluation/report_data.py`, the text from `hierarchical/evaluation/report_markdown.py`, the figures from `hierarchical/evaluation/report_figures.py`.
The figures need matplotlib (optional): without it the markdown report is still written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
from datasets import Dataset
from transformers import HfArgumentParser
from transformers.trainer_utils import PredictionOutput
from transformers.utils import logging

from configuration_hierarchical import HierarchicalEfficientNetV2Config
from data_utils import (
    SPLIT_LIMITS,
    DataArguments,
    HierarchicalCollator,
    evaluation_inputs,
    prepare_datasets_with_record,
)
from hierarchical.data.provenance import PROVENANCE_NAME, read_record
from hierarchical.evaluation.calibration import evaluate_calibration
from hierarchical.evaluation.metrics import compute_hierarchy_metrics
from hierarchical.evaluation.report_data import compute_report_data
from hierarchical.evaluation.report_figures import FIGURE_NAMES, draw_figures
from hierarchical.evaluation.report_markdown import REPORT_NAME, REPORTS_FOLDER, render_markdown, report_folder
from hierarchical.options import ERRORS_HELP, PROJECT_LOGGER, run_command
from hierarchical.training.arguments import HierarchicalTrainingArguments, ModelArguments
from hierarchical.training.model_loading import load_saved_model
from hierarchical.training.trainer import HierarchicalTrainer
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification

logger = logging.get_logger(f"{PROJECT_LOGGER}.{__name__}")

MATPLOTLIB_HINT = "`pip install matplotlib`"


def check_report_folder(output_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse (`ValueError` naming the folder) to write a report where one already is, unless `overwrite`."""
    names = [REPORT_NAME, *FIGURE_NAMES.values()]
    existing = [name for name in names if os.path.isfile(os.path.join(output_dir, name))]
    if existing and not overwrite:
        raise ValueError(
            f"{os.path.join(output_dir, existing[0])} already exists: a report is not replaced without --overwrite "
            "(overwrite=True); pass --overwrite, or another --output_dir"
        )


def write_eval_report(
    output_dir: str | os.PathLike,
    logits: np.ndarray,
    coarse_logits: np.ndarray,
    labels: np.ndarray,
    coarse_labels: np.ndarray,
    config: HierarchicalEfficientNetV2Config,
    images: Sequence[PIL.Image.Image] | Dataset | None = None,
    split: str = "test",
    metrics: dict[str, float] | None = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write `eval_report.md` and its PNG figures for one split into `output_dir`; return `{key: path}` written.

    Args:
        logits, coarse_logits (`np.ndarray`): `(n, num_labels)` and `(n, num_coarse_labels)` head outputs.
        labels, coarse_labels (`np.ndarray`): `(n,)` true class and superclass ids.
        config (`HierarchicalEfficientNetV2Config`): label names and hierarchy.
        images (`Sequence[PIL.Image.Image]` or `Dataset`, *optional*): the `n` images in prediction order (a
            `Dataset` needs an `image` column; an attached transform is ignored) for the grid of misclassified
            images; the grid is skipped without them.
        split (`str`, *optional*, defaults to `"test"`): split name shown in the report.
        metrics (`dict[str, float]`, *optional*): metrics already computed for these predictions (e.g. the
            Trainer's `eval_*`/`test_*`); their hierarchy metrics are reported as given, others (loss) listed too.
        overwrite (`bool`, *optional*, defaults to `False`): replace a report already in `output_dir` (its figures
            included); without it such a folder is refused with a `ValueError`.

    Figures need matplotlib; without it the markdown says how to get them.
    """
    check_report_folder(output_dir, overwrite)
    data = compute_report_data(logits, coarse_logits, labels, coarse_labels, config, split, metrics)
    if images is not None and len(images) != len(data.fine_predictions):
        raise ValueError(f"images has {len(images)} entries but there are {len(data.fine_predictions)} predictions")
    os.makedirs(output_dir, exist_ok=True)
    written = draw_figures(output_dir, data, config, labels, coarse_labels, images)
    note = ""
    if written is None:
        written = {}
        note = f"Figures were not drawn: matplotlib is not installed ({MATPLOTLIB_HINT} to get them)."
        logger.warning(f"matplotlib is not installed: {REPORT_NAME} without figures ({MATPLOTLIB_HINT})")
    for stale in set(FIGURE_NAMES) - set(written):  # an earlier report's figure must not pass for this one's
        path = os.path.join(output_dir, FIGURE_NAMES[stale])
        if os.path.isfile(path):
            os.remove(path)
    figures = {key: name for key, name in FIGURE_NAMES.items() if key in written}
    report_path = os.path.join(output_dir, REPORT_NAME)
    with open(report_path, "w", encoding="utf-8") as file:
        file.write(render_markdown(data, config, split, figures, note))
    written["report"] = report_path
    logger.info(f"Wrote the {split} report: {', '.join(os.path.basename(p) for p in written.values())}")
    return written


def write_prediction_report(
    output_dir: str | os.PathLike,
    prediction: PredictionOutput,
    config: HierarchicalEfficientNetV2Config,
    images: Sequence[PIL.Image.Image] | Dataset | None = None,
    split: str = "test",
    overwrite: bool = False,
) -> dict[str, str]:
    """[`write_eval_report`] from `Trainer.predict` output: predictions `(logits, coarse_logits)`, label ids
    `(labels, coarse_labels)` (the order of `label_names`) and its metrics."""
    logits, coarse_logits = prediction.predictions
    labels, coarse_labels = prediction.label_ids
    return write_eval_report(
        output_dir, logits, coarse_logits, labels, coarse_labels, config, images, split, prediction.metrics, overwrite
    )


def evaluate_saved_model(
    model_dir: str | os.PathLike,
    dataset_name: str,
    split: str = "test",
    output_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
    seed: int = 42,
    overwrite: bool = False,
    **data_options: Any,
) -> dict[str, float]:
    """Evaluate a saved model folder on one split and write its report (into `model_dir/reports/<split>/` by
    default; a report already there is refused before anything is computed, unless `overwrite`).

    Args:
        model_dir: a folder written by `save_pretrained` (e.g. by `run_classification.py`).
        dataset_name: any source `DataArguments.dataset_name` accepts (Hub id, parquet folder, ...).
        split: "train", "validation" or "test". The validation split of a model that records its training data
            (`provenance.json`) is the one recorded, whatever `seed` and `train_val_split` say; data other than the
            recorded ones, or a validation split that would hold rows the model trained on, are refused unless
            `allow_data_mismatch=True`. Without a record it is carved as in training, with `seed`.
        batch_size: images per inference batch (`per_device_eval_batch_size`).
        max_samples: evaluate only the first N rows of the split.
        seed: the training seed, which decides a carved validation split when the model records none.
        overwrite: replace a report already in the report folder.
        data_options: other `DataArguments` fields (column and split names, `train_val_split`, ...).

    Returns the hierarchy metrics (`fine_accuracy`, `coarse_accuracy`, ...) and the calibration and selective ones
    of the model's temperatures and threshold (`fine_ece`, `selective_accuracy`, ...).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if split not in SPLIT_LIMITS:
        raise ValueError(f"split must be one of {list(SPLIT_LIMITS)}, got {split!r}")
    if max_samples is not None:
        data_options[SPLIT_LIMITS[split]] = max_samples
    report_dir = report_folder(model_dir, split) if output_dir is None else output_dir
    check_report_folder(report_dir, overwrite)  # before the minutes of inference, not after
    # the training script's loader: a folder with missing, extra or misshaped tensors is refused, not half-random
    model = load_saved_model(ModelArguments(model_name_or_path=str(model_dir)), cache_dir=None, overrides={})
    config = model.config
    data_args = DataArguments(dataset_name=dataset_name, **data_options)
    recorded = read_record(str(model_dir)) if split == "validation" and os.path.isdir(model_dir) else None
    if split == "validation" and recorded is None:
        logger.warning(
            f"{model_dir} records no training data ({PROVENANCE_NAME}): the validation split is carved with seed "
            f"{seed} and may hold rows it trained on"
        )
    splits, _ = prepare_datasets_with_record(
        data_args,
        config,
        seed=seed,
        recorded=recorded,
        recorded_in=f"the model folder {str(model_dir)!r}",
        splits=[split],
    )
    if split not in splits:
        raise ValueError(f"the dataset {dataset_name!r} has no {split!r} split; it has {list(splits)}")
    prediction = predict_split(model, splits[split], split, data_args, batch_size, seed, report_dir)
    logits, coarse_logits = prediction.predictions
    labels, coarse_labels = prediction.label_ids
    metrics = compute_hierarchy_metrics(logits, coarse_logits, labels, coarse_labels, config.fine_to_coarse)
    metrics |= evaluate_calibration(logits, coarse_logits, labels, coarse_labels, config)
    write_eval_report(
        report_dir, logits, coarse_logits, labels, coarse_labels, config, splits[split], split, metrics, overwrite
    )
    logger.info(f"The {split} report is in {report_dir}")
    return metrics


def predict_split(
    model: HierarchicalEfficientNetV2ForImageClassification,
    dataset: Dataset,
    split: str,
    data_args: DataArguments,
    batch_size: int,
    seed: int,
    output_dir: str | os.PathLike,
) -> PredictionOutput:
    """`HierarchicalTrainer.predict` over a prepared split, with the evaluation path of the training script: images
    decoded to 8-bit RGB by the model's decoder (reduced for its image size), resized and normalised on the device.
    Nothing is written to `output_dir`; predictions `(logits, coarse_logits)`, label ids `(labels, coarse_labels)`,
    in row order."""
    inputs = evaluation_inputs(dataset, split, data_args, model.config.image_size)
    args = HierarchicalTrainingArguments(
        output_dir=str(output_dir),
        do_predict=True,
        per_device_eval_batch_size=batch_size,
        seed=seed,
        report_to=[],
    )
    trainer = HierarchicalTrainer(model=model, args=args, data_collator=HierarchicalCollator(model.config))
    return trainer.predict(inputs, metric_key_prefix=split)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Command line: `python eval_report.py MODEL_DIR --dataset_name PATH [--split test] [data options]`."""
    parser = HfArgumentParser(
        DataArguments,
        description=__doc__,
        epilog=ERRORS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("model_dir", help="Saved model folder (save_pretrained / run_classification.py output).")
    parser.add_argument("--split", default="test", choices=tuple(SPLIT_LIMITS), help="Split to evaluate.")
    parser.add_argument("--output_dir", default=None, help="Folder of the report (default: MODEL_DIR/reports/SPLIT).")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace a report already in that folder (refused without it)."
    )
    parser.add_argument("--batch_size", type=int, default=64, help="Images per inference batch.")
    parser.add_argument("--max_samples", type=int, default=None, help="Evaluate only the first N rows of the split.")
    parser.add_argument(
        "--seed",
        type=int,
        default=42,
        help="Training seed: carves the validation split of a model that records none (provenance.json).",
    )
    data_args, options = parser.parse_args_into_dataclasses(args=argv)
    data_options = dataclasses.asdict(data_args)
    metrics = evaluate_saved_model(
        options.model_dir,
        data_options.pop("dataset_name"),
        split=options.split,
        output_dir=options.output_dir,
        batch_size=options.batch_size,
        max_samples=options.max_samples,
        seed=options.seed,
        overwrite=options.overwrite,
        **data_options,
    )
    json.dump(metrics, sys.stdout, indent=2)
    report_dir = options.output_dir or report_folder(options.model_dir, options.split)
    print(f"\nReport: {os.path.join(report_dir, REPORT_NAME)}")
    return metrics


__all__ = [
    "REPORT_NAME",
    "REPORTS_FOLDER",
    "evaluate_saved_model",
    "main",
    "report_folder",
    "write_eval_report",
    "write_prediction_report",
]


if __name__ == "__main__":
    run_command(main)
