"""Counters, gauges and latency histograms the status API and metrics read. No I/O.

Updated on the hot path with plain attribute arithmetic; percentiles and metric
families are computed only when someone asks.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

# Bucket upper bounds in milliseconds, shared by every latency histogram.
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500,
                      5000, 10000)
BATCH_BUCKETS = (1, 10, 100, 500, 1000, 2000, 4096, 8192, 16384)

DropReason = Literal["quota", "operator"]
"""Why dead letters were deleted: the quota on ingest rejects (storage.dlq_max_bytes), or
an operator's POST /dlq/drop (`auditd dlq drop`)."""
DROP_REASONS: tuple[DropReason, ...] = ("operator", "quota")


class Histogram:
    """Per-bucket counts since start (the metrics exposition sums them) plus the last
    `window` observations, over which `percentiles` is computed: /stats shows latency
    now, not a lifetime blend in which an hour-old stall never fades."""

    __slots__ = ("_recent", "bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...], window: int = 2048) -> None:
        if window < 1:
            raise ValueError(f"window must hold at least one observation, got {window}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.total = 0.0
        self._recent: deque[float] = deque(maxlen=window)

    @property
    def window(self) -> int:
        """How many recent observations the percentiles cover."""
        size = self._recent.maxlen
        assert size is not None
        return size

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value
        self._recent.append(value)  # the oldest falls out once `window` are held

    def percentiles(self) -> dict[str, float]:
        ordered = sorted(self._recent)
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
    dead_letters_by_reason: Counter[str] = field(default_factory=Counter)
    # Entries deleted from the dead-letter store: the total, and by DropReason.
    dead_letters_dropped: int = 0
    dead_letters_dropped_by_reason: Counter[str] = field(default_factory=Counter)
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

    def dead_letters_deleted(self, reason: DropReason, count: int) -> None:
        """Entries gone from the dead-letter store unresolved (a retry that stores the
        event is not a drop)."""
        self.dead_letters_dropped += count
        self.dead_letters_dropped_by_reason[reason] += count
