"""`option()`: the dataclass field of a command-line option, as `HfArgumentParser` reads it;
`check_finite_options`, the check every options dataclass runs first; and `PROJECT_LOGGER`, the logger every module
but the model files logs under."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

# Every module but the four model files logs under this name, so that an entry point sets one level for them all.
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


__all__ = ["PROJECT_LOGGER", "check_finite_options", "option"]
