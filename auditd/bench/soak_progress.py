"""How the soak measures: when each count of events was reached (`Timeline`), what the
daemon says it has committed (`CommitProgress`, polling /stats), progress as it goes
(`Progress`), and the footprint on disk as `du` counts it (`disk_usage`)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import sys
import threading
import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import structlog

from auditd.bench.daemon import peak_rss_mb
from auditd.cli.operator import UnixHTTPConnection
from auditd.errors import AuditdError

log = structlog.get_logger("auditd.bench.soak")

_POLL_S = 0.1
_STALL_S = 120.0  # committed stopped growing this long: the daemon will not catch up


@dataclass
class Timeline:
    """(time, events done) samples, rising; when a count was reached, interpolated."""

    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def add(self, at: float, count: int) -> None:
        self.times.append(at)
        self.counts.append(max(count, self.counts[-1] if self.counts else 0))

    def at(self, count: int) -> float:
        j = bisect_left(self.counts, count)
        if j == 0:
            return self.times[0]
        c0, c1, t0, t1 = self.counts[j - 1], self.counts[j], self.times[j - 1], self.times[j]
        return t0 + (count - c0) / (c1 - c0) * (t1 - t0)

    def rate(self, first: int, last: int) -> float | None:
        seconds = self.at(last) - self.at(first)
        return round((last - first) / seconds, 1) if seconds > 0 else None

    def summary(self, interval: int) -> dict[str, Any]:
        """The rate of every interval, of the first and last two, and of all."""
        done = self.counts[-1]
        marks = [*range(0, done + 1, interval), *([done] if done % interval else [])]
        window = min(2 * interval, done)
        first, last = self.rate(0, window), self.rate(done - window, done)
        return {
            "elapsed_s": round(self.at(done) - self.times[0], 3),
            "sustained_per_s": self.rate(0, done),
            "window": window, "first_window_per_s": first, "last_window_per_s": last,
            # Only when the two windows do not overlap (N >= 2 windows), or it says 1.0.
            "last_to_first": round(last / first, 3)
            if first and last and done >= 2 * window else None,
            "intervals": [{"through": b, "per_s": self.rate(a, b)}
                          for a, b in pairwise(marks)],
        }


class Progress:
    """A line rewritten in place on a TTY; a structured log line each interval otherwise."""

    def __init__(self, phase: str, total: int, interval: int) -> None:
        self.phase, self.total, self.interval = phase, total, interval
        self.tty = sys.stderr.isatty()
        self.reported = 0

    def update(self, timeline: Timeline) -> None:
        """Say each interval end (and the total) reached since the last call, one by one:
        a poll may pass more than one."""
        done = timeline.counts[-1]
        while self.reported < min(done, self.total) and (
                done >= self.reported + self.interval or done >= self.total):
            mark = min(self.reported + self.interval, self.total)
            per_s, overall = timeline.rate(self.reported, mark), timeline.rate(0, mark)
            last, self.reported = mark - self.reported, mark
            if self.tty:
                sys.stderr.write(f"\r{self.phase}: {mark:,} of {self.total:,} committed, "
                                 f"last {last:,} at {per_s or 0:,.0f}/s, all at "
                                 f"{overall or 0:,.0f}/s\x1b[K")
                sys.stderr.flush()
            else:
                log.info("soak_interval_committed", phase=self.phase, events=mark,
                         of=self.total, per_s=per_s, overall_per_s=overall)

    def close(self) -> None:
        if self.tty and self.reported:
            sys.stderr.write("\n")


class CommitProgress(threading.Thread):
    """Polls /stats `committed` into a Timeline from `begin()` on, and the peak RSS of
    the daemon's children (a sealer, an fsync helper) as it goes."""

    def __init__(self, status_socket: str, pid: int, progress: Progress) -> None:
        super().__init__(daemon=True)
        self.conn = UnixHTTPConnection(status_socket, timeout=10)
        self.pid, self.progress = pid, progress
        self.timeline = Timeline()
        self.child_peak_mb: float | None = None
        self.started = threading.Event()
        self.stopped = threading.Event()
        self.base = self.committed()

    def committed(self) -> int:
        try:
            self.conn.request("GET", "/stats")
            return int(json.loads(self.conn.getresponse().read())["committed"])
        except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
            self.conn.close()
            raise AuditdError(f"the bench daemon's /stats did not answer: {exc!r}") from None

    def begin(self) -> None:
        self.timeline.add(time.monotonic(), 0)
        self.started.set()

    def run(self) -> None:
        self.started.wait()
        while not self.stopped.wait(_POLL_S):
            with contextlib.suppress(AuditdError):  # one failed poll is one sample fewer
                self.timeline.add(time.monotonic(), self.committed() - self.base)
                self.progress.update(self.timeline)
            self._sample_children()

    def _sample_children(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
            for child in children:
                peak = peak_rss_mb(int(child))
                if peak is not None:
                    self.child_peak_mb = max(self.child_peak_mb or 0.0, peak)

    def wait_for(self, events: int) -> None:
        """Until `events` are committed, or nothing more was for _STALL_S."""
        last, since = -1, time.monotonic()
        while self.timeline.counts[-1] < events:
            if self.timeline.counts[-1] != last:
                last, since = self.timeline.counts[-1], time.monotonic()
            elif time.monotonic() - since > _STALL_S:
                break
            time.sleep(_POLL_S)
        self.stopped.set()
        self.join()
        self.conn.close()


def disk_usage(root: Path) -> dict[str, int]:
    """Allocated bytes (st_blocks * 512, as `du` counts) of each entry under `root`,
    directories included; files that vanish meanwhile (a journal segment) are skipped."""
    usage: Counter[str] = Counter()
    for entry in root.iterdir():
        paths = [entry]
        if entry.is_dir() and not entry.is_symlink():
            paths += [Path(d) / name for d, dirs, files in os.walk(entry)
                      for name in [*dirs, *files]]
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                usage[entry.name] += path.lstat().st_blocks * 512
    return dict(sorted(usage.items()))
