"""`auditd bench --retention-soak`: a throw-away daemon held at `retention.max_bytes`
(`--max-bytes`, default 200MB) under a paced load (`--rate`, default 5,000 events/s,
for `--duration` s, default 600), to see that retention keeps disk use under the
limit without costing ingest its latency (issue 15's soak bar).

With `--prefill N`, N events are flooded in first with retention off (committed,
sealed and checkpointed), and retention is turned on 2 s into the paced load
(`--retention-by bytes`, the default: `--max-bytes`; `age`: max_age 1 s, so every sealed
partition goes): the paced clients' latency is then that of ingest while retention
deletes the prefill (issue 15's "deleting 1,000,000 old events under 5,000 events/s").

Clients send the soak's realistic events (`soak_events`, made as they are sent) in
`--batch`-event frames (default 50) at the offered rate. Every second the bench
samples disk use (allocated blocks of everything under the daemon's storage, as
retention counts it) and retention's /stats figures. Reported: the offered, acknowledged
and committed events; reply latency p50/p99/max over the run; disk use at its peak,
its peak once retention first deleted (before that the store is filling), the seconds
sampled over the limit, and at the end; what retention deleted; the daemon's peak RSS.
Retention runs every 5 s here (the deployment default is 60 s), so the store overshoots
the limit by at most about five seconds of ingest; journal segments are 8 MB (the
default 64 MB alone would take a third of a 200 MB budget).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import threading
import time
from collections import Counter
from functools import partial
from typing import Any

from auditd.bench.clients import ClientSpec, run_clients
from auditd.bench.daemon import CommitWatcher, ThrowawayDaemon, peak_rss_mb
from auditd.bench.micro import percentile
from auditd.bench.soak import SoakPlan, soak_client
from auditd.bench.soak_events import client_events
from auditd.bench.soak_progress import disk_usage
from auditd.cli.operator import UnixHTTPConnection
from auditd.config import Config, parse_size
from auditd.errors import AuditdError, ConfigError

_RATE = 5000.0
_DURATION_S = 600.0
_BATCH = 50
_SAMPLE_S = 1.0
_RETENTION_EVERY = "5s"
_JOURNAL_SEGMENT = "8MB"
_PREFILL_BATCH = 1000
_PREFILL_TIMEOUT_S = 1800.0
_TURN_ON_AFTER_S = 2.0  # into the paced load, retention is turned on (with --prefill)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--retention-soak", action="store_true",
        help="only the retention soak: a throw-away daemon held at --max-bytes under "
        "--rate events/s (default 5000) for --duration s (default 600): disk use against "
        "the limit, reply latency, what retention deleted")
    parser.add_argument("--max-bytes", default="200MB", metavar="SIZE",
                        help="with --retention-soak: retention.max_bytes (default 200MB)")
    parser.add_argument("--prefill", type=int, metavar="N",
                        help="with --retention-soak: first flood N old events in (retention "
                             "off), then turn retention on 2 s into the paced load: how "
                             "ingest fares while it deletes them")
    parser.add_argument("--retention-by", choices=("bytes", "age"), default="bytes",
                        help="with --retention-soak: hold the store at --max-bytes "
                             "(default), or delete by age (max_age 1s: every sealed "
                             "partition of the prefill goes)")


class Sampler(threading.Thread):
    """Disk use and retention's figures, once a second, until stopped."""

    def __init__(self, bench_daemon: ThrowawayDaemon, limit: int) -> None:
        super().__init__(daemon=True)
        self.bench_daemon, self.limit = bench_daemon, limit
        self.disk: list[tuple[float, int]] = []
        self.first_drop_at: float | None = None
        self.retention: dict[str, Any] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        conn = UnixHTTPConnection(self.bench_daemon.status_socket, timeout=10)
        try:
            while not self.stopped.wait(_SAMPLE_S):
                now = time.monotonic()
                self.disk.append((now, sum(disk_usage(self.bench_daemon.db_path.parent).values())))
                with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
                    conn.request("GET", "/stats")
                    self.retention = json.loads(conn.getresponse().read())["retention"]
                    if self.first_drop_at is None and self.retention["dropped_partitions"]:
                        self.first_drop_at = now
        finally:
            conn.close()

    def figures(self) -> dict[str, Any]:
        after = [b for at, b in self.disk if self.first_drop_at and at >= self.first_drop_at]
        return {"max_bytes": self.limit,
                "disk_peak": max((b for _, b in self.disk), default=None),
                "disk_peak_once_retention_began": max(after, default=None),
                "seconds_over_max_bytes": sum(_SAMPLE_S for _, b in self.disk if b > self.limit),
                "disk_at_end": self.disk[-1][1] if self.disk else None,
                "retention": {k: self.retention.get(k) for k in (
                    "dropped_partitions", "dropped_events", "runs", "fault",
                    "over_max_bytes", "pruned_through")}}


