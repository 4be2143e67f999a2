"""Shared fixtures: a real daemon subprocess on real sockets and a real SQLite file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from auditd.cli import operator
from auditd.ingest.framing import encode_frame
from auditd.store.partition.read import SealedPartition
from auditd.store.records import event_from_record, is_dead_letter


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in keys.items())
        lines.append("")
    path.write_text("\n".join(lines))


class DaemonProcess:
    """`auditd run` as a subprocess in its own short temp dir (socket paths < 108 bytes)."""

    def __init__(self, root: Path, overrides: dict[str, dict[str, Any]] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        self.ingest_socket = str(root / "ingest.sock")
        self.status_socket = str(root / "status.sock")
        self.storage = root / "lib"
        self.db_path = self.storage / "auditd.db"
        self.config_path = root / "auditd.toml"
        self.log_path = root / "daemon.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._start_offset = 0
        sections: dict[str, dict[str, Any]] = {
            "ingest": {"socket": self.ingest_socket},
            "storage": {"path": str(self.storage), "reserve_bytes": "1MB"},
            "status": {"socket": self.status_socket, "admin_uids": [0]},
            "log": {"level": "info", "format": "json"},
        }
        for section, keys in (overrides or {}).items():
            sections.setdefault(section, {}).update(keys)
        self.sections = sections
        write_config(self.config_path, sections)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "auditd.cli", "run", "--config", str(self.config_path)]

    def start(self, wait: bool = True, timeout: float = 60.0) -> None:
        log = self.log_path.open("ab")
        # Where this start's lines begin, taken before the process exists: a daemon that
        # logs daemon_ready before Popen returns must not have its mark counted as old.
        self._start_offset = log.tell()
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, env=env)
        log.close()
        if wait:
            self.wait_ready(timeout)

    def log_since_start(self) -> str:
        """What the daemon logged since the last start()."""
        with contextlib.suppress(FileNotFoundError), self.log_path.open("rb") as log:
            log.seek(self._start_offset)
            return log.read().decode(errors="replace")
        return ""

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until this start's daemon_ready line; fails at once if the daemon exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log_text()}")
            if '"daemon_ready"' in self.log_since_start():
                return
            time.sleep(0.02)
        raise AssertionError(f"daemon not ready after {timeout}s:\n{self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        conn = self.db()
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def connect(self) -> RawConnection:
        return RawConnection(self.ingest_socket)

    def stats(self) -> dict[str, Any]:
        """The daemon's own figures: GET /stats over its status socket."""
        conn = UnixHTTPConnection(self.status_socket)
        try:
            conn.request("GET", "/stats")
            response = conn.getresponse()
            body: dict[str, Any] = json.loads(response.read())
        finally:
            conn.close()
        assert response.status == 200, body
        return body


