"""The training run behind `run_classification.py`, once its options are parsed: logging, the finished-run and
split checks, the data and model, the Trainer, training, evaluation, calibration, reports and the upload.

`run_classification.py` imports this module only after parsing, so that `--help` and option errors answer without
loading `datasets`, the Trainer or the model code."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import datasets
import transformers
from datasets import Dataset, DatasetDict
from torch import nn
from transformers import TrainerCallback, TrainingArguments, set_seed

from configuration_hierarchical import HierarchicalEfficientNetV2Config
from hierarchical.data.arguments import EVALUATION_SPLITS, DataArguments
from hierarchical.data.collation import EpochCallback, HierarchicalCollator
from hierarchical.data.hierarchy import balanced_class_weights, discover_hierarchy, set_class_weights
from hierarchical.data.label_columns import data_columns
from hierarchical.data.provenance import PROVENANCE_NAME, DataRecord, check_resumed_data, read_record
from hierarchical.data.sources import load_raw_datasets
from hierarchical.data.splits import apply_transforms, planned_split_sizes, prepare_datasets_with_record, source_splits
from hierarchical.evaluation.calibration import (
    calibrate_and_select,
    calibration_count,
    evaluate_calibration,
    subset_prediction,
)
from hierarchical.evaluation.report import write_prediction_report
from hierarchical.evaluation.report_markdown import report_folder
from hierarchical.options import PROJECT_LOGGER
from hierarchical.training.arguments import HierarchicalTrainingArguments, ModelArguments, check_batch_fits
from hierarchical.training.callbacks import EMACallback, TimeBudgetCallback, TimedProgressCallback
from hierarchical.training.checkpoints import checkpoint_problem, find_checkpoints, output_dir_lock, resolve_checkpoint
from hierarchical.training.model_loading import load_model
from hierarchical.training.remote_resources import check_remote_resources
from hierarchical.training.run_summary import (
    OPTIONS_FILE,
    quiet_transformers,
    run_options,
    run_summary,
    write_run_options,
)
from hierarchical.training.trainer import HierarchicalTrainer, compute_metrics, parameter_groups
from modeling_hierarchical import build_image_processor

logger = logging.getLogger(__name__)

MALLOC_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest; smaller blocks come from the heap, which is reused
MALLOC_TRIM_THRESHOLD = 2**30  # free heap kept before any is handed back to the system


def start(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: HierarchicalTrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
) -> dict[str, float]:
    """Set up logging, check the options against the data, hold the output folder, then [`run`]; return all
    metrics. A run already finished with the same options does nothing and returns its metrics. Ctrl-C raises
    `KeyboardInterrupt` saying where the run can resume."""
    setup_logging(training_args)
    finished = finished_run_metrics(model_args, data_args, training_args)
    if finished is not None:
        return finished
    image_size = model_args.image_size or HierarchicalEfficientNetV2Config().image_size
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        check_batch_fits(getattr(training_args, name), image_size)
    check_remote_resources(  # everything the run would download or upload, named at once, before anything is written
        data_args.dataset_name,
        model_args.model_name_or_path,
        model_args.backbone_weights,
        cache_dir=data_args.cache_dir,
        revision=model_args.model_revision,
        push_to_hub=training_args.push_to_hub,
    )
    with training_args.main_process_first(desc="dataset loading"):
        raw = load_raw_datasets(data_args, source_splits(data_args, used_splits(training_args)))
    check_split_options(model_args, data_args, training_args, raw)
    try:
        with output_dir_lock(training_args.output_dir) if training_args.should_save else contextlib.nullcontext():
            return run(model_args, data_args, training_args, callbacks, raw=raw)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interruption_note(training_args)) from None


def keep_freed_memory() -> bool:
    """Make glibc's allocator keep freed memory for reuse: by default it maps large tensors fresh and trims the
    heap, so every training step faults tens of thousands of pages in again (about 8% of a CPU step at 32 px).
    The same as starting Python with `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` set to these values.
    Returns whether it applied (Linux with glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD) and mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD))


