"""The evaluation report of one split: `write_eval_report` turns predictions into `eval_report.md` and its PNG
figures (numbers from `report_data`, text from `report_markdown`, figures from `report_figures`, which need
matplotlib; without it the markdown report is still written)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
from datasets import Dataset
from transformers.trainer_utils import PredictionOutput
from transformers.utils import logging

from configuration_hierarchical import DEFAULT_MAX_IMAGE_PIXELS, HierarchicalEfficientNetV2Config
from hierarchical.evaluation.report_data import compute_report_data
from hierarchical.evaluation.report_figures import draw_figures
from hierarchical.evaluation.report_markdown import FIGURE_NAMES, REPORT_NAME, render_markdown

logger = logging.get_logger(__name__)

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
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
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
        max_image_pixels (`int`, *optional*, defaults to 50,000,000): the evaluation's limit on decoded size
            (`--max_image_pixels`): `images` above it are refused from their header.

    Figures need matplotlib; without it the markdown says how to get them.
    """
    check_report_folder(output_dir, overwrite)
    data = compute_report_data(logits, coarse_logits, labels, coarse_labels, config, split, metrics)
    if images is not None and len(images) != len(data.fine_predictions):
        raise ValueError(f"images has {len(images)} entries but there are {len(data.fine_predictions)} predictions")
    os.makedirs(output_dir, exist_ok=True)
    written = draw_figures(output_dir, data, config, labels, coarse_labels, images, max_image_pixels)
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
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict[str, str]:
    """[`write_eval_report`] from `Trainer.predict` output: predictions `(logits, coarse_logits)`, label ids
    `(labels, coarse_labels)` (the order of `label_names`) and its metrics."""
    logits, coarse_logits = prediction.predictions
    labels, coarse_labels = prediction.label_ids
    return write_eval_report(
        output_dir,
        logits,
        coarse_logits,
        labels,
        coarse_labels,
        config,
        images,
        split,
        prediction.metrics,
        overwrite,
        max_image_pixels,
    )


__all__ = ["check_report_folder", "write_eval_report", "write_prediction_report"]