class RawConnection:
    """A bare protocol connection for byte-exact tests."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, body: Any) -> None:
        payload = body if isinstance(body, bytes) else msgspec.msgpack.encode(body)
        self.sock.sendall(encode_frame(payload))

    def recv_frame(self) -> bytes:
        header = self._exactly(4)
        return self._exactly(int.from_bytes(header, "big"))

    def recv(self) -> dict[str, Any]:
        reply: dict[str, Any] = msgspec.msgpack.decode(self.recv_frame())
        return reply

    def request(self, body: Any) -> dict[str, Any]:
        self.send(body)
        return self.recv()

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return True

    def _exactly(self, count: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < count:
            chunk = self.sock.recv(count - len(chunks))
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            chunks += chunk
        return bytes(chunks)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FAST_RETRY = {"writer": {"retry_max_delay": "100ms"}}


@contextlib.contextmanager
def write_lock(daemon: DaemonProcess) -> Iterator[sqlite3.Connection]:
    """Hold the database's write lock from this (another) process: the writer stalls."""
    conn = sqlite3.connect(daemon.db_path, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        conn.close()


class UnixHTTPConnection(operator.UnixHTTPConnection):
    """http.client over the status socket, for tests that want the raw HTTP exchange."""

    def __init__(self, path: str) -> None:
        super().__init__(path, timeout=30)


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "",
             interval: float = 0.02) -> Any:
    """Poll until `predicate` returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}"
                                 f" (last: {value!r})")
        time.sleep(interval)


def wait_held(daemon: DaemonProcess, count: int, reason: str = "buffer",
              timeout: float = 30.0) -> dict[str, Any]:
    """Until the daemon itself says `count` connections are held back for `reason`
    ("buffer", "lookup", "writing"); returns that /stats document."""
    def held() -> dict[str, Any] | None:
        figures = daemon.stats()
        return figures if figures["held_connections"][reason] >= count else None
    document: dict[str, Any] = wait_for(held, timeout, f"{count} connection(s) held ({reason})")
    return document


def wait_buffer_empty(daemon: DaemonProcess, timeout: float = 30.0) -> None:
    """Until the daemon's own buffer holds nothing pending. A commit is in the database
    a moment before the daemon frees its buffer slots: with overflow = "reject", a frame
    sent on seeing the commit in the file can still be answered overloaded."""
    wait_for(lambda: daemon.stats()["pending"] == 0, timeout, "the buffer to empty")


def committed_seq(daemon: DaemonProcess) -> int:
    return int(daemon.query("SELECT value FROM meta WHERE key = 'committed_seq'")[0][0])


# How long commits may wait for one seal in progress. Held two partitions behind, the
# writer waits for the sealing process (by design: the sealer paces commits), and a
# seal of 131,072 events beside a CPU burner and another suite took minutes.
SEAL_HOLD_S = 600.0


def _held_for_a_seal(daemon: DaemonProcess) -> bool:
    try:
        partitions = daemon.stats().get("partitions") or {}
    except OSError:  # between two daemon runs: not a seal
        return False
    return bool(partitions.get("commits_held") and partitions.get("sealing"))


def wait_committed(daemon: DaemonProcess, seq: int, timeout: float = 30.0) -> None:
    """Until seq is committed; fails once commits stop advancing for `timeout` s (a
    large replay on a loaded machine may take longer than that in all, and still works)
    while no seal holds them, or a seal holds them past SEAL_HOLD_S."""
    last, stalled_at = -1, time.monotonic()
    held_since: float | None = None
    while True:
        now, seen = time.monotonic(), committed_seq(daemon)
        if seen >= seq:
            return
        if seen > last:
            last, stalled_at, held_since = seen, now, None
        elif now - stalled_at > timeout:
            if _held_for_a_seal(daemon):
                held_since = now if held_since is None else held_since
                if now - held_since < SEAL_HOLD_S:
                    stalled_at = now  # the sealing process is working: not a stall
                    continue
            raise AssertionError(f"commits stopped at seq {seen} for {timeout}s, waiting "
                                 f"for the commit of seq {seq}"
                                 + ("" if held_since is None else
                                    f" (held {now - held_since:.0f}s for a seal)"))
        time.sleep(0.02)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="adt"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_daemon(short_tmp: Path) -> Iterator[Any]:
    """Factory: make_daemon(overrides=None, start=True) -> DaemonProcess; all stopped after."""
    made: list[DaemonProcess] = []

    def factory(overrides: dict[str, dict[str, Any]] | None = None, *, start: bool = True,
                env: dict[str, str] | None = None, name: str = "d") -> DaemonProcess:
        root = short_tmp / f"{name}{len(made)}"
        root.mkdir()
        daemon = DaemonProcess(root, overrides, env)
        made.append(daemon)
        if start:
            daemon.start()
        return daemon

    yield factory
    for daemon in made:
        daemon.stop()


@pytest.fixture
def daemon(make_daemon: Any) -> DaemonProcess:
    """A started daemon with the default test config."""
    started: DaemonProcess = make_daemon()
    return started


# -- sealed partitions -----------------------------------------------------------------


def catalogued(daemon: DaemonProcess) -> list[tuple[int, int, str]]:
    return [(int(a), int(b), str(c)) for a, b, c in daemon.query(
        "SELECT first_seq, last_seq, file FROM partitions ORDER BY first_seq")]


def stored_seqs(daemon: DaemonProcess) -> dict[int, str]:
    """seq -> id of every stored event: sealed partitions and the hot table."""
    return stored_seqs_in(daemon.db_path)


def stored_seqs_in(db_path: Path) -> dict[int, str]:
    """stored_seqs of the store whose database is `db_path`, partitions/ beside it."""
    found: dict[int, str] = {}
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        files = [str(file) for (file,) in db.execute(
            "SELECT file FROM partitions ORDER BY first_seq")]
        hot = db.execute("SELECT seq, id FROM events").fetchall()
    for file in files:
        with SealedPartition(db_path.parent / "partitions" / file) as part:
            seqs = range(part.first_seq, part.last_seq + 1)
            for seq, record in zip(seqs, part.records(seqs), strict=True):
                if not is_dead_letter(record):
                    found[seq] = event_from_record(record).id
    for seq, event_id in hot:
        assert found.setdefault(int(seq), str(event_id)) == event_id
    return found


def wait_sealed_through(daemon: DaemonProcess, seq: int, timeout: float = 60.0) -> None:
    """Until the store is sealed through `seq` and the hot rows behind it released;
    fails once nothing advances (sealed_through, the hot table's first row) for
    `timeout` s while no seal runs, or after SEAL_HOLD_S in all: a seal runs at low
    priority, so beside busy processes a few of them take minutes, and still work."""
    started = stalled_at = time.monotonic()
    last: tuple[int, int] | None = None
    while True:
        through = int(daemon.query(
            "SELECT value FROM meta WHERE key = 'sealed_through'")[0][0])
        hot_min = daemon.query("SELECT min(seq) FROM events")[0][0]
        if through >= seq and (hot_min is None or hot_min > through):
            return
        now, seen = time.monotonic(), (through, int(hot_min or 0))
        if seen != last:
            last, stalled_at = seen, now
        elif now - stalled_at > timeout and not _sealing(daemon):
            raise AssertionError(f"sealed through {through}, hot rows from {hot_min}: no "
                                 f"progress for {timeout}s and no seal running, waiting "
                                 f"for seq {seq}")
        if now - started > SEAL_HOLD_S:
            raise AssertionError(f"not sealed through {seq} after {SEAL_HOLD_S}s "
                                 f"(sealed through {through})")
        time.sleep(0.05)


def _sealing(daemon: DaemonProcess) -> bool:
    try:
        return bool((daemon.stats().get("partitions") or {}).get("sealing"))
    except OSError:
        return False


# The files that take longest (pytest's --durations report of a full run), started first:
# the Makefile hands whole files to three workers in collection order, and a long file
# started last kept one worker busy alone for up to a minute while the others were idle.
# Longest first leaves only short files for the end. A file missing here runs after these,
# in the usual order; a name that no longer exists is simply not matched.
SLOWEST_FILES_FIRST = (
    "integration/test_export_import.py", "integration/test_forward.py",
    "integration/test_retention.py", "integration/test_cli.py", "integration/test_follow.py",
    "faults/test_seal_crash.py", "integration/test_protocol.py", "faults/test_sigkill.py",
    "unit/test_term_filter.py", "integration/test_client.py",
    "integration/test_migrate_cli.py", "integration/test_ordering.py",
    "integration/test_recover_cli.py", "integration/test_integrations.py",
    "integration/test_projections.py", "faults/test_damaged_db.py",
    "integration/test_bench_soak.py", "faults/test_journal_damage.py",
    "integration/test_start_timeout.py", "integration/test_bench_stalls.py",
    "integration/test_forward_cluster.py", "faults/test_projections_sigkill.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: at for at, name in enumerate(SLOWEST_FILES_FIRST)}

    def weight(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0].removeprefix("tests/")
        return rank.get(path, len(rank))

    items.sort(key=weight)  # stable: within a file, and among the rest, the order stays
