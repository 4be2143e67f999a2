"""Prometheus exposition of the same figures /stats shows, via a custom Collector.

The collector reads `Stats` and a `Gauges` snapshot at scrape time, so the hot path
never touches prometheus_client objects. It lives in a private CollectorRegistry:
the default global registry would leak between daemons in one test process.
Units follow Prometheus conventions: seconds and bytes, counters end in `_total`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from auditd.stats import DROP_REASONS, Histogram, Stats
from auditd.status.health import evaluate, inputs_from
from auditd.status.source import StatusSource


class AuditdCollector:
    """Builds every `auditd_*` family from the source on each scrape."""

    def __init__(self, source: StatusSource) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        stats, gauges = self.source.stats, self.source.gauges()

        yield counter("auditd_events_accepted", "Events accepted and journaled.",
                      stats.accepted)
        yield counter("auditd_events_committed", "Events committed to the database.",
                      stats.committed)
        yield counter("auditd_events_rejected", "Events refused at ingest.", stats.rejected)
        yield counter("auditd_events_duplicate",
                      "Events acknowledged as duplicates of a stored id.", stats.duplicates)
        yield counter("auditd_frames", "Protocol frames answered.", stats.frames)
        yield counter("auditd_id_lookup_failures",
                      "Database id lookups that failed (each attempt).",
                      stats.id_lookup_failures)
        yield counter("auditd_id_lookup_refused_frames",
                      "Frames answered overloaded because their id lookup kept failing.",
                      stats.id_lookup_refused_frames)
        yield counter("auditd_commit_failures",
                      "Commit attempts that failed and were retried.", stats.commit_failures)
        yield counter("auditd_connections_accepted",
                      "Ingest connections accepted since start.", stats.connections_total)
        by_reason = CounterMetricFamily(
            "auditd_dead_letters", "Entries written to the dead-letter store, by reason.",
            labels=["reason"])
        for reason, count in sorted(stats.dead_letters_by_reason.items()):
            by_reason.add_metric([reason], count)
        yield by_reason
        dropped = CounterMetricFamily(
            "auditd_dead_letters_dropped",
            "Dead-letter entries deleted unresolved, by reason: quota (the oldest ingest "
            "rejects over storage.dlq_max_bytes) or operator (POST /dlq/drop).",
            labels=["reason"])
        for reason in DROP_REASONS:  # both always: a rate over an absent series is empty
            dropped.add_metric([reason], stats.dead_letters_dropped_by_reason[reason])
        yield dropped

        yield gauge("auditd_connections_open", "Ingest connections open now.",
                    stats.connections)
        by_uid = GaugeMetricFamily("auditd_connections_open_by_uid",
                                   "Ingest connections open now, by peer uid.",
                                   labels=["uid"])
        for uid, count in sorted(stats.connections_by_uid.items()):
            by_uid.add_metric([str(uid)], count)
        yield by_uid
        yield gauge("auditd_pending_events", "Events accepted but not yet committed.",
                    gauges.pending)
        yield from _fairness_families(stats)
        yield gauge("auditd_pending_bytes", "Encoded size of the pending events.",
                    gauges.pending_bytes)
        yield gauge("auditd_buffer_capacity_events",
                    "Events the buffer between ingest and the writer holds.",
                    gauges.buffer_capacity)
        yield gauge("auditd_last_seq", "Highest sequence number assigned.", gauges.last_seq)
        yield gauge("auditd_last_committed_seq", "Highest sequence number committed.",
                    stats.last_committed_seq)
        yield gauge("auditd_oldest_pending_age_seconds",
                    "Age of the oldest event not yet committed.",
                    gauges.oldest_pending_age_s)
        yield gauge("auditd_journal_bytes", "Size of the journal segments.",
                    gauges.journal_bytes)
        yield gauge("auditd_database_bytes", "Size of the database and its WAL.",
                    gauges.db_bytes)
        partitions = gauges.partitions
        if partitions:
            yield gauge("auditd_partitions", "Sealed partitions in the store.",
                        partitions["count"])
            yield gauge("auditd_hot_events",
                        "Committed events not yet sealed (the hot table).",
                        partitions["hot_events"])
            yield gauge("auditd_sealed_through_seq", "Highest seq held by a sealed partition.",
                        partitions["sealed_through"])
            yield counter("auditd_partitions_sealed", "Partitions sealed since start.",
                          partitions["sealed_since_start"])
        if gauges.projections:
            yield from _projection_families(gauges.projections)
        if gauges.forward is not None:
            yield from _forward_families(gauges.forward)
        yield gauge("auditd_dead_letter_store_bytes", "Bytes held in the dead-letter store.",
                    gauges.dlq_bytes)
        yield gauge("auditd_dead_letter_store_entries", "Entries in the dead-letter store.",
                    gauges.dlq_entries)
        if gauges.disk_free_bytes >= 0:  # absent beats a fake zero that would page someone
            yield gauge("auditd_disk_free_bytes", "Bytes free on the storage volume.",
                        gauges.disk_free_bytes)
        yield gauge("auditd_start_time_seconds", "Start time since the Unix epoch.",
                    stats.started_at)
        yield gauge("auditd_replay_done_events",
                    "Journal records (events and damaged stretches' seqs) replayed so far.",
                    stats.replay_done)
        yield gauge("auditd_replay_total_events",
                    "Journal records past the commit checkpoint at start, from the "
                    "journal's seq range (0 before the journal is read).",
                    stats.replay_total)
        yield gauge("auditd_replay_finished", "1 once journal replay has finished.",
                    1 if stats.replay_finished else 0)
        yield from _health_families(self.source)

        yield _histogram("auditd_commit_latency_seconds",
                         "Time to commit one batch.", stats.commit_latency_ms, 1000.0)
        yield _histogram("auditd_reply_latency_seconds",
                         "Time from a frame's arrival to its reply.", stats.reply_latency_ms,
                         1000.0)
        yield _histogram("auditd_commit_batch_events", "Events per committed batch.",
                         stats.batch_size, 1.0)


def _projection_families(projections: dict[str, Any]) -> Iterator[Metric]:
    position = GaugeMetricFamily("auditd_projection_position_seq",
                                 "Last seq a projection has counted.", labels=["projection"])
    lag = GaugeMetricFamily("auditd_projection_lag_events",
                            "Seqs committed (or left to rebuild) past a projection's position.",
                            labels=["projection"])
    rebuilding = GaugeMetricFamily("auditd_projection_rebuilding",
                                   "1 while a projection is being rebuilt.",
                                   labels=["projection"])
    for name, entry in sorted(projections.items()):
        position.add_metric([name], entry["position"])
        lag.add_metric([name], entry["lag"])
        rebuilding.add_metric([name], 1 if entry["state"] == "rebuilding" else 0)
    yield from (position, lag, rebuilding)


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _forward_families(forward: dict[str, Any]) -> Iterator[Metric]:
    """Forwarding to NATS JetStream (the /stats `forward` object)."""
    yield gauge("auditd_forward_cursor_seq", "Highest seq the stream acknowledged, with "
                "every seq below it.", forward["cursor"])
    yield gauge("auditd_forward_lag_events", "Committed seqs not yet forwarded.",
                forward["lag_events"])
    yield gauge("auditd_forward_lag_seconds", "Age of the oldest unforwarded commit.",
                forward["lag_seconds"])
    yield counter("auditd_forward_published", "Messages the stream stored as new.",
                  forward["published"])
    yield counter("auditd_forward_duplicates", "Messages the stream acknowledged as "
                  "already held (resends absorbed by its dedupe).", forward["duplicates"])
    yield counter("auditd_forward_checkpoints", "Checkpoint messages acknowledged.",
                  forward["checkpoints"])
    errors = CounterMetricFamily("auditd_forward_errors", "Forwarding failures, by kind.",
                                 labels=["kind"])
    for kind, count in forward["errors"].items():
        errors.add_metric([kind], count)
    yield errors
    yield gauge("auditd_forward_in_flight_messages", "Messages published and not yet "
                "acknowledged.", forward["in_flight"])
    yield gauge("auditd_forward_connected", "1 while connected to a NATS server.",
                1 if forward["connected"] else 0)
    yield counter("auditd_forward_reconnects", "Reconnections to NATS.", forward["reconnects"])
    if forward["last_success"] is not None:
        yield gauge("auditd_forward_last_success_timestamp_seconds",
                    "When a step of messages was last acknowledged.", forward["last_success"])


def _fairness_families(stats: Stats) -> Iterator[Metric]:
    """Per uid: pending events, and events held back or refused by reason."""
    pending = GaugeMetricFamily("auditd_pending_events_by_uid",
                                "Events accepted but not yet committed, by writer uid.",
                                labels=["uid"])
    for uid, count in sorted(stats.pending_by_uid.items()):
        pending.add_metric([str(uid)], count)
    yield pending
    for kind, counter, doc in (
            ("held", stats.held_events, "Events of frames held back (overflow block), "
             "by writer uid and reason: rate_limit, share or buffer."),
            ("refused", stats.refused_events, "Events of frames answered overloaded "
             "(overflow reject), by writer uid and reason: rate_limit, share or buffer.")):
        family = CounterMetricFamily(f"auditd_events_{kind}", doc, labels=["uid", "reason"])
        for (uid, reason), count in sorted(counter.items()):
            family.add_metric([str(uid), reason], count)
        yield family


def _health_families(source: StatusSource) -> Iterator[Metric]:
    health = evaluate(inputs_from(source))
    checks = GaugeMetricFamily("auditd_health_check_ok",
                               "1 when the named health check passes.", labels=["check"])
    for name, check in health.checks.items():
        checks.add_metric([name], 1 if check.ok else 0)
    yield checks
    # One series per state, 1 for the current one: alert rules need no string match.
    status = GaugeMetricFamily("auditd_health_status", "1 for the current health status.",
                               labels=["status"])
    for state in ("ok", "degraded", "failing"):
        status.add_metric([state], 1 if health.status == state else 0)
    yield status


def _histogram(name: str, doc: str, source: Histogram, divisor: float) -> HistogramMetricFamily:
    """Stats keeps a count per bucket; Prometheus wants cumulative counts per bound.

    Bounds are divided (ms -> s), not multiplied by 0.001, so 0.1 ms stays "0.0001"
    rather than a float artifact in the `le` label.
    """
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(source.bounds, source.counts, strict=False):
        running += count
        buckets.append((repr(float(bound) / divisor), running))
    buckets.append(("+Inf", source.count))
    return HistogramMetricFamily(name, doc, buckets=buckets,
                                 sum_value=source.total / divisor)


class MetricsExposition:
    """A private registry holding the auditd collector and the process collector."""

    def __init__(self, source: StatusSource) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(AuditdCollector(source))
        # Memory, CPU and open fds of the daemon; Linux-only, as auditd is.
        ProcessCollector(registry=self.registry)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition body and its Content-Type, negotiated from the Accept header."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
