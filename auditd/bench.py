"""`auditd bench`: load generator, storage baseline and ring micro-benchmark.

The load comes from N client *processes* (spawned, so the daemon competes with real,
separate writers for the CPU as it would in production), each pipelining pre-encoded
frames on one raw socket. Frames are built before the start signal so that the
clients' own encoding does not eat into the daemon's share of a small machine.

Committed events/s counts rows in the database, not replies: a reply only promises
that the event is durable in the journal, and the writer may still be behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import queue
import select
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from auditd.config import Config
from auditd.errors import AuditdError, ConfigError
from auditd.framing import FrameDecoder, encode_frame
from auditd.migrations import migrate
from auditd.ring import RingBuffer
from auditd.schema import StoredEvent, encoder, id_hash, uuid7
from auditd.store import DB_NAME, EVENTS, connect_sync, event_row

_START_TIMEOUT_S = 60.0
_STALL_S = 10.0  # the committed count stopped growing this long ago: stop waiting
_POLL_S = 0.005
_WINDOW_EVENTS = 8192  # events in flight per client when --window is not given
_PEERCRED = struct.Struct("3i")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--socket", help="bench the daemon on this ingest socket (its database is found "
        "through --config's storage.path); default: a throw-away daemon in a temp dir")
    add("--clients", type=int, default=4, help="client processes (default 4)")
    add("--events", type=int, default=200_000, help="events in all (default 200000)")
    add("--batch", type=int, default=100, help="events a frame (default 100)")
    add("--window", type=int, help="frames in flight per client (default: 8192 events)")
    add("--rate", type=float, help="total offered events/s, paced (default: flood)")
    add("--duration", type=float, help="stop sending after this many seconds")
    add("--durability", choices=["write", "fsync"], default="write",
        help="the throw-away daemon's ingest.durability (default write)")
    add("--capacity", type=int, help="the throw-away daemon's buffer.capacity")
    add("--baseline", action="store_true",
        help="also insert the same events straight with sqlite3 and print the ratio")
    add("--ring", action="store_true",
        help="only the RingBuffer micro-benchmark: recent(100) and by_correlation()")
    add("--json", action="store_true", help="print one JSON document")


# -- the events ----------------------------------------------------------------------


def make_event(i: int) -> dict[str, Any]:
    """Event number i: ~300 bytes encoded, with the repetition real audit logs have."""
    return {
        "type": ("user.login", "file.read", "file.write", "user.logout")[i % 4],
        "actor": f"user{i % 1000}", "target": f"/srv/file/{i % 5000}", "id": uuid7(),
        "stream": f"orders/{i % 100}",
        "tags": {"workspace": f"ws{i % 10}", "session": f"sess-{i % 777:05d}",
                 "severity": "info", "outcome": "success"},
        "data": {"ip": f"10.0.{i % 256}.{i % 200}", "bytes": i * 7, "ok": True,
                 "agent": "Mozilla/5.0 (X11; Linux x86_64) auditd-bench/1.0",
                 "path": f"/srv/file/{i % 5000}"},
    }


def stored_events(count: int, correlations: int = 0) -> list[StoredEvent]:
    """`count` events as the daemon stores them: seq, stream_seq gap-free, ts rising."""
    versions: Counter[str] = Counter()
    now, pid, uid, gid = time.time_ns(), os.getpid(), os.getuid(), os.getgid()
    events = []
    for i in range(count):
        wire = make_event(i)
        versions[wire["stream"]] += 1
        ts = now + i * 10_000  # arrival order, as the daemon's receive-time default gives
        events.append(StoredEvent(
            i + 1, wire["id"], ts, ts, wire["type"], wire["actor"], wire["target"],
            wire["stream"], versions[wire["stream"]],
            f"op-{i % correlations}" if correlations else None, None,
            encoder.encode(wire["tags"]), encoder.encode(wire["data"]), pid, uid, gid, "bench",
            id_hash(wire["id"])))
    return events


# -- the daemon ----------------------------------------------------------------------


class ThrowawayDaemon:
    """`auditd run` as a subprocess in a short temp dir; the dir goes away on exit."""

    def __init__(self, config: Config, durability: str, capacity: int | None) -> None:
        # A short /tmp dir: a Unix socket path must fit in 107 bytes.
        self.root = Path(tempfile.mkdtemp(dir="/tmp", prefix="adbench"))
        self.socket = str(self.root / "ingest.sock")
        self.db_path = self.root / "lib" / DB_NAME
        self.log_path = self.root / "daemon.log"
        # The writer settings follow --config, so the baseline's batch is the daemon's.
        sections: dict[str, dict[str, Any]] = {
            "ingest": {"socket": self.socket, "durability": durability},
            "buffer": {"capacity": capacity or config.buffer.capacity,
                       "overflow": config.buffer.overflow},
            "writer": {"batch_max": config.writer.batch_max,
                       "batch_delay_ms": config.writer.batch_delay_ms},
            "storage": {"path": str(self.root / "lib"), "reserve_bytes": "1MB"},
            "status": {"socket": str(self.root / "status.sock")},
            "log": {"format": "json"},
        }
        (self.root / "auditd.toml").write_text("".join(
            f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
            for name, keys in sections.items()))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ThrowawayDaemon:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "auditd.cli", "run", "--config",
                 str(self.root / "auditd.toml")], stdout=log, stderr=log)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                lines = self.log_path.read_text(errors="replace").strip().splitlines()
                self.__exit__()
                raise AuditdError(f"bench daemon exited {self.proc.returncode}: "
                                  f"{lines[-1] if lines else '(no log)'}")
            # The socket is bound (and connections queue) before the store is open and
            # the journal replayed, so only the ready line says the daemon is serving.
            if '"daemon_ready"' in self.log_path.read_text(errors="replace"):
                return self
            time.sleep(0.02)
        self.__exit__()
        raise AuditdError(f"bench daemon not ready after {_START_TIMEOUT_S:.0f}s")

    def __exit__(self, *exc: object) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # a clean stop, as systemd does
                try:
                    self.proc.wait(60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def peak_rss_mb(pid: int | None) -> float | None:
    """The process's high-water resident set (VmHWM), None when it cannot be read."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process: on a shared machine, a figure that the
    other tenants do not distort the way they distort wall-clock rates."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def listener_pid(path: str) -> int | None:
    """The pid that listens on `path`: SO_PEERCRED on a client socket names it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError as exc:
            raise AuditdError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        pid: int = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[0]
    return pid or None


class CommitWatcher(threading.Thread):
    """Polls max(seq), a rowid lookup that stays cheap at any size, to time the last commit.

    count(*) walks a whole index and would steal CPU from the daemon on every poll, so
    the exact count is taken only before and after the run.
    """

    def __init__(self, db_path: Path) -> None:
        super().__init__(daemon=True)
        self.uri = f"file:{db_path}?mode=ro"
        self.count_before = self.query("count(*)")
        self.latest = self.max_before = self.query("coalesce(max(seq), 0)")
        self.changed_at = time.monotonic()
        self._done = threading.Event()

    def query(self, what: str, conn: sqlite3.Connection | None = None) -> int:
        if conn is None:
            with contextlib.closing(sqlite3.connect(self.uri, uri=True)) as own:
                return self.query(what, own)
        return int(conn.execute(f"SELECT {what} FROM events").fetchone()[0])

    def run(self) -> None:
        with contextlib.closing(sqlite3.connect(self.uri, uri=True)) as conn:
            while not self._done.wait(_POLL_S):
                value = self.query("coalesce(max(seq), 0)", conn)
                if value != self.latest:
                    self.latest, self.changed_at = value, time.monotonic()

    def wait_for(self, events: int) -> tuple[int, float]:
        """Wait until `events` more seqs are committed or progress stalls; return the
        events committed meanwhile and when the last of them was seen."""
        while (self.latest - self.max_before < events
               and time.monotonic() - self.changed_at < _STALL_S):
            time.sleep(_POLL_S)
        self._done.set()
        self.join()
        return self.query("count(*)") - self.count_before, self.changed_at


# -- the clients ---------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSpec:
    socket: str
    first: int  # number of this client's first event, so that clients' events differ
    events: int
    batch: int
    window: int
    interval_s: float  # between two frames of this client; 0 floods
    duration_s: float | None


def client_process(spec: ClientSpec, go: Any, results: Any) -> None:
    """One client process: build its frames, connect, say ready, wait for go, drive."""
    try:
        events = [make_event(i) for i in range(spec.first, spec.first + spec.events)]
        if spec.batch == 1:  # one event a frame is a bare map, as a simple client sends
            frames = [encode_frame(encoder.encode(e)) for e in events]
        else:
            frames = [encode_frame(encoder.encode(events[at:at + spec.batch]))
                      for at in range(0, len(events), spec.batch)]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(spec.socket)
            results.put(("ready", None))
            go.wait()
            sock.setblocking(False)
            results.put(("done", drive(sock, frames, spec)))
    except Exception as exc:  # the parent fails the run with this message
        results.put(("failed", f"bench client: {exc!r}"))


def drive(sock: socket.socket, frames: list[bytes], spec: ClientSpec) -> dict[str, Any]:
    """Keep up to `window` frames in flight, paced when interval_s > 0; tally replies.

    One thread and select() rather than a reader thread: no GIL hand-offs between
    sending and reading to distort latencies. A frame's latency runs from when it was
    due (paced) or queued (flood) to when its reply was read, so a daemon that stops
    reading is charged for the wait.
    """
    decoder = FrameDecoder(64 * 1024 * 1024)
    out = bytearray()
    sent_at: deque[float] = deque()
    latencies: list[float] = []
    tally: Counter[str] = Counter()
    total, queued, answered = len(frames), 0, 0
    start = due = last_send = time.monotonic()
    deadline = start + spec.duration_s if spec.duration_s else math.inf
    while True:
        now = time.monotonic()
        if now >= deadline:
            total = queued  # stop offering; collect what is in flight
        if answered >= total:
            break
        while queued < total and queued - answered < spec.window and due <= now:
            out += frames[queued]
            sent_at.append(due if spec.interval_s else now)
            queued += 1
            due += spec.interval_s
        if out:
            with contextlib.suppress(BlockingIOError):  # the daemon is not reading
                del out[:sock.send(out)]
            if not out:
                last_send = time.monotonic()
        timeout = None  # window full or all sent: wait for a reply or a drained socket
        if queued < total and queued - answered < spec.window:
            timeout = max(0.0, min(due, deadline) - time.monotonic())
        readable, _, _ = select.select([sock], [sock] if out else [], [], timeout)
        if not readable:
            continue
        data = sock.recv(1 << 18)
        if not data:
            raise ConnectionError(f"the daemon closed the connection after {answered} replies")
        now = time.monotonic()
        for body in decoder.feed(data):
            latencies.append((now - sent_at.popleft()) * 1000)
            reply = msgspec.msgpack.decode(body)
            tally["ok"] += reply.get("ok", 0)
            tally["rejected"] += len(reply.get("rejected", ()))
            tally["duplicates"] += len(reply.get("duplicates", ()))
            if "error" in reply:
                tally[f"error:{reply['error']}"] += 1
            answered += 1
    return {"sent": min(spec.events, queued * spec.batch), "tally": tally,
            "first_send": start, "last_send": last_send, "last_reply": time.monotonic(),
            "latencies": latencies}


def run_clients(specs: list[ClientSpec]) -> list[dict[str, Any]]:
    """Start every client, release them together once all are ready, collect results."""
    context = mp.get_context("spawn")  # not fork: the parent holds a sqlite thread
    go, results = context.Event(), context.Queue()
    procs = [context.Process(target=client_process, args=(spec, go, results), daemon=True)
             for spec in specs]
    for proc in procs:
        proc.start()
    try:
        ready, done = 0, list[dict[str, Any]]()
        while len(done) < len(specs):
            try:
                kind, payload = results.get(timeout=1.0)
            except queue.Empty:  # see that no client died without a word
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise AuditdError("a bench client process died") from None
                continue
            if kind == "failed":
                raise AuditdError(payload)
            ready += kind == "ready"
            if kind == "ready" and ready == len(specs):
                go.set()
            elif kind == "done":
                done.append(payload)
        return done
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


# -- the storage baseline and the ring -----------------------------------------------


def run_baseline(count: int, batch_max: int) -> tuple[float, float]:
    """Rows/s and CPU seconds: the same events inserted with sqlite3, same schema.

    Names go through a dict that inserts misses into `names`, as the store does, and
    building the rows is timed because the daemon pays for it too. The streams upsert
    and the checkpoint row are the daemon's bookkeeping, not the storage ceiling.
    """
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="adbase"))
    try:
        conn = connect_sync(root / DB_NAME)
        migrate(conn)
        events = stored_events(count)
        names: dict[str, int] = {}

        def name_id(value: str) -> int:
            found = names.get(value)
            if found is None:
                found = names[value] = int(conn.execute(
                    "INSERT INTO names (value) VALUES (?) RETURNING id", (value,)
                ).fetchone()[0])
            return found

        started, cpu = time.perf_counter(), time.process_time()
        for at in range(0, count, batch_max):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(EVENTS.one(),
                             [event_row(e, name_id) for e in events[at:at + batch_max]])
            conn.execute("COMMIT")
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        conn.close()
        return count / elapsed, round(cpu, 2)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_ring(capacity: int = 10_000, correlations: int = 100,
             repetitions: int = 2_000) -> dict[str, Any]:
    """µs per call of recent(100) and by_correlation() on a full, mostly committed ring."""
    ring: RingBuffer[StoredEvent] = RingBuffer(capacity, 1 << 40)
    ring.push(stored_events(capacity, correlations), [300] * capacity)
    ring.mark_committed(capacity - 100)  # the writer is always a little behind
    timings: dict[str, list[float]] = {"recent_100": [], "by_correlation": []}
    for i in range(repetitions):
        t0 = time.perf_counter_ns()
        ring.recent(100)
        t1 = time.perf_counter_ns()
        ring.by_correlation(f"op-{i % correlations}")
        t2 = time.perf_counter_ns()
        timings["recent_100"].append((t1 - t0) / 1000)
        timings["by_correlation"].append((t2 - t1) / 1000)
    result: dict[str, Any] = {"capacity": capacity, "repetitions": repetitions,
                              "events_per_correlation": capacity // correlations}
    for name, values in timings.items():
        result[f"{name}_us"] = {"mean": round(sum(values) / len(values), 2),
                                "p99": round(percentile(values, 0.99), 2),
                                "max": round(max(values), 2)}
    return result


# -- the run and the report ----------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _per_s(count: int | None, seconds: float) -> float | None:
    return None if count is None or seconds <= 0 else round(count / seconds, 1)


def run_load(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    for flag in ("clients", "events", "batch", "window", "rate", "duration", "capacity"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:  # a usage error
            raise ConfigError(f"--{flag} {getattr(args, flag)}: expected a positive number")
    # First, while nothing else runs, so neither measurement disturbs the other.
    baseline = run_baseline(args.events, config.writer.batch_max) if args.baseline else None
    with contextlib.ExitStack() as stack:
        if args.socket:
            path, db_path, pid = (args.socket, Path(config.storage.path) / DB_NAME,
                                  listener_pid(args.socket))
        else:
            daemon = stack.enter_context(
                ThrowawayDaemon(config, args.durability, args.capacity))
            path, db_path = daemon.socket, daemon.db_path
            pid = daemon.proc.pid if daemon.proc else None
        doc = {"target": args.socket or "throw-away daemon",
               "durability": None if args.socket else args.durability,
               "capacity": None if args.socket else args.capacity or config.buffer.capacity,
               **measure(args, path, db_path, pid)}
    if baseline is not None:
        doc["baseline_rows_per_s"], doc["baseline_cpu_s"] = round(baseline[0], 1), baseline[1]
        doc["baseline_batch"] = config.writer.batch_max
        # Without the database only acknowledgements are known: compare those then.
        daemon_rate = doc["events_per_s"] or doc["acknowledged_per_s"]
        doc["ratio"] = round(daemon_rate / baseline[0], 3) if daemon_rate else None
    return doc


def measure(args: argparse.Namespace, path: str, db_path: Path,
            pid: int | None) -> dict[str, Any]:
    """Drive the daemon on `path` with the clients; the figures of the run."""
    window = args.window or max(1, _WINDOW_EVENTS // args.batch)
    shares = [args.events // args.clients + (i < args.events % args.clients)
              for i in range(args.clients)]
    interval = args.batch * args.clients / args.rate if args.rate else 0.0
    specs = [ClientSpec(path, sum(shares[:i]), n, args.batch, window, interval,
                        args.duration) for i, n in enumerate(shares) if n]
    watcher = CommitWatcher(db_path) if db_path.exists() else None
    if watcher is not None:
        watcher.start()
    cpu_before = cpu_seconds(pid)
    results = run_clients(specs)
    tally: Counter[str] = sum((Counter(r["tally"]) for r in results), Counter())
    committed, committed_at = watcher.wait_for(tally["ok"]) if watcher else (None, 0.0)
    cpu_after = cpu_seconds(pid)
    start = min(r["first_send"] for r in results)
    last_reply = max(r["last_reply"] for r in results)
    elapsed = max(committed_at, last_reply) - start
    sent = sum(r["sent"] for r in results)
    latencies = [ms for r in results for ms in r["latencies"]]
    return {
        "clients": len(specs), "batch": args.batch, "window": window, "rate": args.rate,
        "events_sent": sent, "events_acknowledged": tally["ok"],
        "events_rejected": tally["rejected"], "duplicates": tally["duplicates"],
        "frame_errors": {k[6:]: n for k, n in tally.items() if k.startswith("error:")},
        "events_committed": committed, "elapsed_s": round(elapsed, 3),
        "events_per_s": _per_s(committed, elapsed),
        "sent_per_s": _per_s(sent, max(r["last_send"] for r in results) - start),
        "acknowledged_per_s": _per_s(tally["ok"], last_reply - start),
        "latency_ms": {name: round(percentile(latencies, q), 3) if latencies else None
                       for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "peak_rss_mb": peak_rss_mb(pid),  # before the stop: shutdown is not under test
        "daemon_cpu_s": None if cpu_after is None or cpu_before is None
        else round(cpu_after - cpu_before, 2),
    }


def print_human(doc: dict[str, Any], prefix: str = "") -> None:
    """One `name  value` line per figure: readable, and still easy to grep."""
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            print_human(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            print(f"{prefix + key:<32} {value:,}")  # already rounded in the document
        else:
            print(f"{prefix + key:<32} {value}")


def main(args: argparse.Namespace, config: Config) -> int:
    # Killed by a timeout, the bench still stops its daemon and removes the temp dir.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    doc = {"ring": run_ring()} if args.ring else run_load(args, config)
    if args.json:
        print(json.dumps(doc))
    else:
        print_human(doc)
    return 0
