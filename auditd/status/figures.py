"""The /stats document: counters from Stats, the gauge snapshot, latencies and rates.

Rates come from a sampler that records the counters once a second, so a single
`auditd status` call shows what is happening now rather than a lifetime average.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from auditd.stats import DROP_REASONS, Histogram, Stats
from auditd.status.source import StatusSource

RATE_WINDOW_S = 10
_SAMPLE_EVERY_S = 1.0


class RateSampler:
    """Counters sampled once a second; rates are taken over the last RATE_WINDOW_S."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self._samples: deque[tuple[float, int, int, int]] = deque(maxlen=RATE_WINDOW_S + 1)

    def sample(self) -> None:
        s = self.stats
        self._samples.append((time.monotonic(), s.accepted, s.committed, s.rejected))

    async def run(self) -> None:
        """Sample until cancelled (StatusServer.aclose cancels it)."""
        while True:
            self.sample()
            await asyncio.sleep(_SAMPLE_EVERY_S)

    def rates(self) -> dict[str, float]:
        s = self.stats
        now = (time.monotonic(), s.accepted, s.committed, s.rejected)
        if self._samples and now[0] - self._samples[0][0] > 0.5:
            then = self._samples[0]
        else:  # just started: the average since start is the best there is
            then = (now[0] - max(time.time() - s.started_at, 1e-3), 0, 0, 0)
        span = now[0] - then[0]
        return {
            "window_s": round(span, 3),
            "accepted_per_s": round((now[1] - then[1]) / span, 1),
            "committed_per_s": round((now[2] - then[2]) / span, 1),
            "rejected_per_s": round((now[3] - then[3]) / span, 1),
        }


def latency(histogram: Histogram) -> dict[str, float]:
    """Percentiles over the recent window, plus the lifetime count and mean."""
    summary: dict[str, float] = dict(histogram.percentiles())
    summary["count"] = histogram.count
    summary["mean"] = round(histogram.total / histogram.count, 3) if histogram.count else 0.0
    return summary


def fairness_document(source: StatusSource) -> dict[str, Any]:
    """Per uid: events pending, and events held back or refused overloaded, by reason
    (rate_limit, share, buffer). Only uids with some figure are listed."""
    stats = source.stats
    by_uid: dict[int, dict[str, Any]] = {}

    def of(uid: int) -> dict[str, Any]:
        return by_uid.setdefault(uid, {"pending": 0, "held": {}, "refused": {}})

    for uid, count in stats.pending_by_uid.items():
        of(uid)["pending"] = count
    for kind, counter in (("held", stats.held_events), ("refused", stats.refused_events)):
        for (uid, reason), count in counter.items():
            of(uid)[kind][reason] = count
    return {"rate_limit": source.config.ingest.rate_limit or None,
            # JSON object keys are strings; uid stays a decimal string.
            "by_uid": {str(uid): by_uid[uid] for uid in sorted(by_uid)}}


def stats_document(source: StatusSource, sampler: RateSampler | None) -> dict[str, Any]:
    stats, gauges = source.stats, source.gauges()
    return {
        "accepted": stats.accepted,
        "committed": stats.committed,
        "rejected": stats.rejected,
        "duplicates": stats.duplicates,
        "dead_letters": stats.dead_letters,
        "dead_letters_dropped": stats.dead_letters_dropped,
        "dead_letters_dropped_by_reason": {
            reason: stats.dead_letters_dropped_by_reason[reason] for reason in DROP_REASONS},
        "dead_letters_by_reason": dict(sorted(stats.dead_letters_by_reason.items())),
        "frames": stats.frames,
        "commit_failures": stats.commit_failures,
        "pending": gauges.pending,
        "pending_bytes": gauges.pending_bytes,
        "buffer_capacity": gauges.buffer_capacity,
        "oldest_pending_age_s": round(gauges.oldest_pending_age_s, 3),
        "connections": stats.connections,
        "connections_total": stats.connections_total,
        "held_connections": gauges.held_connections,
        # JSON object keys are strings; uid stays a decimal string.
        "connections_by_uid": {str(uid): n for uid, n in sorted(stats.connections_by_uid.items())},
        "last_seq": gauges.last_seq,
        "last_committed_seq": stats.last_committed_seq,
        "seconds_since_commit": round(max(0.0, time.monotonic() - stats.last_commit_at), 3),
        "commit_latency_ms": latency(stats.commit_latency_ms),
        "reply_latency_ms": latency(stats.reply_latency_ms),
        "batch_size": latency(stats.batch_size),
        "journal_bytes": gauges.journal_bytes,
        "db_bytes": gauges.db_bytes,
        "dlq_bytes": gauges.dlq_bytes,
        "dlq_entries": gauges.dlq_entries,
        "disk_free_bytes": gauges.disk_free_bytes,
        "replay": {"done": stats.replay_done, "total": stats.replay_total,
                   "finished": stats.replay_finished},
        "fairness": fairness_document(source),
        "partitions": gauges.partitions,
        "projections": gauges.projections,
        "checkpoint": gauges.checkpoint,
        "retention": gauges.retention,
        **({"forward": gauges.forward} if gauges.forward is not None else {}),
        "id_lookup": {"failures": stats.id_lookup_failures,
                      "refused_frames": stats.id_lookup_refused_frames,
                      "fault": gauges.id_lookup_fault},
        "follow": source.feed.figures(),
        "query": source.events.figures(),
        "rates": sampler.rates() if sampler is not None else None,
        "uptime_s": round(time.time() - stats.started_at, 3),
        "started_at": stats.started_at,
    }
