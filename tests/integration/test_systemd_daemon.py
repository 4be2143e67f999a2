"""The daemon under systemd's protocols: socket activation and sd_notify, for real."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import aiohttp
import msgspec
import pytest
from conftest import DaemonProcess, RawConnection, wait_for

from auditd.ingest.framing import encode_frame

MakeDaemon = Callable[..., DaemonProcess]
T = TypeVar("T")


class NotifyListener:
    """The datagram socket systemd would own: collects what the daemon tells it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def collect(self, seconds: float) -> None:
        """Receive for up to `seconds`, returning after the first datagram."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self._record(data)
            return

    def _record(self, data: bytes) -> None:
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append((time.monotonic(), fields))

    def wait_until(self, found: Callable[[list[dict[str, str]]], T | None], what: str,
                   timeout: float = 30.0) -> T:
        """Receive until `found(messages so far, in order)` is not None; return it.

        One sender on one datagram socket: the order received is the order sent.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = found([fields for _, fields in self.messages])
            if result is not None:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout}s; got {self.messages}")
            self.collect(0.2)

    def drain(self) -> None:
        """Receive everything already queued (all a sender that has exited ever sent)."""
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    data = self.sock.recv(4096)
                except BlockingIOError:
                    return
                self._record(data)
        finally:
            self.sock.settimeout(0.2)

    def wait_for(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        def first(messages: list[dict[str, str]]) -> dict[str, str] | None:
            return next((fields for fields in messages if key in fields), None)
        return self.wait_until(first, key, timeout)

    def count(self, key: str, since: float = 0.0) -> int:
        return sum(1 for at, fields in self.messages if key in fields and at >= since)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(short_tmp: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(short_tmp / "notify.sock")
    yield listener
    listener.close()


def _hold_write_lock(db_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=10)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_ready_only_after_replay_then_stopping(make_daemon: MakeDaemon,
                                               notify: NotifyListener) -> None:
    daemon = make_daemon()
    # Journal 300 events the writer cannot commit, then crash: they must replay.
    lock = _hold_write_lock(daemon.db_path)
    try:
        with daemon.connect() as conn:
            reply = conn.request([{"type": "replayed", "id": f"r{i}"} for i in range(300)])
        assert reply["ok"] == 300
        daemon.kill()
    finally:
        lock.close()
    daemon.env = {"NOTIFY_SOCKET": notify.path}
    daemon.start(wait=False)
    ready = notify.wait_for("READY")
    assert ready["READY"] == "1"
    assert "last seq 300" in ready["STATUS"]  # replay had sequenced everything before READY
    lines = daemon.log_text()
    assert lines.rindex('"replay_finished"') < lines.rindex('"daemon_ready"')
    daemon.wait_ready()
    assert daemon.stop() == 0
    notify.drain()  # the daemon has exited: all it sent is queued
    assert notify.count("STOPPING") == 1
    assert daemon.query("SELECT count(*) FROM events")[0][0] == 300


def pings_between_degraded_statuses(messages: list[dict[str, str]]) -> int | None:
    """WATCHDOG pings between the 2nd and 3rd STATUS messages saying "degraded" in a row.

    The daemon sends STATUS every 2 s and, unless it withholds them, a ping at least
    every 1 s (WATCHDOG_USEC=2 s): so between two STATUS messages at least one ping is
    due. By the 2nd degraded STATUS the writer has been stuck for over 2 s, past the
    1 s stall bound, so between it and the next none may come. None until then.
    """
    degraded, pings = 0, 0
    for fields in messages:
        if "STATUS" in fields:
            degraded = degraded + 1 if fields["STATUS"].startswith("degraded") else 0
            if degraded == 3:
                return pings
            pings = 0
        elif "WATCHDOG" in fields:
            pings += 1
    return None


def test_watchdog_pings_stop_while_the_writer_is_stalled(make_daemon: MakeDaemon,
                                                         notify: NotifyListener) -> None:
    # WatchdogSec=2s: pings every 1 s; a writer without progress for 1 s stops them.
    daemon = make_daemon({"writer": {"retry_max_delay": "1s"}},
                         env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000"})
    notify.wait_until(lambda m: sum("WATCHDOG" in f for f in m) >= 2 or None, "two pings")
    lock = _hold_write_lock(daemon.db_path)
    try:
        with daemon.connect() as conn:
            assert conn.request({"type": "stuck"})["ok"] == 1  # journaled, not committed
        # Counted in the daemon's own messages, not in seconds watched.
        withheld = notify.wait_until(pings_between_degraded_statuses,
                                     "three degraded STATUS messages in a row")
        assert withheld == 0, notify.messages
        stalled_until = len(notify.messages)
    finally:
        lock.close()
    # Pings come back once the writer commits again (its retries are at most 1 s apart).
    notify.wait_until(lambda m: any("WATCHDOG" in f for f in m[stalled_until:]) or None,
                      "a ping after the lock was released")


def test_reload_is_announced(make_daemon: MakeDaemon, notify: NotifyListener) -> None:
    daemon = make_daemon(env={"NOTIFY_SOCKET": notify.path})
    notify.wait_for("READY")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING")
    assert reloading["RELOADING"] == "1" and "MONOTONIC_USEC" in reloading


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate absent")
def test_socket_activation_serves_both_inherited_sockets(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon(start=False)
    ingest, status = daemon.ingest_socket, daemon.status_socket
    log = daemon.log_path.open("ab")
    activator = subprocess.Popen(
        ["systemd-socket-activate", f"--listen={ingest}", f"--listen={status}",
         "--fdname=ingest:status", f"--setenv=PYTHONPATH={os.pathsep.join(sys.path)}",
         *daemon.command()], stdout=log, stderr=log)
    log.close()
    try:
        # It says so once each socket listens (bind alone would refuse a connect).
        wait_for(lambda: all(f"Listening on {path} as" in daemon.log_text()
                             for path in (ingest, status)), 10, "the activator to listen")
        # The first connection starts the daemon; it is queued, never refused.
        conn = RawConnection(ingest)
        try:
            conn.send_raw(encode_frame(msgspec.msgpack.encode(
                {"type": "activated", "actor": "systemd"})))
            assert conn.recv() == {"ok": 1, "first": 1, "last": 1}
        finally:
            conn.close()
        health = _get(status, "/health")
        assert health["status"] == "ok"
        assert "stale_socket_replaced" not in daemon.log_text()  # it bound nothing itself
    finally:
        activator.send_signal(signal.SIGTERM)
        assert activator.wait(30) == 0
    assert daemon.query("SELECT type FROM events_view") == [("activated",)]


def _get(socket_path: str, path: str) -> dict[str, object]:
    import asyncio

    async def fetch() -> dict[str, object]:
        connector = aiohttp.UnixConnector(path=socket_path)
        async with (aiohttp.ClientSession(connector=connector) as session,
                    session.get(f"http://auditd{path}") as response):
            document: dict[str, object] = await response.json()
            return document

    return asyncio.run(fetch())
