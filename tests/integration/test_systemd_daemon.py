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

import aiohttp
import msgspec
import pytest
from conftest import DaemonProcess, RawConnection

from auditd.ingest.framing import encode_frame

MakeDaemon = Callable[..., DaemonProcess]


class NotifyListener:
    """The datagram socket systemd would own: collects what the daemon tells it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def collect(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, fields in self.messages:
                if key in fields:
                    return fields
            self.collect(0.2)
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")

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
    notify.collect(0.5)
    assert notify.count("STOPPING") == 1
    assert daemon.query("SELECT count(*) FROM events")[0][0] == 300


def test_watchdog_pings_stop_while_the_writer_is_stalled(make_daemon: MakeDaemon,
                                                         notify: NotifyListener) -> None:
    # WatchdogSec=2s: pings every 1 s; a writer without progress for 1 s stops them.
    # Retries at most 1 s apart, so that the writer is back within the 3 s watched after
    # the lock goes (at the default 5 s, a retry just before the release came too late).
    daemon = make_daemon({"writer": {"retry_max_delay": "1s"}},
                         env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000"})
    notify.collect(2.5)
    assert notify.count("WATCHDOG") >= 2, notify.messages
    lock = _hold_write_lock(daemon.db_path)
    try:
        with daemon.connect() as conn:
            assert conn.request({"type": "stuck"})["ok"] == 1  # journaled, not committed
        # Past the 1 s stall bound plus one 0.5 s maintenance tick, draining earlier pings.
        notify.collect(2.0)
        stalled_from = time.monotonic()
        notify.collect(3.0)
        assert notify.count("WATCHDOG", since=stalled_from) == 0, notify.messages
    finally:
        lock.close()
    resumed_from = time.monotonic()
    notify.collect(3.0)
    assert notify.count("WATCHDOG", since=resumed_from) >= 1


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
        deadline = time.monotonic() + 10
        while not os.path.exists(status):
            assert time.monotonic() < deadline, "activator never bound the sockets"
            time.sleep(0.02)
        time.sleep(0.2)
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
