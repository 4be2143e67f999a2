"""`auditd bench --soak N`: fill a throw-away daemon's store to N events through its
socket, and see whether ingest stays flat and the store stays small.

`--clients` processes (default 4) send `--batch`-event frames (default 1000) of the
realistic events of `soak_events` (issue 12's cardinalities), made as they are sent,
so N can be 50 million in bounded memory. Progress is what the daemon reports
*committed* in /stats, not what it acknowledged (`soak_progress`). Reported: the
committed rate of every `interval` events (500k), of the first and the last two
intervals (1M) and their ratio (only when they do not overlap, N >= 2M), the
sustained rate over all N, bytes per event on disk (allocated blocks, as `du` counts
them, of everything under the daemon's storage directory, taken as the last event is
committed), and the daemon's peak RSS (and its child processes', sampled).

`--baseline` then inserts the same N events (same seed) with stdlib sqlite3 into
today's single-table layout, as migrations 1-2 build it, in batches of the same size,
with the same figures. Its time is that of the inserts and commits, not of making
and decoding the events (which the daemon's clients do in processes of their own).

`--soak-interval` sets the interval, so that a short soak (a test's small N) still
sees several intervals.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from msgspec import Raw

from auditd.bench.clients import ClientSpec, drive, run_clients
from auditd.bench.daemon import ThrowawayDaemon, cpu_seconds, peak_rss_mb
from auditd.bench.micro import name_inserter, percentile
from auditd.bench.soak_events import MAX_EVENT_BYTES, ClientFrames, SoakEvents, client_events
from auditd.bench.soak_progress import CommitProgress, Progress, Timeline, disk_usage
from auditd.config import Config
from auditd.errors import ConfigError
from auditd.logs import configure_logging
from auditd.schema import encoder, id_hash, raw_list_decoder, wire_decoder
from auditd.store.connection import connect_sync
from auditd.store.migrations import migrate
from auditd.store.statements import transaction
from auditd.store.store import DB_NAME

INTERVAL = 500_000
_WINDOW_EVENTS = 8192  # events in flight per client when --window is not given


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--soak", type=int, metavar="N",
        help="only the soak: fill a throw-away daemon's store to N realistic events "
        "through its socket (--clients, --batch default 1000); committed rate per 500k, "
        "bytes/event on disk, peak RSS; with --baseline also stdlib sqlite3 into "
        "today's single-table layout")
    add("--soak-interval", type=int, default=INTERVAL, metavar="EVENTS",
        help=f"with --soak: events per reported interval (default {INTERVAL:,}); "
        "smaller gives more intervals for a short soak")


@dataclass(frozen=True)
class SoakPlan:
    seed: int
    clients: int
    events: int


def soak_client(plan: SoakPlan, spec: ClientSpec, go: Any, results: Any) -> None:
    """One soak client: connect, say ready, wait for go, send its batches as made."""
    try:
        frames = ClientFrames(spec.first // spec.batch, plan.clients, spec.batch,
                              plan.events, plan.seed)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(spec.socket)
            results.put(("ready", None))
            go.wait()
            sock.setblocking(False)
            cpu = time.process_time()
            done = drive(sock, frames, spec)
            results.put(("done", {**done, "cpu_s": time.process_time() - cpu}))
    except Exception as exc:  # the parent fails the run with this message
        results.put(("failed", f"soak client: {exc!r}"))


def _check(args: argparse.Namespace, config: Config) -> None:
    """Usage errors, found before anything starts."""
    if args.soak <= 0:
        raise ConfigError(f"--soak {args.soak}: expected a positive number of events")
    if args.socket:
        raise ConfigError("--soak fills a throw-away daemon of its own: drop --socket")
    for flag in ("rate", "duration"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--soak sends as fast as the daemon commits: drop --{flag}")
    for flag in ("ring", "replay", "fair", "fuzz"):
        if getattr(args, flag) not in (None, False):
            raise ConfigError(f"--soak runs alone: drop --{flag}")
    for flag in ("clients", "batch", "window", "capacity", "soak_interval"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} {value}: expected a positive number")
    if args.batch > config.ingest.max_batch_events:
        raise ConfigError(f"--batch {args.batch}: over ingest.max_batch_events "
                          f"({config.ingest.max_batch_events})")
    max_frame = config.size("ingest", "max_frame_bytes")
    if args.batch * MAX_EVENT_BYTES > max_frame:
        raise ConfigError(f"--batch {args.batch}: a frame of that many soak events (up to "
                          f"{MAX_EVENT_BYTES} bytes each) may exceed ingest.max_frame_bytes "
                          f"({max_frame})")


def run_soak(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    _check(args, config)
    if not sys.stderr.isatty():  # progress as JSON lines on stderr; stdout is the report
        configure_logging(config.log.level, "json")
    total, interval = args.soak, args.soak_interval
    seed = args.seed if args.seed is not None else 0
    load_before = os.getloadavg()
    doc: dict[str, Any] = {"events": total, "seed": seed, "clients": args.clients,
                           "batch": args.batch, "interval": interval,
                           "durability": args.durability,
                           "capacity": args.capacity or config.buffer.capacity}
    doc["daemon"] = _run_daemon(args, config, SoakPlan(seed, args.clients, total), interval)
    if args.baseline:
        doc["baseline"] = run_baseline(total, args.batch, seed, interval)
        doc["ratios"] = _ratios(doc["daemon"], doc["baseline"])
    doc["loadavg"] = {"before": [round(x, 2) for x in load_before],
                      "after": [round(x, 2) for x in os.getloadavg()]}
    return doc


def _run_daemon(args: argparse.Namespace, config: Config, plan: SoakPlan,
                interval: int) -> dict[str, Any]:
    window = args.window or max(1, _WINDOW_EVENTS // args.batch)
    with ThrowawayDaemon(config, args.durability, args.capacity) as daemon:
        assert daemon.proc is not None  # entered
        pid = daemon.proc.pid
        specs = [ClientSpec(daemon.socket, k * args.batch, n, args.batch, window, 0.0, None)
                 for k in range(plan.clients)
                 if (n := client_events(k, plan.clients, args.batch, plan.events))]
        progress = Progress("daemon", plan.events, interval)
        watcher = CommitProgress(daemon.status_socket, pid, progress)
        watcher.start()
        cpu_before = cpu_seconds(pid)
        try:
            results = run_clients(specs, partial(soak_client, plan), watcher.begin)
        except BaseException:
            watcher.stopped.set()
            watcher.started.set()
            raise
        tally: Counter[str] = Counter()
        for result in results:
            tally.update(result["tally"])
        watcher.wait_for(tally["ok"])
        progress.close()
        cpu_after = cpu_seconds(pid)
        disk = disk_usage(daemon.db_path.parent)
        peak = peak_rss_mb(pid)
    latencies = [ms for r in results for ms in r["latencies"]]
    committed = watcher.timeline.counts[-1]
    return {
        "events_sent": sum(r["sent"] for r in results), "events_acknowledged": tally["ok"],
        "events_rejected": tally["rejected"], "duplicates": tally["duplicates"],
        "frame_errors": {k[6:]: n for k, n in tally.items() if k.startswith("error:")},
        "events_committed": committed, **watcher.timeline.summary(interval),
        "disk_bytes": sum(disk.values()), "disk": disk,
        "bytes_per_event": round(sum(disk.values()) / committed, 1) if committed else None,
        "peak_rss_mb": peak, "child_peak_rss_mb": watcher.child_peak_mb,
        "daemon_cpu_s": None if cpu_after is None or cpu_before is None
        else round(cpu_after - cpu_before, 1),
        "clients_cpu_s": round(sum(r["cpu_s"] for r in results), 1),
        "reply_latency_ms": {name: round(percentile(latencies, q), 1) if latencies else None
                             for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
    }


# Migrations 1-2 build today's single-table layout (one `events` table, seven
# indexes); later versions are not it. The INSERT is schema 1's own, for the same
# reason: the store's statements follow the store's layout, this must not.
SINGLE_TABLE_VERSION = 2
_INSERT = ("INSERT INTO events (seq, id, id_hash, ts, received_at, type, actor, target,"
           " stream, stream_seq, correlation_id, causation_id, tags, data, pid, uid, gid,"
           f" comm) VALUES ({', '.join('?' * 18)})")


def run_baseline(total: int, batch: int, seed: int, interval: int) -> dict[str, Any]:
    """The same events with stdlib sqlite3 into today's layout, `batch` rows a
    transaction, named and stamped as the daemon's store does it."""
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="adsoak"))
    progress = Progress("baseline", total, interval)
    try:
        conn = connect_sync(root / DB_NAME)
        migrate(conn, SINGLE_TABLE_VERSION)
        name_id = name_inserter(conn)

        source, versions = SoakEvents(seed), Counter[str]()
        timeline, spent = Timeline(), 0.0
        timeline.add(0.0, 0)
        for start in range(0, total, batch):
            body = encoder.encode(source.events(start, min(total, start + batch)))
            events = _decoded(start + 1, body, versions)
            began = time.perf_counter()  # the inserts and the commit, as the daemon's writer
            with transaction(conn):
                conn.executemany(_INSERT, [_row(event, name_id) for event in events])
            spent += time.perf_counter() - began
            timeline.add(spent, start + len(events))
            progress.update(timeline)
        progress.close()
        disk = disk_usage(root)  # live, WAL included, as the daemon's is measured
        rows = int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
        indexes = [row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events' "
            "AND sql IS NOT NULL ORDER BY name")]
        conn.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"rows": rows, "indexes": indexes, **timeline.summary(interval),
            "disk_bytes": sum(disk.values()), "disk": disk,
            "bytes_per_event": round(sum(disk.values()) / rows, 1) if rows else None}


