"""`option()`: the dataclass field of a command-line option, as `HfArgumentParser` reads it;
`check_finite_options`, the check every options dataclass runs first; `PROJECT_LOGGER`, the logger above every module
of the package; and `options_file_argv`, which turns a JSON options file into the command line that says
the same, so that a file is parsed and checked as the command line is; `parse_into_dataclasses`, the one way a
command line becomes options (unknown options named with their closest match, bad values as `ValueError`)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import sys
import typing
from collections.abc import Callable, Collection
from typing import Any

# The package's name: every module of the package logs under its own `__name__`, below this logger, so that an entry
# point sets one level for them all.
PROJECT_LOGGER = "hierarchical"


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    **metadata: Any,
) -> Any:
    """A `dataclasses.field` with `default` (or `default_factory`) whose metadata holds `help` and any further
    `argparse` keywords (`choices=...`), which `HfArgumentParser` passes to `add_argument`.

    >>> @dataclasses.dataclass
    ... class Options:
    ...     image_size: int = option(32, "Input resolution.")
    >>> dataclasses.fields(Options)[0].metadata["help"]
    'Input resolution.'
    """
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **metadata})


def check_finite_options(arguments: object) -> None:
    """Raise `ValueError` naming the first floating-point option of a dataclass that is NaN or infinite: such
    values pass every `< 0` check and would train a model full of NaN."""
    for declared in dataclasses.fields(arguments):
        value = getattr(arguments, declared.name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{declared.name} must be a finite number, got {value}")


# Set to 1 to keep the traceback of a user error (`--debug` is a `TrainingArguments` option of its own).
DEBUG_ENVIRONMENT_VARIABLE = "HIERARCHICAL_DEBUG"
# What a user's input causes: a bad option, value or file, a missing split, column or download. Anything else is a bug.
USER_ERRORS = (ValueError, OSError)
USER_ERROR_EXIT_STATUS = 2  # as argparse exits on a bad command line
ERRORS_HELP = (
    "A mistake in the options, the data or a file ends the command with one 'error: ...' line (exit status 2);\n"
    f"{DEBUG_ENVIRONMENT_VARIABLE}=1 shows its traceback. Any other failure shows its traceback."
)


def run_command(main: Callable[[], Any]) -> None:
    """Run a script's `main`: a user error (`USER_ERRORS`) ends it with one `error: ...` message on stderr and exit
    status 2; any other exception is a bug and keeps its traceback, as user errors do with `HIERARCHICAL_DEBUG=1`."""
    try:
        main()
    except USER_ERRORS as error:
        if os.environ.get(DEBUG_ENVIRONMENT_VARIABLE, "0") not in ("", "0"):
            raise
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(USER_ERROR_EXIT_STATUS) from None


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.load` hook: a JSON object, refusing a key given twice (JSON would keep the last one silently)."""
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"the key {duplicates[0]!r} is given more than once")
    return dict(pairs)


def _accepts_dict(parser: argparse.ArgumentParser, dest: str) -> bool:
    """Whether the dataclass field `dest` of an `HfArgumentParser` is declared to take a dict (given on the command
    line as a JSON string, as `TrainingArguments`' `fsdp_config` or `lr_scheduler_kwargs`)."""
    for dataclass_type in getattr(parser, "dataclass_types", ()):
        hints = typing.get_type_hints(dataclass_type)
        if dest in hints:
            return "dict" in str(hints[dest])
    return False


def _option_value(parser: argparse.ArgumentParser, action: argparse.Action, value: Any) -> list[str] | str:
    """The command-line words for the JSON `value` of `action`'s option, or a string saying what JSON type the
    option takes (when `value` is not of it)."""
    converter = action.type
    if isinstance(value, list) and action.nargs in ("+", "*"):
        # one level only: a list of lists says more than a command line can (as None, refused for every type)
        words = [_option_value(parser, action, None if isinstance(item, list) else item) for item in value]
        problem = next((word for word in words if isinstance(word, str)), None)
        return [word for item in words for word in item] if problem is None else f"a list, each item {problem}"
    if getattr(converter, "__name__", "") == "string_to_bool":
        return ["true" if value else "false"] if isinstance(value, bool) else "a boolean (true or false)"
    if isinstance(value, bool):  # a boolean is not a number nor a name
        value = None
    if converter is int:
        return [str(value)] if isinstance(value, int) else "an integer"
    if converter is float:  # an integer as its digits: one too large for a float is infinite, as typed
        return [str(value) if isinstance(value, int) else repr(value)] if isinstance(value, int | float) else "a number"
    if isinstance(value, dict) and _accepts_dict(parser, action.dest):
        return [json.dumps(value)]
    return [value] if isinstance(value, str) else "a string"


