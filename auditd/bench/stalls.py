"""`auditd bench --stall MODE`: how long clients wait while something stalls the daemon.

- `non-reader`: one connection floods frames and never reads a reply, while a paced
  client sends `--rate` events/s (default 1,000) one a frame for `--duration` s
  (default 10): the paced client's reply latency, and whether (and how soon) the
  daemon held the flood for not reading.
- `locked`: the same paced client, while the bench holds the database's write lock
  (`BEGIN EXCLUSIVE`) through the middle third of the run: replies follow the journal,
  so those due under the lock must not wait for SQLite.
- `second-signal`: `--clients` connections pipeline `--batch`-event frames while the
  write lock holds the drain up; SIGTERM, `--duration` s (default 2) of draining under
  that load, then a second signal: seconds until the daemon has exited, once with
  SIGTERM twice and once with SIGINT twice.
- `no-socket`: the client library's first connect to a path with no socket, blocking
  and asyncio: how long until it fails, and whether its error names the path.

Each figure has beside it (`bar_ms`, `bar_s`) the bar the suite asserted before the
figures moved here; it is there for reference, not checked: on a shared machine a
figure is a measurement, not a verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from auditd.bench.clients import ClientSpec, client_process
from auditd.bench.daemon import CommitWatcher, ThrowawayDaemon, peak_rss_mb, wait_until
from auditd.bench.fair import status_json
from auditd.bench.micro import percentile
from auditd.bench.stall_clients import ClientTeam, non_reader_process, stopping_load_process
from auditd.client import AsyncClient, Client
from auditd.config import Config
from auditd.errors import AuditdError, ConfigError
from auditd.schema import uuid7

STALLS = ("non-reader", "locked", "second-signal", "no-socket")
_PACED_FIRST = 10**9  # the paced client's event numbers, apart from any other's
_PACED_WINDOW = 256  # frames in flight at most: past that, the wait is charged anyway
_WARM_EVENTS = 5_000  # second-signal: events pending under the lock before SIGTERM
_NO_SOCKET_ATTEMPTS = 50  # first connects timed, for each client
_NO_SOCKET_DEADLINE_S = 30.0  # reconnect_deadline: were the first connect retried
_WAIT_S = 60.0  # for a condition the run needs (a commit, a log line) before giving up


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stall", choices=STALLS,
        help="only a stall benchmark: the reply latency of a client sending --rate "
        "events/s (default 1000) one a frame for --duration s (default 10) while another "
        "connection never reads its replies (non-reader) or the bench holds the "
        "database's write lock through the middle third (locked); the seconds to exit "
        "after a second SIGTERM, then SIGINT, with --clients connections sending "
        "--batch-event frames and the drain held up by the lock for --duration s "
        "(default 2) (second-signal); the client library's first connect to a missing "
        "socket (no-socket)")


def run_stall(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    if args.socket:
        raise ConfigError("--stall starts what it measures itself: drop --socket")
    for flag in ("rate", "duration", "clients", "batch", "capacity"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ConfigError(f"--{flag} {value}: expected a positive number")
    runs: dict[str, Callable[[argparse.Namespace, Config], dict[str, Any]]] = {
        "non-reader": _non_reader, "locked": _locked, "second-signal": _second_signal,
        "no-socket": _no_socket}
    return {"mode": args.stall, **runs[args.stall](args, config)}


# -- helpers ------------------------------------------------------------------------------


def _paced(path: str, rate: float, duration: float) -> ClientSpec:
    return ClientSpec(path, _PACED_FIRST, max(1, int(rate * duration)), 1, _PACED_WINDOW,
                      1 / rate, duration)


def _latency(values: list[float]) -> dict[str, float | None]:
    return {name: round(percentile(values, q), 3) if values else None
            for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))}


def _paced_figures(result: dict[str, Any], committed: int) -> dict[str, Any]:
    tally = result["tally"]
    return {"events_sent": result["sent"], "events_acknowledged": tally["ok"],
            "events_committed": committed,
            "frame_errors": {k[6:]: n for k, n in tally.items() if k.startswith("error:")},
            "latency_ms": _latency(result["latencies"])}


def _wait(found: Callable[[], bool], what: str) -> None:
    wait_until(found, what, _WAIT_S, "--stall")


def _max_seq(db_path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])


@contextlib.contextmanager
def _write_lock(db_path: Path) -> Iterator[None]:
    """The database's write lock, held from this process: the daemon's writer stalls."""
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        conn.close()


# -- the modes ----------------------------------------------------------------------------


def _non_reader(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    rate, duration = args.rate or 1000.0, args.duration or 10.0
    with ThrowawayDaemon(config, args.durability, args.capacity) as daemon, ClientTeam() as team:
        status = Path(daemon.status_socket)
        seed = {"type": "bench.flood", "id": uuid7()}
        with Client(daemon.socket) as client:
            client.send(seed)
        _wait(lambda: _max_seq(daemon.db_path) >= 1, "commit of the flood's event")
        team.add(client_process, _paced(daemon.socket, rate, duration))
        team.add(non_reader_process, daemon.socket, seed["id"], team.stop)
        watcher = CommitWatcher(daemon.db_path)
        watcher.start()
        held_after: list[float] = []

        def see_held() -> None:  # when the daemon first says it stopped reading the flood
            stats = status_json(status, "/stats")
            if not held_after and stats and stats["held_connections"].get("writing"):
                held_after.append(round(time.monotonic() - team.released_at, 3))

        paced: dict[str, Any] = {}
        flood: dict[str, Any] = {}
        for kind, result in team.results_as_they_come(see_held):
            if kind == "done":
                paced = result
                see_held()
                team.stop.set()  # the paced run is over: let the flood go
            else:
                flood = result
        committed, _ = watcher.wait_for(paced["tally"]["ok"])
        rss = peak_rss_mb(daemon.proc.pid if daemon.proc else None)
    return {
        "duration_s": duration, "rate": rate,
        "paced": {**_paced_figures(paced, committed), "bar_ms": {"p50": 100, "max": 2000}},
        "non_reader": {**flood, "held": bool(held_after),
                       "held_after_s": held_after[0] if held_after else None},
        "peak_rss_mb": rss,
    }


class _LockHolder(threading.Thread):
    """Holds the write lock from `lock_at` to `release_at` (time.monotonic()), noting
    when, the last committed seq at both ends, and the daemon's view before release."""

    def __init__(self, db_path: Path, status: Path, lock_at: float, release_at: float,
                 ) -> None:
        super().__init__(daemon=True)
        self.db_path, self.status = db_path, status
        self.lock_at, self.release_at = lock_at, release_at
        self.figures: dict[str, Any] = {}
        self.locked_at = self.released_at = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            time.sleep(max(0.0, self.lock_at - time.monotonic()))  # the run's schedule
            asked = time.monotonic()
            with _write_lock(self.db_path):
                self.locked_at = time.monotonic()
                seq_at_lock = _max_seq(self.db_path)
                time.sleep(max(0.0, self.release_at - time.monotonic()))
                stats = status_json(self.status, "/stats") or {}
                health = status_json(self.status, "/health") or {}
                seq_at_release = _max_seq(self.db_path)
                self.released_at = time.monotonic()
            self.figures = {
                "wait_to_lock_s": round(self.locked_at - asked, 3),
                "held_s": round(self.released_at - self.locked_at, 3),
                "committed_while_locked": seq_at_release - seq_at_lock,
                "pending_at_release": stats.get("pending"),
                "commit_failures_at_release": stats.get("commit_failures"),
                "health_at_release": health.get("status")}
        except BaseException as exc:  # reported by the run, not lost in a thread
            self.error = exc


