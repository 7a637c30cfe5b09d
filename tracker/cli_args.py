"""What the CLI's commands share in their arguments: ``--config``, and number types with
bounds that say what they must be."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_config_option(parser: Any, nested: bool = False) -> None:
    """``--config PATH`` on a command; ``nested`` on a sub-subcommand (``keys create``), whose
    default must not overwrite a ``--config`` given before it (``tracker keys --config X
    create``: argparse sets the nested parser's defaults last)."""
    parser.add_argument("--config", help="TOML config file (TRACKER_* variables override it)",
                        **({"default": argparse.SUPPRESS} if nested else {}))


def bounded(kind: Callable[[str], float], ok: Callable[[float], bool],
            must: str) -> Callable[[str], float]:
    """An argparse type: the text as ``kind`` (int, float) where ``ok`` holds of it, else an
    error saying it ``must`` be so (``must be a number from 0 to 1, not 'x'``)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {must}, not {text!r}")
        return value

    return parse