class _Stamped(NamedTuple):
    """An event as the daemon's sequencer stamps it, before its strings are named."""

    seq: int
    id: str
    received_at: int
    type: str
    actor: str | None
    target: str | None
    stream: str
    stream_seq: int
    correlation_id: str | None
    causation_id: str | None
    tags: bytes
    data: bytes
    key: int  # schema.id_hash(id), computed at acceptance


def _decoded(first_seq: int, body: bytes, versions: Counter[str]) -> list[_Stamped]:
    """A batch decoded as the daemon decodes it, and stamped with seq, receive time
    and stream version as its sequencer does."""
    received_at = time.time_ns()
    events = []
    for seq, raw in enumerate(raw_list_decoder.decode(body), start=first_seq):
        wire = wire_decoder.decode(bytes(raw))
        assert wire.id and wire.stream and wire.tags and isinstance(wire.data, Raw)  # all have
        versions[wire.stream] += 1
        events.append(_Stamped(
            seq, wire.id, received_at, wire.type, wire.actor, wire.target, wire.stream,
            versions[wire.stream], wire.correlation_id, wire.causation_id,
            encoder.encode(wire.tags), bytes(wire.data), id_hash(wire.id)))
    return events


_PEER = (os.getpid(), os.getuid(), os.getgid())


