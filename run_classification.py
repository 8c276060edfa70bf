#!/usr/bin/env python
"""Train and evaluate the hierarchical EfficientNetV2-S on CIFAR-100 with the Hugging Face Trainer.

    python run_classification.py --output_dir outputs/run --do_train --do_eval --do_predict
    accelerate launch run_classification.py --output_dir outputs/run --do_train --do_eval --do_predict
    python run_classification.py recipes/cpu_32px_30min.json

Options are the dataclasses of `hierarchical/training/arguments.py` and `data_utils.py` plus every `TrainingArguments`
option; a `.json` recipe given first may hold any of them, and the options after it override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from functools import partial

from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from hierarchical.data.arguments import DataArguments
from hierarchical.options import ERRORS_HELP, options_file_argv, parse_into_dataclasses, run_command
from hierarchical.training.arguments import OPTION_ALIASES, HierarchicalTrainingArguments, ModelArguments

RECIPE_HELP = """Train, evaluate and calibrate the hierarchical classifier.

A recipe is a JSON file of {"option": value} given as the first argument; options after it override it:
    python run_classification.py recipes/cpu_32px_30min.json --dataset_name my-data --output_dir outputs/mine
Each value has the JSON type of its option (true/false for a switch, a number for a number)."""

INTERRUPTED_EXIT_STATUS = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` with the description as written and each option's default once: added where the option has one
    and its help does not already name it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or action.nargs == 0 or "default" in help_text.lower():
            return help_text
        return f"{help_text} (default: %(default)s)"


def group_options(parser: HfArgumentParser) -> None:
    """Show the project's options first, in groups (model, data, training), and the inherited `TrainingArguments`
    after them; a `--no_x` switch is listed only as a note on `--x`, not with a copy of its help."""
    trainer_fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    own_training = [name for name in HierarchicalTrainingArguments.__annotations__ if name not in trainer_fields]
    groups = {
        "model and calibration": {field.name for field in dataclasses.fields(ModelArguments)},
        "data": {field.name for field in dataclasses.fields(DataArguments)},
        "training": set(own_training),
        "Trainer options (transformers TrainingArguments, with this project's defaults)": trainer_fields,
    }
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        for action in [action for action in parser._actions if action.dest in names and action.option_strings]:
            for container in parser._action_groups:
                if action in container._group_actions and container is not group:
                    container._group_actions.remove(action)
            group._group_actions.append(action)
    switches = {action.dest: action for action in parser._actions if action.option_strings and action.nargs != 0}
    for action in parser._actions:
        if action.nargs == 0 and action.dest in switches and action.option_strings[0].startswith("--no_"):
            action.help = argparse.SUPPRESS
            switches[action.dest].help = f"{switches[action.dest].help} ({action.option_strings[0]} turns it off.)"


def build_parser() -> HfArgumentParser:
    """The parser of every option (the project's, then `TrainingArguments`'); a bad value raises
    `argparse.ArgumentError` instead of exiting."""
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, HierarchicalTrainingArguments),
        usage="%(prog)s [RECIPE.json] [--option value ...]",
        description=RECIPE_HELP,
        epilog=f"{ERRORS_HELP}\nCtrl-C stops a run and names the checkpoint that the same command resumes from.",
        formatter_class=HelpFormatter,
        allow_abbrev=False,
        exit_on_error=False,
    )
    group_options(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, HierarchicalTrainingArguments]:
    """Parse the command line. A first argument ending in `.json` is a recipe: its options are read as if given
    first on the command line (`options_file_argv`), so the options that follow it override them."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith(".json"):
        argv = [*options_file_argv(parser, argv[0], skip=overridden_options(parser, argv[1:])), *argv[1:]]
    return parse_into_dataclasses(parser, argv)


def overridden_options(parser: HfArgumentParser, argv: list[str]) -> set[str]:
    """The options that `argv` sets, with their aliases (`--epochs` overrides a recipe's `num_train_epochs`)."""
    given = {
        parser._option_string_actions[arg.split("=")[0]].dest
        for arg in argv
        if arg.split("=")[0] in parser._option_string_actions
    }
    return given.union(*(aliases for aliases in OPTION_ALIASES if given.intersection(aliases)))


def check_run_options(model_args: ModelArguments, training_args: HierarchicalTrainingArguments) -> None:
    """Refuse a run with nothing to do, or an evaluation without a model to evaluate."""
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        raise ValueError("nothing to do: pass --do_train, --do_eval and/or --do_predict")
    if not training_args.do_train and model_args.model_name_or_path is None:
        raise ValueError("evaluating without --do_train needs --model_name_or_path (a trained model)")


def main(argv: list[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> dict[str, float]:
    """Parse and check the options, then run ([`hierarchical.training.run.start`]); return all metrics. `callbacks` are
    added to the Trainer's, after the script's own. A run already finished with the same options does nothing and
    returns its metrics. Ctrl-C raises `KeyboardInterrupt` saying where the run can resume."""
    model_args, data_args, training_args = parse_args(argv)
    check_run_options(model_args, training_args)
    from hierarchical.training.run import (
        start,  # after parsing: `--help` and option errors load no data, Trainer or model code
    )

    return start(model_args, data_args, training_args, callbacks)


def cli(argv: list[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> None:
    """[`main`] for the command line: user errors as one `error:` line (exit status 2), Ctrl-C as one line that
    says where the run resumes (exit status 130)."""
    try:
        run_command(partial(main, argv, callbacks))
    except KeyboardInterrupt as interruption:
        sys.stderr.write(f"\ninterrupted: {interruption or 'before the run started'}\n")
        raise SystemExit(INTERRUPTED_EXIT_STATUS) from None


if __name__ == "__main__":
    cli()
