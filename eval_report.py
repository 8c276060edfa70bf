#!/usr/bin/env python
"""Evaluation report of the hierarchical classifier: metrics at both levels, accuracy per superclass and class,
confusions, calibration and selective answers.

`write_eval_report` turns predictions into `eval_report.md` and PNG figures; `evaluate_saved_model` runs a saved
model on a dataset split with `Trainer.predict`, as the training script evaluates, and writes that report:

    python eval_report.py outputs/run --dataset_name cifar100-local --split test

Each report has its own folder, `MODEL/reports/<split>/` unless `--output_dir` says otherwise (the training script
writes its reports the same way), and a report already there is replaced only with `--overwrite`.

`cifar100-local` is a local copy of CIFAR-100 (`python data_utils.py download cifar100-local`); a Hub id works too.

In Python: `hierarchical.training.saved_model.evaluate_saved_model` and
`hierarchical.evaluation.report.write_eval_report`.
The figures need matplotlib (optional): without it the markdown report is still written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from transformers import HfArgumentParser

from hierarchical.data.arguments import SPLITS, DataArguments
from hierarchical.evaluation.report_markdown import REPORT_NAME, report_folder
from hierarchical.options import ERRORS_HELP, parse_into_dataclasses, run_command


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
    parser.add_argument("--split", default="test", choices=SPLITS, help="Split to evaluate.")
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
    data_args, options = parse_into_dataclasses(parser, list(sys.argv[1:] if argv is None else argv))
    # after parsing: `--help` and option errors load no model, Trainer or data code
    from hierarchical.training.saved_model import evaluate_saved_model

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


if __name__ == "__main__":
    run_command(main)