def _row(e: _Stamped, name_id: Callable[[str], int]) -> tuple[Any, ...]:
    """Schema 1's row; strings that repeat (type, actor, target, stream, comm) by id."""
    return (e.seq, e.id, e.key, e.received_at, e.received_at, name_id(e.type),
            None if e.actor is None else name_id(e.actor),
            None if e.target is None else name_id(e.target), name_id(e.stream),
            e.stream_seq, e.correlation_id, e.causation_id, e.tags, e.data, *_PEER,
            name_id("python"))


def _ratios(daemon: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float | None]:
    """daemon / baseline, for each figure both have."""
    return {key: round(daemon[key] / baseline[key], 3) if daemon[key] and baseline[key]
            else None
            for key in ("sustained_per_s", "first_window_per_s", "last_window_per_s",
                        "bytes_per_event")}


def print_report(doc: dict[str, Any]) -> None:
    """The figures as `name  value` lines, then the intervals side by side."""
    from auditd.bench import print_human

    print_human({key: {k: v for k, v in value.items() if k != "intervals"}
                 if key in ("daemon", "baseline") else value for key, value in doc.items()})
    baseline = {row["through"]: row["per_s"]
                for row in doc.get("baseline", {}).get("intervals", [])}
    print(f"{'through':>12} {'daemon/s':>12}" + (f" {'baseline/s':>12}" if baseline else ""))
    for row in doc["daemon"]["intervals"]:
        other = baseline.get(row["through"])
        print(f"{row['through']:>12,} {row['per_s'] or 0:>12,.0f}"
              + (f" {other or 0:>12,.0f}" if baseline else ""))