def options_file_argv(
    parser: argparse.ArgumentParser, path: str | os.PathLike, skip: Collection[str] = ()
) -> list[str]:
    """The command line that says what the JSON options file `path` says, for `parser` to parse as any other.

    The file holds one JSON object of `{option: value}` (UTF-8, a byte-order mark skipped); an option is named as on
    the command line, without the dashes (`num_train_epochs` or `num-train-epochs`; not a `no_x` switch: write
    `"x": false`). Each value must have the JSON type of its option: a
    boolean (`true`/`false`) for a switch, a number for a numeric option (an integer for an integer option),
    a string for a name, a list (or one value) for an option that takes several values, an object for an option
    that takes a dict. `null` is accepted only where the option's default is unset (it then stays unset). A value
    of another type, a string `"false"` for a switch or `"1e-3"` for a number, is a `ValueError` naming the key and
    the type it takes; an unknown key is reported as an unknown option. Keys in `skip` are left out.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"options file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as file:  # a byte-order mark, as some editors write, is skipped
            options = json.load(file, object_pairs_hook=reject_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as error:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"options file {path!r} is not a JSON object of options: {error}") from None
    if not isinstance(options, dict):
        raise ValueError(f"options file {path!r} must hold a JSON object of options, got {type(options).__name__}")
    actions = {}
    for action in parser._actions:
        if action.option_strings and action.nargs != 0:  # the --no_x switches share the dest of --x
            actions.setdefault(action.dest, action)
    argv: list[str] = []
    keys_of: dict[str, str] = {}  # option -> the key that set it
    for key, value in options.items():
        # a key is an option's name or one of its spellings on the command line (`num-train-epochs`)
        action = actions.get(key) or parser._option_string_actions.get(f"--{key}")
        if action is not None and keys_of.setdefault(action.dest, key) != key:
            raise ValueError(
                f"options file {path!r}: {keys_of[action.dest]!r} and {key!r} name the same option; give it once"
            )
        if action is not None and action.nargs == 0:  # `--no_calibrate`: a switch without a value
            raise ValueError(
                f"options file {path!r}: {key!r} is the command line's switch for {action.dest!r}; write "
                f'"{action.dest}": {json.dumps(action.const if action.const is not None else False)} instead'
            )
        if key in skip or (action is not None and action.dest in skip):
            continue
        if action is None:  # reported with the command line's unknown options, with a suggestion
            argv += [f"--{key}", json.dumps(value)]
            continue
        if value is None:
            if action.default is not None:
                raise ValueError(
                    f"options file {path!r}: {key!r} cannot be null (its default is {action.default!r}); "
                    "leave the key out for the default"
                )
            continue
        words = _option_value(parser, action, value)
        if isinstance(words, str):
            raise ValueError(
                f"options file {path!r}: {key!r} takes {words}, as on the command line, got {json.dumps(value)}"
            )
        argv += [action.option_strings[0], *words]
    return argv


def parse_into_dataclasses(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[Any, ...]:
    """`parser.parse_args_into_dataclasses(argv)` of an `HfArgumentParser`, as the scripts parse: unknown options
    are refused first, naming each with its closest known option (before any dataclass is built: building the
    `TrainingArguments` loads transformers' integrations, seconds), and a bad value is a `ValueError`, not an
    exit."""
    try:
        unknown = parser.parse_known_args(argv)[1]
        if not unknown:
            return tuple(parser.parse_args_into_dataclasses(args=argv))
    except argparse.ArgumentError as error:
        raise ValueError(str(error)) from None
    known = [option for action in parser._actions for option in action.option_strings if "-" not in option[2:]]
    hints = [  # the unknown option names (a value after one is not named again); stray values when none is
        f"{arg} (did you mean {' or '.join(close)}?)" if (close := difflib.get_close_matches(arg, known, n=1)) else arg
        for arg in unknown
        if arg.startswith("-")
    ]
    raise ValueError(f"unknown options: {', '.join(hints or unknown)}; `--help` lists every option")


__all__ = [
    "DEBUG_ENVIRONMENT_VARIABLE",
    "PROJECT_LOGGER",
    "ERRORS_HELP",
    "USER_ERRORS",
    "USER_ERROR_EXIT_STATUS",
    "check_finite_options",
    "option",
    "options_file_argv",
    "parse_into_dataclasses",
    "run_command",
]