def _check(args: argparse.Namespace) -> None:
    if args.socket:
        raise ConfigError("--retention-soak starts the daemon it measures: drop --socket")
    for flag in ("rate", "duration", "batch", "clients", "prefill"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ConfigError(f"--{flag} {value}: expected a positive number")


def _prefill(daemon: ThrowawayDaemon, args: argparse.Namespace, events: int) -> float:
    """Flood `events` old events in, until they are committed, sealed and checkpointed
    (retention is off meanwhile); the seconds it took."""
    started = time.monotonic()
    plan = SoakPlan((args.seed or 0) + 1, args.clients, events)
    specs = [ClientSpec(daemon.socket, k * _PREFILL_BATCH, n, _PREFILL_BATCH, 8, 0.0, None)
             for k in range(args.clients)
             if (n := client_events(k, args.clients, _PREFILL_BATCH, events))]
    watcher = CommitWatcher(daemon.db_path)
    watcher.start()
    run_clients(specs, partial(soak_client, plan))
    watcher.wait_for(events)
    partition = daemon.sections["storage"]["partition_events"]
    sealed = events // partition * partition
    conn = UnixHTTPConnection(daemon.status_socket, timeout=10)
    try:
        while True:
            conn.request("GET", "/stats")
            stats = json.loads(conn.getresponse().read())
            checkpoint = stats.get("checkpoint") or {}
            if stats["partitions"]["sealed_through"] >= sealed \
                    and checkpoint.get("size", 0) >= sealed:
                break
            if time.monotonic() - started > _PREFILL_TIMEOUT_S:
                raise AuditdError(f"the prefill was not sealed through {sealed} in "
                                  f"{_PREFILL_TIMEOUT_S:.0f}s")
            time.sleep(0.2)
    finally:
        conn.close()
    return time.monotonic() - started


def run_retention_soak(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    _check(args)
    rate = args.rate or _RATE
    duration = args.duration or _DURATION_S
    batch = args.batch if args.batch is not None else _BATCH
    limit = parse_size("--max-bytes", args.max_bytes)
    total = int(rate * duration)
    plan = SoakPlan(args.seed or 0, args.clients, total)
    # With --prefill retention starts off, and is turned on as the paced load starts.
    on = {"max_age": "1s", "max_bytes": "0"} if args.retention_by == "age" else {
        "max_age": "0s", "max_bytes": args.max_bytes}
    extra = {"retention": {**(on if not args.prefill else {"max_age": "0s",
                                                            "max_bytes": "0"}),
                           "interval": _RETENTION_EVERY},
             # A 200 MB budget has no room for the default 64 MB journal segments (the
             # current one grows to its size before it can go): sized as an operator
             # with such a budget would.
             "storage": {"journal_segment_bytes": _JOURNAL_SEGMENT}}
    doc: dict[str, Any] = {"retention_by": args.retention_by, "prefill": args.prefill}
    with ThrowawayDaemon(config, args.durability, args.capacity, extra=extra) as daemon:
        assert daemon.proc is not None
        if args.prefill:
            doc["prefill_seconds"] = round(_prefill(daemon, args, args.prefill), 1)
        gap = batch * args.clients / rate  # between two frames of one client
        specs = [ClientSpec(daemon.socket, k * batch, n, batch, max(1, 4096 // batch), gap,
                            duration)
                 for k in range(args.clients)
                 if (n := client_events(k, args.clients, batch, total))]
        sampler = Sampler(daemon, limit)
        sampler.start()
        turn_on = threading.Timer(_TURN_ON_AFTER_S, daemon.reconfigure, ("retention",), on)
        started = time.monotonic()
        try:
            results = run_clients(specs, partial(soak_client, plan),
                                  turn_on.start if args.prefill else None)
        finally:
            turn_on.cancel()
            sampler.stopped.set()
            sampler.join()
        seconds = time.monotonic() - started
        peak = peak_rss_mb(daemon.proc.pid)
        at_end = disk_usage(daemon.db_path.parent)
    if not sampler.disk:
        raise AuditdError("the retention soak took no disk sample")
    tally: Counter[str] = Counter()
    for result in results:
        tally.update(result["tally"])
    latencies = [ms for r in results for ms in r["latencies"]]
    return {
        **doc, "offered_rate": rate, "duration_s": duration, "batch": batch,
        "clients": args.clients,
        "events_sent": sum(r["sent"] for r in results), "events_acknowledged": tally["ok"],
        "acknowledged_per_s": round(tally["ok"] / seconds, 1),
        "frame_errors": {k[6:]: n for k, n in tally.items() if k.startswith("error:")},
        "reply_latency_ms": {name: round(percentile(latencies, q), 2) if latencies else None
                             for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        **sampler.figures(), "disk_by_entry_at_end": at_end, "peak_rss_mb": peak,
    }
