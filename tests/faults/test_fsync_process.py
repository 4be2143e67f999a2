"""The fsync child process under faults: killed under load, and outliving no daemon."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from conftest import DaemonProcess, wait_committed, wait_for


def fsync_pids(daemon: DaemonProcess) -> list[int]:
    return [e["pid"] for e in daemon.log_events() if e["event"] == "fsync_process_started"]


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie left to whoever reaps orphans here."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_a_killed_fsync_process_is_replaced_and_every_event_is_acknowledged(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon({"ingest": {"durability": "fsync"}})
    replies = []
    with daemon.connect() as conn:
        for i in range(60):
            if i == 30:
                (first,) = fsync_pids(daemon)
                os.kill(first, signal.SIGKILL)
            replies.append(conn.request({"type": "k", "id": f"k{i}"}))
    assert replies == [{"ok": 1, "first": i, "last": i} for i in range(1, 61)]
    pids = fsync_pids(daemon)
    assert len(pids) == 2 and pids[0] == first and gone(first)
    exited = [e for e in daemon.log_events() if e["event"] == "fsync_process_exited"]
    assert [(e["pid"], e["returncode"]) for e in exited] == [(first, -signal.SIGKILL)]
    wait_committed(daemon, 60)
    assert daemon.query("SELECT count(*) FROM events") == [(60,)]


def test_the_fsync_process_ends_with_the_daemon(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon({"ingest": {"durability": "fsync"}})
    with daemon.connect() as conn:
        assert conn.request({"type": "e"}) == {"ok": 1, "first": 1, "last": 1}
    (pid,) = fsync_pids(daemon)
    daemon.stop()
    assert not Path(f"/proc/{pid}").exists()  # reaped by the daemon at its stop

    daemon.start()
    with daemon.connect() as conn:
        assert conn.request({"type": "e"}) == {"ok": 1, "first": 2, "last": 2}
    (_, pid) = fsync_pids(daemon)
    daemon.kill()  # SIGKILL: the child sees its socket close and exits by itself
    assert wait_for(lambda: gone(pid), timeout=10, what="the fsync process to exit")
