"""A saved model evaluated on one split of a dataset, as the training script evaluates: `evaluate_saved_model`
loads the model folder, prepares the split (the validation rows recorded with the model), predicts with the
`HierarchicalTrainer` and writes the split's report (`hierarchical.evaluation.report`). `eval_report.py` is its
command line."""

from __future__ import annotations

import os
from typing import Any

from datasets import Dataset
from transformers.trainer_utils import PredictionOutput
from transformers.utils import logging

from hierarchical.data.arguments import SPLIT_LIMITS, SPLITS, DataArguments
from hierarchical.data.collation import HierarchicalCollator
from hierarchical.data.provenance import PROVENANCE_NAME, read_record
from hierarchical.data.splits import evaluation_inputs, prepare_datasets_with_record
from hierarchical.evaluation.calibration import evaluate_calibration
from hierarchical.evaluation.metrics import compute_hierarchy_metrics
from hierarchical.evaluation.report import check_report_folder, write_eval_report
from hierarchical.evaluation.report_markdown import report_folder
from hierarchical.training.arguments import HierarchicalTrainingArguments, ModelArguments
from hierarchical.training.model_loading import load_saved_model
from hierarchical.training.trainer import HierarchicalTrainer
from modeling_hierarchical import HierarchicalEfficientNetV2ForImageClassification

logger = logging.get_logger(__name__)


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
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
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
    images, limit = splits[split], data_args.max_image_pixels  # the evaluation's limit on decoded size
    write_eval_report(
        report_dir, logits, coarse_logits, labels, coarse_labels, config, images, split, metrics, overwrite, limit
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


__all__ = ["evaluate_saved_model", "predict_split"]
