"""Progress of a long export or import: a line redrawn on a TTY (stderr), nothing in
between otherwise (the command's summary line is the log line)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_EVERY_S = 0.25


class Progress:
    """`step(n)` after each chunk; redraws `label: done/total` at most every 0.25 s."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total = label, total
        self.stream = sys.stderr if stream is None else stream
        self.shown = self.stream.isatty()
        self.done = 0
        self._drawn_at = 0.0
        self.started = time.monotonic()

    def step(self, n: int) -> None:
        self.done += n
        if not self.shown:
            return
        now = time.monotonic()
        if now - self._drawn_at >= _EVERY_S:
            self._drawn_at = now
            print(f"\r{self.label}: {self.done:,}/{self.total:,}", end="", file=self.stream,
                  flush=True)

    def finish(self) -> float:
        """End the redrawn line; the seconds since the start."""
        if self.shown:
            print(f"\r{self.label}: {self.done:,}/{self.total:,}", file=self.stream, flush=True)
        return time.monotonic() - self.started
