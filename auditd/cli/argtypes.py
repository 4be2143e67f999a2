"""argparse value types shared by the subcommands' option tables."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(floor: int) -> Callable[[str], int]:
    """argparse type: a whole number >= floor."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
        if value < floor:
            raise argparse.ArgumentTypeError(f"{value}: expected a number >= {floor}")
        return value
    return parse


positive = at_least(1)