def _locked(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    rate, duration = args.rate or 1000.0, args.duration or 10.0
    with ThrowawayDaemon(config, args.durability, args.capacity) as daemon, ClientTeam() as team:
        team.add(client_process, _paced(daemon.socket, rate, duration))
        watcher = CommitWatcher(daemon.db_path)
        watcher.start()
        holder: _LockHolder | None = None

        def lock_in_the_middle() -> None:  # once, as soon as the clients are released
            nonlocal holder
            if holder is None:
                start = team.released_at
                holder = _LockHolder(daemon.db_path, Path(daemon.status_socket),
                                     start + duration / 3, start + duration * 2 / 3)
                holder.start()

        results = list(team.results_as_they_come(lock_in_the_middle))
        paced = results[0][1]
        if holder is None:
            raise AuditdError("bench --stall locked: the paced run ended before the lock")
        holder.join()
        if holder.error is not None:
            raise AuditdError(f"bench --stall locked: holding the lock failed: "
                              f"{holder.error!r}")
        committed, _ = watcher.wait_for(paced["tally"]["ok"])
    # Reply i answers the frame due at first_send + i / rate (replies come in order).
    during = [ms for i, ms in enumerate(paced["latencies"])
              if holder.locked_at <= paced["first_send"] + i / rate <= holder.released_at]
    return {
        "duration_s": duration, "rate": rate, "lock": holder.figures,
        "paced": {**_paced_figures(paced, committed),
                  "during_lock": {"replies": len(during), "latency_ms": _latency(during),
                                  "bar_ms": {"p99": 100, "max": 1000}}},
    }


def _second_signal(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    drain = args.duration or 2.0
    rounds = {signal.Signals(signum).name: _signal_round(args, config, signum, drain)
              for signum in (signal.SIGTERM, signal.SIGINT)}
    return {"clients": args.clients, "batch": args.batch, "drain_s": drain,
            "rounds": rounds}


def _signal_round(args: argparse.Namespace, config: Config, signum: int,
                  drain: float) -> dict[str, Any]:
    """A daemon under load with its drain held up by the write lock: `signum`, `drain`
    seconds, `signum` again; how soon it exits, with what code, and what it logged."""
    with ThrowawayDaemon(config, args.durability, args.capacity) as daemon, ClientTeam() as team:
        for n in range(args.clients):
            team.add(stopping_load_process, daemon.socket, n * 10**8, args.batch)
        figures: dict[str, Any] = {}
        load: Counter[str] = Counter()

        def once_the_load_is_on() -> None:
            if not figures:
                figures.update(_stop_twice(daemon, signum, drain))

        with _write_lock(daemon.db_path):
            for _kind, tally in team.results_as_they_come(once_the_load_is_on):
                load.update(tally)
            committed = _max_seq(daemon.db_path)
        log = daemon.log_path.read_text(errors="replace")
    return {**figures, "forced_exit_logged": '"forced_exit"' in log,
            "committed_at_exit": committed, "load_events_acknowledged": load["ok"],
            "load_frames_refused": {k[6:]: n for k, n in load.items()
                                    if k.startswith("error:") and n}}


def _stop_twice(daemon: ThrowawayDaemon, signum: int, drain: float) -> dict[str, Any]:
    """Once events wait under the lock (or senders wait for room): `signum`; once the
    daemon says it is stopping, `drain` s of draining under the load; `signum` again."""
    proc, status = daemon.proc, Path(daemon.status_socket)
    if proc is None:
        raise AuditdError("bench --stall second-signal: the daemon is not running")

    def waiting() -> bool:
        stats = status_json(status, "/stats") or {}
        return bool(stats.get("pending", 0) >= _WARM_EVENTS
                    or stats.get("held_connections", {}).get("buffer"))

    _wait(waiting, f"{_WARM_EVENTS} events pending under the lock")
    pending = (status_json(status, "/stats") or {}).get("pending")
    proc.send_signal(signum)
    _wait(lambda: '"daemon_stopping"' in daemon.log_path.read_text(errors="replace"),
          "daemon_stopping log line")
    time.sleep(drain)  # the scenario, not a synchronisation: this long held up
    running = proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signum)
    try:
        code: int | None = proc.wait(_WAIT_S)
        exit_s: float | None = round(time.monotonic() - sent, 3)
    except subprocess.TimeoutExpired:
        code = exit_s = None
    return {"pending_at_first_signal": pending, "running_at_second_signal": running,
            "exit_code": code, "exit_s": exit_s, "bar_s": 5}


def _no_socket(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="adstall"))
    path = str(root / "missing.sock")
    try:
        return {"path": path, "reconnect_deadline_s": _NO_SOCKET_DEADLINE_S,
                "blocking": _first_connects(path, _blocking_connect),
                "asyncio": _first_connects(path, lambda p: asyncio.run(_async_connect(p)))}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _blocking_connect(path: str) -> None:
    with Client(path, reconnect_deadline=_NO_SOCKET_DEADLINE_S) as client:
        client.send({"type": "bench.no_socket"})


async def _async_connect(path: str) -> None:
    async with AsyncClient(path, reconnect_deadline=_NO_SOCKET_DEADLINE_S) as client:
        await client.send({"type": "bench.no_socket"})


def _first_connects(path: str, connect: Callable[[str], None]) -> dict[str, Any]:
    """Time `connect(path)` until it raises, _NO_SOCKET_ATTEMPTS times (fewer if one
    took half the reconnect deadline: the first connect is retried, and that is the
    figure; the rest would only take as long)."""
    timings: list[float] = []
    errors: Counter[str] = Counter()
    names_path, message = 0, None
    for _ in range(_NO_SOCKET_ATTEMPTS):
        started = time.perf_counter()
        try:
            connect(path)
            errors["none"] += 1
        except Exception as exc:  # whatever it is, it is the figure
            errors[type(exc).__name__] += 1
            names_path += path in str(exc)
            message = message or str(exc)
        timings.append((time.perf_counter() - started) * 1000)
        if timings[-1] > _NO_SOCKET_DEADLINE_S * 500:
            break
    return {"attempts": len(timings), "errors": dict(errors), "errors_naming_path": names_path,
            "error": message, "latency_ms": _latency(timings), "bar_ms": {"max": 1000}}
