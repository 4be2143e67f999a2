"""`auditd bench --soak N`: fill a throw-away daemon's store to N events through its
socket, and see whether ingest stays flat and the store stays small.

`--clients` processes (default 4) send `--batch`-event frames (default 1000) of the
realistic events of `soak_events` (issue 12's cardinalities), made as they are sent,
so N can be 50 million in bounded memory. Progress is what the daemon reports
*committed* in /stats (not what it acknowledged), polled ten times a second; the
moment each count was reached is interpolated between polls. Reported: the committed
rate of every `interval` events (500k), of the first and the last two intervals (1M)
and their ratio, the sustained rate over all N, bytes per event on disk (allocated
blocks, as `du` counts them, of everything under the daemon's storage directory),
and the daemon's peak RSS (and its child processes', sampled).

`--baseline` then inserts the same N events (same seed) with stdlib sqlite3 into
today's single-table layout, exactly as the migrations build it, in batches of the
same size, with the same figures. Its time is that of the inserts and commits, not of
making the events (which the daemon's clients do in processes of their own).

The interval is a hidden option (`--soak-interval`), so that a test with a small N
still sees several intervals.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import structlog
from msgspec import Raw

from auditd.bench.clients import ClientSpec, drive, run_clients
from auditd.bench.daemon import ThrowawayDaemon, cpu_seconds, peak_rss_mb
from auditd.bench.micro import percentile
from auditd.bench.soak_events import MAX_EVENT_BYTES, ClientFrames, SoakEvents, client_events
from auditd.config import Config
from auditd.errors import AuditdError, ConfigError
from auditd.logs import configure_logging
from auditd.schema import StoredEvent, encoder, id_hash, raw_list_decoder, wire_decoder
from auditd.store.migrations import migrate
from auditd.store.statements import EVENTS, event_row, transaction
from auditd.store.store import DB_NAME, connect_sync

log = structlog.get_logger("auditd.bench.soak")

INTERVAL = 500_000
_POLL_S = 0.1
_STALL_S = 120.0  # committed stopped growing this long: the daemon will not catch up
_WINDOW_EVENTS = 8192  # events in flight per client when --window is not given


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--soak", type=int, metavar="N",
        help="only the soak: fill a throw-away daemon's store to N realistic events "
        "through its socket (--clients, --batch default 1000); committed rate per 500k, "
        "bytes/event on disk, peak RSS; with --baseline also stdlib sqlite3 into "
        "today's single-table layout")
    add("--soak-interval", type=int, default=INTERVAL, help=argparse.SUPPRESS)


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
            "last_to_first": round(last / first, 3) if first and last else None,
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
        done = timeline.counts[-1]
        mark = done // self.interval * self.interval
        if mark <= self.reported:
            return
        per_s, overall = timeline.rate(self.reported, mark), timeline.rate(0, mark)
        self.reported = mark
        if self.tty:
            sys.stderr.write(f"\r{self.phase}: {mark:,} of {self.total:,} committed, last "
                             f"{self.interval:,} at {per_s or 0:,.0f}/s, all at "
                             f"{overall or 0:,.0f}/s\x1b[K")
            sys.stderr.flush()
        else:
            log.info("soak_interval_committed", phase=self.phase, events=mark,
                     of=self.total, per_s=per_s, overall_per_s=overall)

    def close(self) -> None:
        if self.tty and self.reported:
            sys.stderr.write("\n")


class _StatusConnection(http.client.HTTPConnection):
    """HTTP on the daemon's status socket (kept alive between polls)."""

    def __init__(self, path: str) -> None:
        super().__init__("auditd", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class CommitProgress(threading.Thread):
    """Polls /stats `committed` into a Timeline from `begin()` on, and the peak RSS of
    the daemon's children (a sealer, an fsync helper) as it goes."""

    def __init__(self, status_socket: str, pid: int, progress: Progress) -> None:
        super().__init__(daemon=True)
        self.conn = _StatusConnection(status_socket)
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
        watcher = CommitProgress(str(daemon.root / "status.sock"), pid, progress)
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


def run_baseline(total: int, batch: int, seed: int, interval: int) -> dict[str, Any]:
    """The same events with stdlib sqlite3 into today's layout, `batch` rows a
    transaction; as the daemon's store names strings and stamps its fields."""
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="adsoak"))
    progress = Progress("baseline", total, interval)
    try:
        conn = connect_sync(root / DB_NAME)
        migrate(conn)
        names: dict[str, int] = {}

        def name_id(value: str) -> int:
            found = names.get(value)
            if found is None:
                found = names[value] = int(conn.execute(
                    "INSERT INTO names (value) VALUES (?) RETURNING id", (value,)
                ).fetchone()[0])
            return found

        source, versions = SoakEvents(seed), Counter[str]()
        peer = (os.getpid(), os.getuid(), os.getgid(), "python")
        timeline, spent = Timeline(), 0.0
        timeline.add(0.0, 0)
        for start in range(0, total, batch):
            body = encoder.encode(source.events(start, min(total, start + batch)))
            stored = _stored(start + 1, body, versions, peer)
            began = time.perf_counter()
            with transaction(conn):
                conn.executemany(EVENTS.one(), [event_row(e, name_id) for e in stored])
            spent += time.perf_counter() - began
            timeline.add(spent, start + len(stored))
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


def _stored(first_seq: int, body: bytes, versions: Counter[str],
            peer: tuple[int, int, int, str]) -> list[StoredEvent]:
    """A batch's events as the daemon's sequencer stores them, decoded as it decodes."""
    received_at = time.time_ns()
    events = []
    for seq, raw in enumerate(raw_list_decoder.decode(body), start=first_seq):
        wire = wire_decoder.decode(bytes(raw))
        assert wire.id and wire.stream and wire.tags and isinstance(wire.data, Raw)  # all have
        versions[wire.stream] += 1
        events.append(StoredEvent(
            seq, wire.id, received_at, received_at, wire.type, wire.actor, wire.target,
            wire.stream, versions[wire.stream], wire.correlation_id, wire.causation_id,
            encoder.encode(wire.tags), bytes(wire.data), *peer, id_hash(wire.id)))
    return events


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
