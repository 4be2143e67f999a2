"""The bench's daemon side: a throw-away `auditd run`, and what /proc and the database
say about it (peak memory, CPU, the moment the last event was committed)."""

from __future__ import annotations

import contextlib
import json
import os
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from auditd.config import Config
from auditd.errors import AuditdError
from auditd.store.store import DB_NAME

_START_TIMEOUT_S = 600.0  # a replay benchmark journals a million events first
_STALL_S = 10.0  # the committed count stopped growing this long ago: stop waiting
_POLL_S = 0.005
_PEERCRED = struct.Struct("3i")


def wait_until(check: Callable[[], Any], what: str, timeout_s: float, bench: str) -> Any:
    """Poll `check` until it returns something truthy, and return that; past
    `timeout_s`, AuditdError naming the bench and what it waited for."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AuditdError(f"bench {bench}: no {what} within {timeout_s:.0f}s")
        time.sleep(0.02)


class ThrowawayDaemon:
    """`auditd run` as a subprocess in a short temp dir; the dir goes away on exit."""

    def __init__(self, config: Config, durability: str, capacity: int | None,
                 prepare: Callable[[Path], None] | None = None,
                 extra: dict[str, dict[str, Any]] | None = None) -> None:
        # A short /tmp dir: a Unix socket path must fit in 107 bytes.
        self.root = Path(tempfile.mkdtemp(dir="/tmp", prefix="adbench"))
        self.socket = str(self.root / "ingest.sock")
        self.status_socket = str(self.root / "status.sock")
        self.db_path = self.root / "lib" / DB_NAME
        self.log_path = self.root / "daemon.log"
        # The writer settings follow --config, so the baseline's batch is the daemon's.
        sections: dict[str, dict[str, Any]] = {
            "ingest": {"socket": self.socket, "durability": durability},
            "buffer": {"capacity": capacity or config.buffer.capacity,
                       "overflow": config.buffer.overflow},
            "writer": {"batch_max": config.writer.batch_max,
                       "batch_delay_ms": config.writer.batch_delay_ms},
            "storage": {"path": str(self.root / "lib"), "reserve_bytes": "1MB",
                        "partition_events": config.storage.partition_events},
            "status": {"socket": self.status_socket},
            "log": {"format": "json"},
        }
        for name, keys in (extra or {}).items():  # a bench's own settings (retention...)
            sections.setdefault(name, {}).update(keys)
        self.sections = sections
        self._write_config()
        self.proc: subprocess.Popen[bytes] | None = None
        if prepare is not None:  # e.g. a journal to replay at start
            prepare(self.root / "lib")

    def _write_config(self) -> None:
        (self.root / "auditd.toml").write_text("".join(
            f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
            for name, keys in self.sections.items()))

    def reconfigure(self, section: str, **keys: Any) -> None:
        """Change settings in the config file and have the daemon reload it (SIGHUP)."""
        self.sections.setdefault(section, {}).update(keys)
        self._write_config()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)

    def __enter__(self) -> ThrowawayDaemon:
        try:
            self._start()
        except AuditdError:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        readied = self._ready_lines()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "auditd.cli", "run", "--config",
                 str(self.root / "auditd.toml")], stdout=log, stderr=log)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                lines = self.log_path.read_text(errors="replace").strip().splitlines()
                raise AuditdError(f"bench daemon exited {self.proc.returncode}: "
                                  f"{lines[-1] if lines else '(no log)'}")
            # The socket is bound (and connections queue) before the store is open and
            # the journal replayed, so only the ready line says the daemon is serving.
            if self._ready_lines() > readied:
                return
            time.sleep(0.02)
        raise AuditdError(f"bench daemon not ready after {_START_TIMEOUT_S:.0f}s")

    def _ready_lines(self) -> int:
        if not self.log_path.exists():
            return 0
        return self.log_path.read_text(errors="replace").count('"daemon_ready"')

    def sigkill_and_restart(self) -> None:
        """SIGKILL the daemon (no shutdown at all) and start it again on the same files."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self._start()

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
    """Polls the commit checkpoint (`meta.committed_seq`, one row) to time the last commit.

    Not the events table: sealing moves committed events out of it into partitions.
    Every committed seq is an event or a dead letter, and the benches make no dead
    letters, so committed seqs count committed events.
    """

    def __init__(self, db_path: Path) -> None:
        super().__init__(daemon=True)
        self.uri = f"file:{db_path}?mode=ro"
        self.latest = self.before = self.committed()
        self.changed_at = time.monotonic()
        self._done = threading.Event()

    def committed(self, conn: sqlite3.Connection | None = None) -> int:
        if conn is None:
            with contextlib.closing(sqlite3.connect(self.uri, uri=True)) as own:
                return self.committed(own)
        row = conn.execute("SELECT value FROM meta WHERE key = 'committed_seq'").fetchone()
        return int(row[0])

    def run(self) -> None:
        with contextlib.closing(sqlite3.connect(self.uri, uri=True)) as conn:
            while not self._done.wait(_POLL_S):
                value = self.committed(conn)
                if value != self.latest:
                    self.latest, self.changed_at = value, time.monotonic()

    def wait_for(self, events: int) -> tuple[int, float]:
        """Wait until `events` more seqs are committed or progress stalls; return the
        events committed meanwhile and when the last of them was seen."""
        while (self.latest - self.before < events
               and time.monotonic() - self.changed_at < _STALL_S):
            time.sleep(_POLL_S)
        self._done.set()
        self.join()
        return self.committed() - self.before, self.changed_at
