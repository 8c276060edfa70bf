"""`option()`: the dataclass field of a command-line option, as `HfArgumentParser` reads it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


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


__all__ = ["option"]
