"""`auditd bench --follow`: what `tail -f` followers see, and what they cost ingest.

Phases, on one throw-away daemon (so each comparison is within the same run):

1. latency: one follower while clients offer `--rate` (default 5,000) events/s; for
   every line, accepted -> read: the line's `received_at` (stamped by the daemon when
   it accepted the event) to the moment the follower read it. This includes the
   batch delay and the commit, so it bounds commit -> read from above.
2. fan-out: `--followers` (default 100) followers of every event at the same rate,
   against the same rate with none: committed events/s, latency (the oldest line of
   each read), followers cut.
3. flood: ingest as fast as the clients go, with none and with `--followers`
   followers, each of one actor's events (distinct filters: no shared matching).

Phases 2 and 3 alternate none / followers `--follow-runs` times; medians are printed.
The followers run in separate processes (50 each) on raw sockets (HTTP/1.0, so the body is
the bare lines), reading as fast as they can.
"""

from __future__ import annotations

import argparse
import bisect
import calendar
import contextlib
import multiprocessing as mp
import selectors
import socket
import sqlite3
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from auditd.bench.micro import percentile
from auditd.config import Config
from auditd.errors import AuditdError

_RECV = 1 << 18


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--follow", action="store_true",
        help="only the follow benchmark: accepted -> read latency of a tail -f client at "
             "--rate events/s (default 5000), and ingest with and without --followers")
    add("--followers", type=int, default=100,
        help="followers at once in the --follow fan-out and flood phases (default 100)")
    add("--follow-runs", type=int, default=3,
        help="alternations of none / --followers in the --follow phases (default 3)")


