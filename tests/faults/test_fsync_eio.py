"""A journal fdatasync that really fails with EIO (a FUSE filesystem the test controls).

The daemon runs in fsync mode with its journal directory on eio_fs.py's pass-through,
whose failed fsync also drops what was written since the file's last good sync, as the
kernel drops the pages of a failed writeback. While the database is locked (so the
journal is the events' only copy), fsync is switched to EIO. What must hold:

- no `ok` reply covers an event of the failed sync before the database has it on disk
  (checked, at each reply, in the database file itself, without its WAL);
- health says `failing`, naming the failed sync; new frames are refused `overloaded`
  with the same reason until a new segment synced;
- one `journal_sync_failed` line for the fault, however many fsyncs failed meanwhile;
- every acknowledged event is stored, after the fault clears and after a restart.
"""

from __future__ import annotations

import shutil
import socket
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import FAST_RETRY, DaemonProcess, RawConnection, wait_for, write_lock
from eio_fs import EioMount, unavailable
from fault_helpers import acked_seqs, assert_seq_gap_free, health, log_events_named

from auditd.ingest.framing import encode_frame

_WHY_NOT = unavailable()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))

HELD_FRAMES = 20


@pytest.fixture
def eio_daemon(make_daemon: Callable[..., DaemonProcess]) -> Iterator[tuple[DaemonProcess,
                                                                            EioMount]]:
    """A fsync-mode daemon whose journal directory is the FUSE pass-through."""
    daemon = make_daemon({**FAST_RETRY, "ingest": {"durability": "fsync"},
                          "buffer": {"overflow": "reject"}}, start=False)
    mount = EioMount(daemon.root / "journal-backing", daemon.storage / "journal",
                     daemon.root / "eio")
    mount.mount()
    try:
        daemon.start()
        yield daemon, mount
    finally:
        daemon.stop()
        mount.unmount()


def event(name: str) -> dict[str, Any]:
    return {"type": "eio.test", "id": name, "stream": "eio"}


def in_database_file(daemon: DaemonProcess, ids: list[str]) -> bool:
    """Whether the database file itself (not its WAL: a checkpoint copied them) holds
    these ids: what the daemon promised with an `ok` once the journal failed."""
    scratch = Path(tempfile.mkdtemp(dir="/tmp", prefix="adtdb"))
    try:
        copy = scratch / "main.db"
        shutil.copyfile(daemon.db_path, copy)  # the main file alone: no -wal beside it
        conn = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
        try:
            marks = ",".join("?" * len(ids))
            (found,) = conn.execute(
                f"SELECT count(*) FROM events WHERE id IN ({marks})", ids).fetchone()
        finally:
            conn.close()
        return bool(found == len(ids))
    except sqlite3.DatabaseError:  # copied while a checkpoint wrote: look again
        return False
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def has_reply(conn: RawConnection) -> bool:
    """Whether the daemon has sent anything on this connection yet (no waiting)."""
    timeout = conn.sock.gettimeout()
    conn.sock.setblocking(False)  # with a timeout, Python would wait for data first
    try:
        return bool(conn.sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    finally:
        conn.sock.settimeout(timeout)


def test_a_failed_fsync_acknowledges_only_what_the_database_holds_on_disk(
        eio_daemon: tuple[DaemonProcess, EioMount], request: pytest.FixtureRequest) -> None:
    daemon, mount = eio_daemon
    acks: dict[str, int] = {}
    with daemon.connect() as conn:
        for i in range(20):  # the journal works: acknowledged by its syncs
            acks.update(acked_seqs([event(f"a{i}")], conn.request(event(f"a{i}"))))
    wait_for(lambda: daemon.query("SELECT count(*) FROM events") == [(20,)], 20,
             "the first events committed")

    held = [event(f"h{i}") for i in range(HELD_FRAMES)]
    conn, other = daemon.connect(), daemon.connect()
    with write_lock(daemon):
        mount.fail("fsync")  # and the database cannot commit: the journal is all there is
        conn.send_raw(b"".join(encode_frame(msgspec.msgpack.encode(e)) for e in held))

        def journal_failing() -> dict[str, Any] | None:
            document = health(daemon)
            check = document["checks"]["journal_writable"]
            return document if not check["ok"] else None

        document = wait_for(journal_failing, 30, "health to show the failed sync")
        assert document["status"] == "failing", document
        reason = document["checks"]["journal_writable"]["detail"]
        assert "fdatasync" in reason and "Input/output error" in reason, reason
        assert document["checks"]["journal_writable"]["severity"] == "failing"

        refused = other.request(event("refused"))
        assert refused["error"] == "overloaded" and "fdatasync" in refused["message"], refused

        # Fresh segments keep failing while the device does: one line all the same.
        wait_for(lambda: len(mount.failures()) >= 3, 30, "three failed fsyncs")
        mount.fail("fsync", on=False)
        (recovered,) = wait_for(lambda: log_events_named(daemon, "journal_sync_recovered"),
                                30, "the journal to prove a new segment")
        # The frames journaled before the sync failed are held; the scheduler may run
        # the rest in a later slice, once ingest refuses: those wait, blocked, unread.
        assert 1 <= recovered["held_replies"] <= HELD_FRAMES, recovered
        assert not has_reply(conn)  # held: the events are in no durable place yet

        # A new segment synced: the journal acknowledges new events again by itself,
        # while the database is still locked.
        wait_for(lambda: health(daemon)["checks"]["journal_writable"]["ok"], 10,
                 "the journal fault to clear")
        fresh = other.request(event("fresh"))
        acks.update(acked_seqs([event("fresh")], fresh))
    # The lock is released: the writer commits, a checkpoint makes it durable, and
    # only then do the held replies go out, each `ok` for events the file holds.
    other.close()
    resend = [event("refused")]
    with conn:
        for item in held:
            reply = conn.recv()
            if reply.get("error") == "overloaded":  # run after the failure: refused
                resend.append(item)
                continue
            assert reply.get("ok") == 1, reply
            assert in_database_file(daemon, [item["id"]]), (
                f"{item['id']} acknowledged before the database had it on disk")
            acks.update(acked_seqs([item], reply))
    assert len(resend) == 1 + HELD_FRAMES - recovered["held_replies"], resend
    with daemon.connect() as again:  # the refused ones, resent
        for item in resend:
            acks.update(acked_seqs([item], again.request(item)))

    (failed,) = log_events_named(daemon, "journal_sync_failed")
    assert failed["errno"] == 5, failed
    assert failed["first_seq"] <= acks["h0"] <= failed["last_seq"], (failed, acks)
    assert failed["segment"].endswith(".journal"), failed

    wait_for(lambda: daemon.query("SELECT count(*) FROM events") == [(len(acks),)], 20,
             "every acknowledged event committed")
    daemon.restart()
    assert dict(daemon.query("SELECT id, seq FROM events")) == acks
    assert assert_seq_gap_free(daemon) == (len(acks), set())