def setup_logging(training_args: TrainingArguments) -> None:
    """Log to stdout; the main process at the Trainer's log level, the others at warnings only."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:  # "passive" log level: info on the main process, as the transformers examples
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logging.getLogger(PROJECT_LOGGER).setLevel(log_level)  # this script's and every data, evaluation, training part's
    # datasets logs its cache internals at info level: shown from --log_level debug on, once (its own handler)
    datasets.utils.logging.set_verbosity(log_level if log_level < logging.INFO else max(log_level, logging.WARNING))
    datasets.utils.logging.disable_propagation()
    if training_args.disable_tqdm:  # no progress bars in a redirected log: their carriage returns garble it
        datasets.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def check_split_options(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: HierarchicalTrainingArguments,
    raw: DatasetDict,
) -> None:
    """Refuse, as soon as the source's splits are known and before the output folder is made, options that need a
    split the data does not have (`--do_eval`, `--do_predict`) or that would leave one empty: `--train_val_split`
    (an empty training or validation split) and `--calibration_split_fraction` (an empty part of the validation
    split, found otherwise only after training). An evaluation of a saved model whose validation split was carved
    (`provenance.json`) is planned with the recorded share, which it evaluates whatever `--train_val_split` says."""
    recorded = None if training_args.do_train else saved_model_record(model_args.model_name_or_path, do_eval=False)
    if training_args.do_eval and recorded is not None and recorded.validation == "carved":
        data_args = dataclasses.replace(data_args, train_val_split=recorded.fraction)
    sizes = planned_split_sizes(data_args, {name: len(split) for name, split in raw.items()})
    found = f"the data {data_args.dataset_name!r} has the splits {list(raw)}"
    if training_args.do_eval and "validation" not in sizes:
        strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
        during_training = training_args.do_train and strategy != "no"
        asked = f"evaluating during training (--eval_strategy {strategy})" if during_training else "--do_eval"
        raise ValueError(
            f"{asked} needs a validation split: {found}, none named {data_args.validation_split_name!r}; pass "
            "--validation_split_name with one of them, or --train_val_split > 0 to carve one from the training split"
            + (", or --eval_strategy no to train without evaluating" if during_training else "")
        )
    if training_args.do_predict and "test" not in sizes:
        raise ValueError(
            f"--do_predict needs a test split: {found}, none named {data_args.test_split_name!r}; pass "
            "--test_split_name with one of them, or leave out --do_predict"
        )
    if training_args.do_eval and model_args.calibrate:
        calibration_count(sizes["validation"], model_args.calibration_split_fraction)


def finished_run_metrics(
    model_args: ModelArguments, data_args: DataArguments, training_args: HierarchicalTrainingArguments
) -> dict[str, float] | None:
    """The metrics (`all_results.json`) of the run in `output_dir` when it ran with these same options and wrote
    the results of every task of this run (`train_results.json`, `eval_results.json`, `test_results.json`); it is
    then logged that there is nothing to do. None otherwise: the run starts (or resumes)."""
    folder = Path(training_args.output_dir)
    tasks = {"train": "train_results.json", "eval": "eval_results.json", "predict": "test_results.json"}
    results = [folder / name for task, name in tasks.items() if getattr(training_args, f"do_{task}")]
    if not all(path.is_file() for path in [folder / OPTIONS_FILE, folder / "all_results.json", *results]):
        return None
    this_run = json.loads(json.dumps(run_options(model_args, data_args, training_args)))
    try:
        if json.loads((folder / OPTIONS_FILE).read_text()) != this_run:
            return None
        metrics = json.loads((folder / "all_results.json").read_text())
    except (OSError, ValueError):  # unreadable: not a finished run this one can stand for
        return None
    done = "Evaluation already finished"
    if training_args.do_train:
        try:
            state = json.loads((folder / "trainer_state.json").read_text())
            done = f"Training already finished at step {state['global_step']}"
        except (OSError, ValueError, KeyError, TypeError):
            done = "Training already finished"
    logger.warning(
        "%s: nothing to do; %s holds the finished run of these same options, whose results are kept (%s). Change an "
        "option or --output_dir to run again.",
        done,
        folder,
        ", ".join(path.name for path in results),
    )
    return metrics


def interruption_note(training_args: HierarchicalTrainingArguments) -> str:
    """What a user needs after Ctrl-C: the last complete checkpoint, and that the same command resumes from it."""
    if not training_args.do_train:
        return "nothing of this evaluation is kept; the same command starts it again"
    for path in reversed(find_checkpoints(training_args.output_dir)):
        if checkpoint_problem(path, needs_ema=training_args.ema_decay > 0) is None:
            return f"the last complete checkpoint is {path}; the same command resumes from it"
    return "no checkpoint was complete yet; the same command starts training again"


def load_data_and_model(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: HierarchicalTrainingArguments,
    raw: DatasetDict | None = None,
) -> tuple[nn.Module, DatasetDict, str | None, DataRecord | None, str]:
    """Load the data (unless `raw`, the source's splits, is given), the model whose heads fit its classes and the
    checkpoint to resume from; return the model, the splits with their transforms attached, the checkpoint (None for a
    fresh start), the record of the data the model is trained on (`hierarchical/data/provenance.py`: this run's when it
    trains, else the one saved with the model) and which columns of the data were read.

    A checkpoint of another run (other label tables, optimizer groups or data) is refused before any training. An
    evaluation of a saved model's validation split evaluates the rows recorded with it, whatever `--seed` says. An
    evaluation-only run reads only the splits it evaluates."""
    if raw is None:
        with training_args.main_process_first(desc="dataset loading"):
            raw = load_raw_datasets(data_args, source_splits(data_args, used_splits(training_args)))
    first_split = next(name for name in (data_args.train_split_name, data_args.validation_split_name,
                                         data_args.test_split_name, *raw) if name in raw)  # fmt: skip
    columns = data_columns(raw[first_split], data_args).describe()
    hierarchy = discover_hierarchy(raw, data_args)  # the classes of the data decide the heads
    if hierarchy is not None:
        logger.info("Classes of the data: %s", hierarchy.describe())
    with quiet_transformers():
        model = load_model(model_args, data_args.cache_dir, hierarchy)
    checkpoint = None
    if training_args.do_train:
        groups = parameter_groups(
            model, training_args.lr_conv, training_args.lr_fc, training_args.weight_decay, training_args.layer_decay
        )
        with training_args.main_process_first(desc="checkpoint scan"):
            checkpoint = resolve_checkpoint(training_args, model, num_param_groups=len(groups))
    config = model.config
    source = model_args.model_name_or_path
    recorded = None if training_args.do_train else saved_model_record(source, training_args.do_eval)
    with training_args.main_process_first(desc="dataset preparation"):
        splits, record = prepare_datasets_with_record(
            data_args,
            config,
            seed=training_args.seed,
            raw=raw,
            recorded=recorded if training_args.do_eval else None,
            recorded_in=f"--model_name_or_path {source!r}",
            splits=used_splits(training_args),
        )
    if checkpoint is not None:
        check_resumed_data(checkpoint, record, data_args.allow_data_mismatch)
    if model_args.class_weights == "balanced" and "train" in splits:
        train_columns = splits["train"].select_columns(["labels", "coarse_labels"]).with_format("numpy")[:]
        set_class_weights(
            model,
            balanced_class_weights(train_columns["labels"], config.num_labels),
            balanced_class_weights(train_columns["coarse_labels"], config.num_coarse_labels),
        )
    if training_args.sync_batchnorm and training_args.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    splits = apply_transforms(splits, config, data_args, seed=training_args.seed)
    return model, splits, checkpoint, record if training_args.do_train else recorded, columns


def used_splits(training_args: TrainingArguments) -> list[str] | None:
    """The splits a run uses: all of them when it trains, else those it evaluates (`--do_eval`: validation,
    `--do_predict`: test)."""
    if training_args.do_train:
        return None
    used = (training_args.do_eval, training_args.do_predict)
    return [split for split, wanted in zip(EVALUATION_SPLITS, used, strict=True) if wanted]


def saved_model_record(source: str | None, do_eval: bool) -> DataRecord | None:
    """The record of the data the saved model `source` was trained on (`provenance.json`), None when it has none
    (a fresh model, a Hub id, a folder written without one: then a warning with `do_eval`)."""
    if source is None or not os.path.isdir(source):
        return None
    recorded = read_record(source)
    if recorded is None and do_eval:
        logger.warning(
            "%s records no training data (%s): its validation split is carved with --seed and may hold rows it "
            "trained on",
            source,
            PROVENANCE_NAME,
        )
    return recorded


def build_trainer(
    model: nn.Module,
    config: HierarchicalEfficientNetV2Config,
    splits: DatasetDict,
    data_args: DataArguments,
    training_args: HierarchicalTrainingArguments,
    checkpoint: str | None,
    extra_callbacks: Sequence[TrainerCallback] = (),
    data_record: DataRecord | None = None,
) -> HierarchicalTrainer:
    """The trainer with its callbacks (epoch for the augmentation seeds, weight average, time budget, progress lines
    when no progress bar is drawn, then `extra_callbacks`), the collator (MixUp/CutMix on both heads' targets) and
    the record of the model's data, saved with every checkpoint and the model."""
    callbacks = [EpochCallback(splits["train"])] if "train" in splits else []
    if training_args.do_train and training_args.ema_decay > 0:
        callbacks.append(EMACallback(training_args.ema_decay, resume_from=checkpoint))
    budget = None if training_args.max_train_minutes is None else TimeBudgetCallback(training_args.max_train_minutes)
    if budget is not None:
        callbacks.append(budget)
    if training_args.do_train and training_args.disable_tqdm:  # no progress bar: a timed progress line instead
        callbacks.append(TimedProgressCallback(budget=budget))
    trainer = HierarchicalTrainer(
        model=model,
        args=training_args,
        train_dataset=splits.get("train") if training_args.do_train else None,
        eval_dataset=splits.get("validation"),
        data_collator=HierarchicalCollator(
            config,
            mixup_alpha=data_args.mixup_alpha,
            cutmix_alpha=data_args.cutmix_alpha,
            mix_prob=data_args.mix_prob,
            cutmix_switch_prob=data_args.cutmix_switch_prob,
            seed=training_args.seed,
        ),
        processing_class=build_image_processor(config, data_args.max_image_pixels),
        compute_metrics=partial(compute_metrics, fine_to_coarse=config.fine_to_coarse),
        callbacks=[*callbacks, *extra_callbacks],
        data_record=data_record,
    )
    trainer.dataset_name = data_args.dataset_name
    return trainer


def train_and_save(trainer: HierarchicalTrainer, train: Dataset, checkpoint: str | None) -> dict[str, float]:
    """Train (from `checkpoint` when given), save the model, its metrics and the trainer state."""
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    train_metrics = {**result.metrics, "train_samples": len(train)}
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()
    return train_metrics


def evaluate_validation(
    trainer: HierarchicalTrainer,
    config: HierarchicalEfficientNetV2Config,
    validation: Dataset,
    model_args: ModelArguments,
    training_args: HierarchicalTrainingArguments,
) -> dict[str, float]:
    """Evaluate on the validation split, calibrate (with `--calibrate`) and write the validation report."""
    # predict, not evaluate: the same eval_* metrics plus the logits the report needs
    prediction = trainer.predict(validation, metric_key_prefix="eval")
    eval_metrics = prediction.metrics
    report = (prediction, validation, "validation")
    if model_args.calibrate:  # temperatures and selective threshold, stored in the saved config
        calibration = calibrate_and_select(config, prediction, model_args, training_args.seed)
        eval_metrics.update(calibration.metrics)
        if calibration.heldout_rows is not None:  # the report measures the images not used to calibrate
            rows = calibration.heldout_rows
            report = (subset_prediction(prediction, rows), validation.select(rows), "validation, held out")
        if trainer.is_world_process_zero():
            config.save_pretrained(training_args.output_dir)
    numbers = {name: value for name, value in eval_metrics.items() if not isinstance(value, str)}
    trainer.log(numbers)  # as trainer.evaluate does: log history, integrations, "epoch"
    eval_metrics.update(numbers)  # with the "epoch" that `log` adds
    trainer.log_metrics("eval", numbers)  # the texts (why no calibration, the guarantee) on lines of their own
    for name, text in eval_metrics.items():
        if isinstance(text, str):
            logger.info("%s: %s", name, text)
    trainer.save_metrics("eval", eval_metrics)
    if trainer.is_world_process_zero():  # the run's own folder: a rerun replaces its report
        folder = report_folder(training_args.output_dir, "validation")
        limit = trainer.processing_class.max_image_pixels  # --max_image_pixels, as the evaluation decoded them
        write_prediction_report(folder, report[0], config, report[1], report[2], overwrite=True, max_image_pixels=limit)
        logger.info("The validation report is in %s", folder)
    return eval_metrics


def evaluate_test(
    trainer: HierarchicalTrainer, config: HierarchicalEfficientNetV2Config, test: Dataset, output_dir: str
) -> dict[str, float]:
    """Evaluate on the test split, with the calibration metrics, and write the test report."""
    prediction = trainer.predict(test, metric_key_prefix="test")
    test_metrics = prediction.metrics
    logits, labels = prediction.predictions, prediction.label_ids
    test_metrics.update(
        {f"test_{name}": value for name, value in evaluate_calibration(*logits, *labels, config).items()}
    )
    trainer.log_metrics("test", test_metrics)
    trainer.save_metrics("test", test_metrics)
    if trainer.is_world_process_zero():
        folder = report_folder(output_dir, "test")
        limit = trainer.processing_class.max_image_pixels  # --max_image_pixels, as the evaluation decoded them
        write_prediction_report(folder, prediction, config, test, "test", overwrite=True, max_image_pixels=limit)
        logger.info("The test report is in %s", folder)
    return test_metrics


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: HierarchicalTrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
    raw: DatasetDict | None = None,
) -> dict[str, float]:
    """Load data (unless `raw`, the source's splits, is given) and model, train, evaluate, predict, save; return
    all metrics."""
    if training_args.keep_freed_memory and keep_freed_memory():
        logger.debug("glibc allocator keeps freed memory for reuse (--keep_freed_memory)")
    set_seed(training_args.seed)
    model, splits, checkpoint, data_record, columns = load_data_and_model(model_args, data_args, training_args, raw)
    config = model.config
    if training_args.should_save:
        write_run_options(training_args.output_dir, model_args, data_args, training_args)
    sizes = {split: len(dataset) for split, dataset in splits.items()}
    logger.info(
        run_summary(
            model,
            model_args.model_name_or_path,
            data_args.dataset_name,
            sizes,
            training_args,
            checkpoint,
            columns,
            calibrate=model_args.calibrate,
        )
    )
    trainer = build_trainer(model, config, splits, data_args, training_args, checkpoint, callbacks, data_record)

    metrics: dict[str, float] = {}
    if training_args.do_train:
        metrics.update(train_and_save(trainer, splits["train"], checkpoint))
    elif training_args.do_eval and model_args.calibrate:  # new temperatures and threshold: a new model to save
        trainer.save_model()
    # other evaluation-only runs write metrics and reports, not a copy of the weights
    if training_args.do_eval:
        metrics.update(evaluate_validation(trainer, config, splits["validation"], model_args, training_args))
    if training_args.do_predict:
        metrics.update(evaluate_test(trainer, config, splits["test"], training_args.output_dir))
    trainer.create_model_card()
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="Hierarchical EfficientNetV2-S trained with run_classification.py")
    return metrics