class _Follower:
    """One raw connection: the status line and headers, then NDJSON lines."""

    def __init__(self, path: str, query: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.sendall(f"GET /tail?{query} HTTP/1.0\r\nHost: auditd\r\n\r\n".encode())
        self.head: bytes | None = b""
        self.partial = b""  # every_line: the start of a line not yet complete
        self.lines = 0
        self.cut = False
        self.samples: list[float] = []  # accepted -> read, ms
        self.reads: list[tuple[int, int]] = []  # every_line: (seq, read at, ns)

    def feed(self, data: bytes, now_ns: int, every_line: bool) -> None:
        if self.head is not None:
            self.head += data
            head, sep, data = self.head.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                raise AuditdError(f"/tail answered {head.splitlines()[0]!r}")
            self.head = None
        # Counted in C, not line by line: a hundred followers read ~500k lines/s.
        self.lines += data.count(b"\n")
        if b'{"error"' in data:
            self.cut = True
        if every_line:
            *complete, self.partial = (self.partial + data).split(b"\n")
            for line in complete:
                if line.startswith(b'{"seq"'):
                    self.samples.append((now_ns - _received_ns(line)) / 1e6)
                    self.reads.append((int(line[7:line.index(b",")]), now_ns))
            return
        start = data.find(b"\n") + 1  # the first line begun in this read: the oldest
        end = data.find(b"\n", start)
        if start and end > 0 and data.startswith(b'{"seq"', start):
            self.samples.append((now_ns - _received_ns(data[start:end])) / 1e6)


def _received_ns(line: bytes) -> int:
    at = line.index(b'"received_at":"') + 15
    whole, fraction = line[at:at + 19], line[at + 20:at + 29]
    seconds = _SECOND_CACHE.get(whole)
    if seconds is None:
        seconds = _SECOND_CACHE[whole] = calendar.timegm(
            time.strptime(whole.decode(), "%Y-%m-%dT%H:%M:%S"))
    return seconds * 1_000_000_000 + int(fraction)


_SECOND_CACHE: dict[bytes, int] = {}


class _CommitTimes(threading.Thread):
    """When each committed_seq was first seen (polled every millisecond): a line's
    commit time is the first sighting of a checkpoint at or past its seq, up to about
    a millisecond late, so commit -> read is, if anything, understated by that."""

    def __init__(self, db_path: str) -> None:
        super().__init__(daemon=True)
        self.uri = f"file:{db_path}?mode=ro"
        self.seqs: list[int] = []
        self.times: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        with contextlib.closing(sqlite3.connect(self.uri, uri=True)) as db:
            while not self.done.wait(0.001):
                row = db.execute("SELECT value FROM meta WHERE key = 'committed_seq'"
                                 ).fetchone()
                seq = int(row[0])
                if not self.seqs or seq > self.seqs[-1]:
                    self.seqs.append(seq)
                    self.times.append(time.time_ns())

    def commit_to_read_ms(self, reads: list[tuple[int, int]]) -> list[float]:
        found = []
        for seq, read_ns in reads:
            at = bisect.bisect_left(self.seqs, seq)
            if at < len(self.seqs):
                found.append(max(0.0, (read_ns - self.times[at]) / 1e6))
        return found


def follower_process(path: str, queries: list[str], db_path: str | None, ready: Any,
                     stop: Any, results: Any) -> None:
    """`db_path` given: every line is timed, commit -> read too (one follower)."""
    try:
        every_line = db_path is not None
        sys.setswitchinterval(0.0005)  # the commit poller must not delay the reads
        commits = _CommitTimes(db_path) if db_path is not None else None
        if commits is not None:
            commits.start()
        followers = [_Follower(path, query) for query in queries]
        selector = selectors.DefaultSelector()
        for follower in followers:
            follower.sock.setblocking(False)
            selector.register(follower.sock, selectors.EVENT_READ, follower)
        ready.set()
        while not stop.is_set():
            for key, _ in selector.select(0.1):
                follower = key.data
                data = follower.sock.recv(_RECV)
                if not data:
                    selector.unregister(follower.sock)
                    follower.cut = True
                    continue
                follower.feed(data, time.time_ns(), every_line)
        samples = [ms for f in followers for ms in f.samples]
        committed: list[float] = []
        if commits is not None:
            commits.done.set()
            commits.join()
            committed = commits.commit_to_read_ms([r for f in followers for r in f.reads])
        results.put({"lines": sum(f.lines for f in followers),
                     "cut": sum(f.cut for f in followers), "samples": samples,
                     "commit_to_read": committed})
        for follower in followers:
            follower.sock.close()
    except Exception as exc:
        results.put({"failed": repr(exc)})


_PER_PROCESS = 50  # followers one reader process serves


class FollowerGroup:
    """Followers in child processes (50 each): connected on enter, figures on exit."""

    def __init__(self, path: str, queries: list[str], db_path: Path | None = None) -> None:
        context = mp.get_context("spawn")
        self.stop, self.results = context.Event(), context.Queue()
        shares = [queries[at:at + _PER_PROCESS] for at in range(0, len(queries), _PER_PROCESS)]
        self.ready = [context.Event() for _ in shares]
        self.procs = [context.Process(target=follower_process, daemon=True, args=(
            path, share, None if db_path is None else str(db_path), ready, self.stop,
            self.results)) for share, ready in zip(shares, self.ready, strict=True)]
        self.figures: dict[str, Any] = {}

    def __enter__(self) -> FollowerGroup:
        for proc in self.procs:
            proc.start()
        if not all(ready.wait(60) for ready in self.ready):
            raise AuditdError("the bench followers did not connect")
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)  # the last commits' lines are on their way
        self.stop.set()
        parts = [self.results.get(timeout=60) for _ in self.procs]
        for proc in self.procs:
            proc.join(10)
        for part in parts:
            if "failed" in part:
                raise AuditdError(f"bench followers: {part['failed']}")
        self.figures = {key: sum((part[key] for part in parts), start=type(parts[0][key])())
                        for key in parts[0]}


def _wait_live(status: str, count: int) -> None:
    """Until the daemon counts `count` live followers (subscribed, past the catch-up)."""
    from auditd.cli.operator import call

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, stats = call(status, "GET", "/stats")
        if stats.get("follow", {}).get("live", 0) >= count:
            return
        time.sleep(0.05)
    raise AuditdError(f"{count} followers did not go live")


def _load(args: argparse.Namespace, rate: float | None, events: int, path: str,
          db_path: Path, pid: int | None) -> dict[str, Any]:
    from auditd.bench import measure

    load = argparse.Namespace(**{**vars(args), "rate": rate, "events": events})
    return measure(load, path, db_path, pid)


def _known(values: list[Any]) -> list[Any]:
    return [value for value in values if value is not None] or [0]


def _cpu_us(figures: dict[str, Any]) -> float | None:
    """The daemon's CPU time per committed event, in microseconds."""
    cpu, events = figures.get("daemon_cpu_s"), figures.get("events_committed")
    return round(cpu / events * 1e6, 1) if cpu is not None and events else None


