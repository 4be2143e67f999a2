"""Counters, gauges and latency histograms the status API and metrics read. No I/O.

Updated on the hot path with plain attribute arithmetic; percentiles and metric
families are computed only when someone asks.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field

# Bucket upper bounds in milliseconds, shared by every latency histogram.
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500,
                      5000, 10000)
BATCH_BUCKETS = (1, 10, 100, 500, 1000, 2000, 4096, 8192, 16384)


class Histogram:
    """Per-bucket counts (the metrics exposition sums them) plus a window of recent
    samples for percentiles."""

    __slots__ = ("_next", "_window", "bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...], window: int = 2048) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.total = 0.0
        self._window: list[float] = []
        self._next = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value
        if len(self._window) < 2048:
            self._window.append(value)
        else:
            self._window[self._next] = value
            self._next = (self._next + 1) % 2048

    def percentiles(self) -> dict[str, float]:
        ordered = sorted(self._window)
        if not ordered:
            return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
        def at(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)
        return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99)}


@dataclass
class Stats:
    started_at: float = field(default_factory=time.time)
    accepted: int = 0
    committed: int = 0
    rejected: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    dead_letters_dropped: int = 0
    dead_letters_by_reason: Counter[str] = field(default_factory=Counter)
    frames: int = 0
    connections: int = 0
    connections_total: int = 0
    connections_by_uid: Counter[int] = field(default_factory=Counter)
    commit_failures: int = 0
    last_committed_seq: int = 0
    last_commit_at: float = field(default_factory=time.monotonic)
    replay_total: int = 0
    replay_done: int = 0
    replay_finished: bool = False
    commit_latency_ms: Histogram = field(
        default_factory=lambda: Histogram(LATENCY_BUCKETS_MS))
    reply_latency_ms: Histogram = field(
        default_factory=lambda: Histogram(LATENCY_BUCKETS_MS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    # Fair share (ingest/fairness.py): events of frames held back (overflow "block") or
    # answered overloaded ("reject"), by (uid, reason); reason is "rate_limit" (over
    # ingest.rate_limit), "share" (over its share of a contended buffer) or "buffer"
    # (the buffer full for everyone). A frame held, resumed and held again counts again.
    held_events: Counter[tuple[int, str]] = field(default_factory=Counter)
    refused_events: Counter[tuple[int, str]] = field(default_factory=Counter)
    pending_by_uid: Counter[int] = field(default_factory=Counter)  # uids with some only
    id_lookup_failures: int = 0  # database id lookups that failed (each attempt)
    id_lookup_refused_frames: int = 0  # frames answered overloaded after the last attempt

    def dead_lettered(self, code: str, count: int = 1) -> None:
        self.dead_letters += count
        self.dead_letters_by_reason[code] += count
