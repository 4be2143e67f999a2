"""Sealing end to end: a daemon with small partitions seals its hot table into files,
releases the hot rows, and keeps idempotency and stream versions across partitions and
restarts."""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

from conftest import (
    DaemonProcess,
    RawConnection,
    catalogued,
    stored_seqs,
    stored_seqs_in,
    wait_committed,
    wait_sealed_through,
)

PARTITION = 500
SMALL = {"storage": {"partition_events": PARTITION}}


def send_events(conn: RawConnection, first: int, count: int, batch: int = 100,
                **fields: Any) -> list[dict[str, Any]]:
    replies = []
    for start in range(first, first + count, batch):
        events = [{"type": "test.sealed", "id": f"ev-{i}", "actor": f"user{i % 7}", **fields}
                  for i in range(start, min(start + batch, first + count))]
        replies.append(conn.request(events))
    return replies


def daemon_metrics(daemon: DaemonProcess) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(daemon.status_socket)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: auditd\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode()


def test_the_hot_table_is_sealed_into_partitions_and_released(make_daemon: Any) -> None:
    daemon = make_daemon(SMALL)
    with daemon.connect() as conn:
        replies = send_events(conn, 0, 1750)
    assert sum(r["ok"] for r in replies) == 1750
    wait_committed(daemon, 1750)
    wait_sealed_through(daemon, 1500)
    assert catalogued(daemon) == [
        (1, 500, "p000000000001-000000000500.db"),
        (501, 1000, "p000000000501-000000001000.db"),
        (1001, 1500, "p000000001001-000000001500.db")]
    hot = [int(seq) for (seq,) in daemon.query("SELECT seq FROM events ORDER BY seq")]
    assert hot == list(range(1501, 1751))
    assert stored_seqs(daemon) == {seq: f"ev-{seq - 1}" for seq in range(1, 1751)}
    assert [e for e in daemon.log_events() if e["event"] == "partition_sealed"]
    shown = subprocess.run([sys.executable, "-m", "auditd.cli", "status", "--config",
                            str(daemon.config_path)], capture_output=True, text=True)
    assert "partitions:   3 sealed through seq 1500, 250 hot events" in shown.stdout, shown
    metrics = daemon_metrics(daemon)
    assert "auditd_partitions 3.0" in metrics and "auditd_hot_events 250.0" in metrics


def test_a_duplicate_of_a_sealed_event_gets_its_original_seq_across_restarts(
        make_daemon: Any) -> None:
    daemon = make_daemon(SMALL)
    with daemon.connect() as conn:
        send_events(conn, 0, 1200)
    wait_committed(daemon, 1200)
    wait_sealed_through(daemon, 1000)
    for round_ in range(2):
        with daemon.connect() as conn:
            reply = conn.request([{"type": "test.sealed", "id": "ev-3"},  # sealed
                                  {"type": "test.sealed", "id": "ev-1100"},  # hot
                                  {"type": "test.sealed", "id": f"new-{round_}"}])
        assert reply["ok"] == 1, reply
        assert reply["duplicates"] == [[0, 4], [1, 1101]], reply
        daemon.restart()
    assert len(stored_seqs(daemon)) == 1202


def test_expect_holds_on_a_stream_whose_events_span_partitions(make_daemon: Any) -> None:
    daemon = make_daemon(SMALL)
    with daemon.connect() as conn:
        send_events(conn, 0, 1100, stream="orders/1")
        wait_committed(daemon, 1100)
        wait_sealed_through(daemon, 1000)
        daemon.restart()
    with daemon.connect() as conn:
        stale = conn.request({"type": "test.sealed", "stream": "orders/1", "expect": 900})
        assert stale["ok"] == 0 and stale["rejected"][0][1] == "conflict", stale
        assert "1100" in stale["rejected"][0][2]
        fresh = conn.request({"type": "test.sealed", "stream": "orders/1", "expect": 1100})
        assert fresh["ok"] == 1, fresh


def test_a_backup_holds_the_sealed_partitions_it_catalogues(make_daemon: Any) -> None:
    daemon = make_daemon(SMALL)
    with daemon.connect() as conn:
        send_events(conn, 0, 1100)
    wait_committed(daemon, 1100)
    wait_sealed_through(daemon, 1000)
    dest = daemon.root / "backup" / "auditd.db"
    dest.parent.mkdir()
    done = subprocess.run([sys.executable, "-m", "auditd.cli", "backup", "--config",
                           str(daemon.config_path), str(dest)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (dest.parent / "partitions").iterdir()) == [
        file for _, _, file in catalogued(daemon)]
    live = stored_seqs(daemon)  # and, after the copy, the backup's own admin event
    assert stored_seqs_in(dest) == {seq: i for seq, i in live.items() if seq <= 1100}