def _latency(samples: list[float]) -> dict[str, float | None]:
    return {name: round(percentile(samples, q), 2) if samples else None
            for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))}


def run_follow(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    from auditd.bench.daemon import ThrowawayDaemon

    for flag in ("followers", "follow_runs"):
        if getattr(args, flag) <= 0:
            raise AuditdError(f"--{flag.replace('_', '-')}: expected a positive number")
    rate = args.rate or 5000.0
    paced_events = int(rate * (args.duration or 10))
    with ThrowawayDaemon(config, args.durability, args.capacity) as daemon:
        status = daemon.status_socket
        pid = daemon.proc.pid if daemon.proc else None
        run = (daemon.socket, daemon.db_path, pid)
        commit_to_read: list[float] = []
        accepted_to_read: list[float] = []
        for _ in range(args.follow_runs):
            with FollowerGroup(status, ["follow=1&n=0"], daemon.db_path) as one:
                _wait_live(status, 1)
                paced = _load(args, rate, paced_events, *run)
            commit_to_read.append(_latency(one.figures["commit_to_read"])["p99"] or 0.0)
            accepted_to_read.append(_latency(one.figures["samples"])["p99"] or 0.0)
        doc: dict[str, Any] = {"rate": rate, "latency": {
            "events": paced_events, "committed_per_s": paced["events_per_s"],
            "lines": one.figures["lines"], "cut": one.figures["cut"],
            "commit_to_read_ms": _latency(one.figures["commit_to_read"]),
            "accepted_to_read_ms": _latency(one.figures["samples"]),
            "runs_commit_to_read_p99_ms": commit_to_read,
            "runs_accepted_to_read_p99_ms": accepted_to_read,
            "commit_to_read_p99_ms": statistics.median(commit_to_read)}}
        fan: dict[str, list[Any]] = {"none": [], "with": [], "p99": [], "cut": [],
                                     "cpu_us_none": [], "cpu_us_with": []}
        flood: dict[str, list[Any]] = {"none": [], "with": [], "cut": [], "cpu_us_none": [],
                                       "cpu_us_with": []}
        every = ["follow=1&n=0"] * args.followers
        by_actor = [f"follow=1&n=0&actor=user{k}" for k in range(args.followers)]
        for _ in range(args.follow_runs):
            alone = _load(args, rate, paced_events, *run)
            fan["none"].append(alone["events_per_s"])
            fan["cpu_us_none"].append(_cpu_us(alone))
            with FollowerGroup(status, every) as group:
                _wait_live(status, args.followers)
                watched = _load(args, rate, paced_events, *run)
            fan["with"].append(watched["events_per_s"])
            fan["cpu_us_with"].append(_cpu_us(watched))
            fan["p99"].append(_latency(group.figures["samples"])["p99"])
            fan["cut"].append(group.figures["cut"])
            alone = _load(args, None, args.events, *run)
            flood["none"].append(alone["events_per_s"])
            flood["cpu_us_none"].append(_cpu_us(alone))
            with FollowerGroup(status, by_actor) as group:
                _wait_live(status, args.followers)
                watched = _load(args, None, args.events, *run)
            flood["with"].append(watched["events_per_s"])
            flood["cpu_us_with"].append(_cpu_us(watched))
            flood["cut"].append(group.figures["cut"])
    median = statistics.median
    doc["fan_out"] = {"followers": args.followers, "runs": fan,
                      "committed_per_s_none": median(fan["none"]),
                      "committed_per_s_with": median(fan["with"]),
                      "daemon_cpu_us_per_event_none": median(_known(fan["cpu_us_none"])),
                      "daemon_cpu_us_per_event_with": median(_known(fan["cpu_us_with"])),
                      "accepted_to_read_p99_ms": median(p for p in fan["p99"] if p is not None)
                      if any(p is not None for p in fan["p99"]) else None}
    doc["flood"] = {"followers": args.followers, "runs": flood,
                    "events_per_s_none": median(flood["none"]),
                    "events_per_s_with": median(flood["with"]),
                    "ratio": round(median(flood["with"]) / median(flood["none"]), 3),
                    "daemon_cpu_us_per_event_none": median(_known(flood["cpu_us_none"])),
                    "daemon_cpu_us_per_event_with": median(_known(flood["cpu_us_with"]))}
    return doc
