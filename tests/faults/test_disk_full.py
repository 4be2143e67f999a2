"""Disk full: storage.path on a real 4 MB tmpfs, filled with a real file.

New frames are refused with `overloaded` naming the lack of space (overflow="reject")
or held without a reply (overflow="block"); once the filler is deleted ingestion
resumes by itself and every acknowledged event is in the database. Health names the
reason meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for, wait_held
from fault_helpers import (
    acked_seqs,
    assert_integrity_ok,
    assert_seq_gap_free,
    event_count,
    health,
    log_events_named,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

RESERVE = 256 * 1024
PAYLOAD = "x" * 200
# Events per frame on the full disk: over a page (4 KiB) of journal, so the write that
# meets the full disk is a short write into the segment's last, partly used page.
FULL_FRAME = 20


def free_bytes(path: Path) -> int:
    vfs = os.statvfs(path)
    return vfs.f_bavail * vfs.f_frsize


def fill(directory: Path, leave: int) -> Path:
    """Write a filler file until at most `leave` bytes are free (0: until ENOSPC)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while (room := free_bytes(directory) - leave) > 0:
            try:
                os.write(fd, b"\0" * min(65536, max(4096, room)))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def tmpfs_daemon(make_daemon: Any) -> Iterator[Callable[[str], Any]]:
    """Factory: a daemon whose storage.path is a fresh 4 MB tmpfs; unmounted after."""
    mounted: list[tuple[Any, Path]] = []

    def factory(overflow: str) -> Any:
        daemon = make_daemon({
            "storage": {"reserve_bytes": "256KB", "journal_segment_bytes": "1MB"},
            "buffer": {"overflow": overflow},
        }, start=False)
        daemon.storage.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                        str(daemon.storage)], check=True)
        mounted.append((daemon, daemon.storage))
        daemon.start()
        return daemon

    yield factory
    for daemon, path in mounted:
        with contextlib.suppress(Exception):
            daemon.stop()
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)  # never leak a mount


def names_the_disk(message: str, storage: Path) -> bool:
    """The refusal says why: no space (ENOSPC's own words) or the storage path."""
    text = message.lower()
    return "space" in text or "disk" in text or str(storage) in message


def assert_health_names_the_disk(daemon: Any) -> None:
    document = health(daemon)
    assert document["status"] in ("degraded", "failing"), document
    check = document["checks"]["ingest_accepting"]
    assert not check["ok"] and names_the_disk(check["detail"], daemon.storage), document
    assert not document["checks"]["disk_space"]["ok"], document


def nothing_to_read(conn: Any) -> bool:
    """No reply byte is waiting on the connection (it is still open)."""
    conn.sock.setblocking(False)
    try:
        conn.sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        conn.sock.settimeout(30)
    return False


def batch(prefix: str, start: int, count: int) -> list[dict[str, Any]]:
    return [{"type": "disk.test", "id": f"{prefix}{i}", "stream": "disk", "data": PAYLOAD}
            for i in range(start, start + count)]


def commit_a_first_batch(daemon: Any, conn: Any, acks: dict[str, int]) -> None:
    """200 events acknowledged and committed while the disk still has room."""
    events = batch("a", 0, 200)
    acks.update(acked_seqs(events, conn.request(events)))
    wait_for(lambda: event_count(daemon) == 200, 10, "the first commit")


def check_everything_acknowledged_is_stored(daemon: Any, acks: dict[str, int]) -> None:
    wait_for(lambda: event_count(daemon) == len(acks), 20, "every acknowledged event committed")
    assert daemon.stop() == 0
    assert dict(daemon.query("SELECT id, seq FROM events")) == acks
    assert assert_seq_gap_free(daemon) == (len(acks), set())
    stream = [row[0] for row in daemon.query("SELECT stream_seq FROM events ORDER BY seq")]
    assert stream == list(range(1, len(acks) + 1))
    assert_integrity_ok(daemon.db_path)


def test_full_disk_refuses_frames_with_the_reason_then_resumes(
        tmpfs_daemon: Callable[[str], Any]) -> None:
    daemon = tmpfs_daemon("reject")
    acks: dict[str, int] = {}
    with daemon.connect() as conn:
        commit_a_first_batch(daemon, conn, acks)

        # Fill the volume to the last byte: journal appends and SQLite writes both fail.
        filler = fill(daemon.storage, 0)
        sent = [200]

        def refused() -> dict[str, Any] | None:
            events = batch("a", sent[0], FULL_FRAME)
            reply = conn.request(events)
            if reply.get("error"):
                return reply
            acks.update(acked_seqs(events, reply))  # the file's last page still had room
            sent[0] += FULL_FRAME
            return None

        refusal = wait_for(refused, 10, "a refusal on the full disk", interval=0)
        n = sent[0]
        assert refusal["error"] == "overloaded" and refusal["ok"] == 0, refusal
        assert names_the_disk(refusal["message"], daemon.storage), refusal
        assert refusal.get("retry_after_ms", 0) > 0, refusal
        # It stays refused while the disk stays full, over a maintenance tick: the tick
        # that finds the volume below its reserve says so, and ingest refuses on.
        wait_for(lambda: any("disk space low" in (e.get("reason") or "") for e in
                             log_events_named(daemon, "ingest_refusing")),
                 10, "the maintenance tick to refuse for the disk")
        again = conn.request(batch("a", n, FULL_FRAME))
        assert again["error"] == "overloaded", again
        assert log_events_named(daemon, "ingest_refusing")
        assert daemon.running
        assert_health_names_the_disk(daemon)

        filler.unlink()
        # Ingestion resumes by itself: the same ids are sent until accepted.
        events = batch("a", n, FULL_FRAME)

        def accepted() -> dict[str, Any] | None:
            reply = conn.request(events)
            assert reply.get("error") in (None, "overloaded"), reply
            return None if reply.get("error") else reply

        reply = wait_for(accepted, 10, "ingestion to resume after space returned",
                         interval=0.1)
        acks.update(acked_seqs(events, reply))
        events = batch("b", 0, 300)
        acks.update(acked_seqs(events, conn.request(events)))
    assert log_events_named(daemon, "ingest_resumed")
    assert health(daemon)["checks"]["ingest_accepting"]["ok"]
    check_everything_acknowledged_is_stored(daemon, acks)


def test_disk_below_reserve_blocks_frames_until_space_returns(
        tmpfs_daemon: Callable[[str], Any]) -> None:
    daemon = tmpfs_daemon("block")
    acks: dict[str, int] = {}
    with daemon.connect() as conn:
        commit_a_first_batch(daemon, conn, acks)

        # Below the reserve but not full: the daemon itself must notice and hold back.
        filler = fill(daemon.storage, RESERVE // 2)
        assert 0 < free_bytes(daemon.storage) <= RESERVE // 2
        refusing = wait_for(lambda: log_events_named(daemon, "ingest_refusing"), 5,
                            "ingest_refusing in the log")
        assert str(daemon.storage) in refusing[0]["reason"], refusing[0]
        assert_health_names_the_disk(daemon)

        events = batch("b", 0, 10)
        conn.send(events)
        wait_held(daemon, 1)  # the daemon itself says the frame waits
        assert nothing_to_read(conn), "a frame was answered below the reserve"
        assert daemon.running
        filler.unlink()
        conn.sock.settimeout(10)
        reply = conn.recv()  # the held frame is answered once space is back
        assert reply["ok"] == 10, reply
        acks.update(acked_seqs(events, reply))
        events = batch("c", 0, 300)
        acks.update(acked_seqs(events, conn.request(events)))
    assert log_events_named(daemon, "ingest_resumed")
    assert health(daemon)["checks"]["ingest_accepting"]["ok"]
    check_everything_acknowledged_is_stored(daemon, acks)


def test_full_disk_blocks_frames_until_space_returns(
        tmpfs_daemon: Callable[[str], Any]) -> None:
    daemon = tmpfs_daemon("block")
    acks: dict[str, int] = {}
    with daemon.connect() as conn:
        commit_a_first_batch(daemon, conn, acks)
        filler = fill(daemon.storage, 0)
        # Pipelined frames: some may fit the journal file's last page; the rest wait.
        frames = [batch("b", i * 10, 10) for i in range(8)]
        for events in frames:
            conn.send(events)
        # A frame is held (so not every frame was answered), by the daemon's own count.
        wait_held(daemon, 1)
        assert daemon.running
        filler.unlink()
        conn.sock.settimeout(10)
        for events in frames:  # those before the held one, then the rest, in order
            reply = conn.recv()
            assert reply["ok"] == 10, reply
            acks.update(acked_seqs(events, reply))
    check_everything_acknowledged_is_stored(daemon, acks)
