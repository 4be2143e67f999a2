"""SQLite errors that retrying cannot cure, made real under a running daemon.

- Damage: bytes flipped in pages of the live database file (the events table's root
  page: SQLITE_CORRUPT; the file header: SQLITE_NOTADB), after the WAL was checkpointed
  into the file so that the writer must read them.
- Read-only: the database file made immutable (`chattr +i`: chmod does not stop root)
  and the daemon restarted on it, so its connections open it read-only
  (SQLITE_READONLY). A connection that is already open keeps writing a file that turns
  immutable through its WAL, and then meets I/O errors, which are transient.
- A broken schema under the dead-letter path: a trigger on `dead_letters` naming a
  table that does not exist (SQLITE_ERROR), reached through `_commit_rejects`.

Each time: health `failing` naming the error, one log line however many retries,
events still acknowledged (the journal holds them), and everything acknowledged stored
once the cause is gone (after a restart, which sets a damaged file aside).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from conftest import FAST_RETRY, DaemonProcess, wait_for
from fault_helpers import (
    acked_seqs,
    assert_seq_gap_free,
    event_count,
    health,
    log_events_named,
    status_request,
)


def events(prefix: str, count: int) -> list[dict[str, Any]]:
    return [{"type": "sqlite.test", "id": f"{prefix}{i}", "stream": "s"} for i in range(count)]


def commit_failures(daemon: DaemonProcess) -> int:
    return int(status_request(daemon, "GET", "/stats")[1]["commit_failures"])


def failing_check(daemon: DaemonProcess, name: str) -> dict[str, Any] | None:
    document = health(daemon)
    return document if not document["checks"][name]["ok"] else None


def checkpoint_into_the_file(daemon: DaemonProcess) -> None:
    """Every committed page copied into the database file and the WAL emptied, so the
    writer's next transaction reads the file (its cache is reset by the WAL's change)."""
    conn = sqlite3.connect(daemon.db_path, isolation_level=None, timeout=10)
    try:
        def truncated() -> bool:
            return bool(conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0)

        wait_for(truncated, 20, "a complete TRUNCATE checkpoint")
    finally:
        conn.close()


def flip_page(daemon: DaemonProcess, page: str) -> None:
    with daemon.db() as conn:
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'events'").fetchone()
    conn.close()
    number = root if page == "events" else 1
    with daemon.db_path.open("r+b") as handle:
        handle.seek((number - 1) * 4096)
        handle.write(b"\xff" * 16)


@pytest.mark.parametrize(("page", "code"), [("events", "SQLITE_CORRUPT"),
                                            ("header", "SQLITE_NOTADB")])
def test_a_database_damaged_under_the_daemon_fails_health_and_loses_nothing(
        make_daemon: Callable[..., DaemonProcess], page: str, code: str) -> None:
    daemon = make_daemon(FAST_RETRY)
    acks: dict[str, int] = {}
    with daemon.connect() as conn:
        first = events("a", 50)
        acks.update(acked_seqs(first, conn.request(first)))
        wait_for(lambda: event_count(daemon) == 50, 20, "the first commit")
        checkpoint_into_the_file(daemon)
        flip_page(daemon, page)
        later = events("b", 30)
        acks.update(acked_seqs(later, conn.request(later)))  # the journal has them

    document = wait_for(lambda: failing_check(daemon, "database_intact"), 30,
                        "health to show the damage")
    assert document["status"] == "failing", document
    intact = document["checks"]["database_intact"]
    assert intact["severity"] == "failing" and code in intact["detail"], intact
    writable = document["checks"]["database_writable"]
    assert not writable["ok"] and writable["severity"] == "failing", writable
    assert code in writable["detail"], writable

    # Retried slowly, said once: several attempts, one line.
    wait_for(lambda: commit_failures(daemon) >= 5, 30, "five failed attempts")
    (faulted,) = log_events_named(daemon, "database_faulted")
    assert (faulted["code"], faulted["damaged"]) == (code, True), faulted
    assert not log_events_named(daemon, "commit_failing")  # not called transient
    assert len(log_events_named(daemon, "maintenance_failed")) <= 1  # no flood either

    # The stop gives up on the unusable file at once; the journal keeps the events.
    assert daemon.stop() == 0
    (abandoned,) = log_events_named(daemon, "writer_abandoned")
    assert abandoned["pending"] == 30, abandoned

    daemon.start()  # the start-up check sets the file aside; the journal replays
    (damaged,) = log_events_named(daemon, "database_damaged")
    assert ".damaged-" in damaged["moved_to"], damaged
    wait_for(lambda: event_count(daemon) == len(acks), 30, "the replay into a fresh file")
    assert daemon.stop() == 0
    assert dict(daemon.query("SELECT id, seq FROM events")) == acks
    assert assert_seq_gap_free(daemon) == (len(acks), set())


def immutable(path: os.PathLike[str], on: bool) -> bool:
    flag = "+i" if on else "-i"
    return subprocess.run(["chattr", flag, os.fspath(path)], check=False,
                          capture_output=True).returncode == 0


def test_a_read_only_database_fails_health_and_the_journal_keeps_what_was_acknowledged(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    if os.geteuid() != 0:
        pytest.skip("chattr +i needs root")
    daemon = make_daemon(FAST_RETRY)
    acks: dict[str, int] = {}
    with daemon.connect() as conn:
        first = events("a", 20)
        acks.update(acked_seqs(first, conn.request(first)))
    wait_for(lambda: event_count(daemon) == 20, 20, "the first commit")
    assert daemon.stop() == 0
    if not immutable(daemon.db_path, True):
        pytest.skip(f"chattr +i is not supported on {daemon.db_path.parent}")
    try:
        daemon.start()
        with daemon.connect() as conn:
            later = events("b", 30)
            acks.update(acked_seqs(later, conn.request(later)))
        document = wait_for(lambda: failing_check(daemon, "database_writable"), 30,
                            "health to show the read-only database")
        assert document["status"] == "failing", document
        writable = document["checks"]["database_writable"]
        assert writable["severity"] == "failing", writable
        assert "SQLITE_READONLY" in writable["detail"], writable
        assert document["checks"]["database_intact"]["ok"], document  # not damaged
        wait_for(lambda: commit_failures(daemon) >= 5, 30, "five failed attempts")
        (faulted,) = log_events_named(daemon, "database_faulted")
        assert (faulted["code"], faulted["damaged"]) == ("SQLITE_READONLY", False), faulted
        assert daemon.stop() == 0
    finally:
        immutable(daemon.db_path, False)
    daemon.start()  # writable again: the journal replays what was acknowledged
    wait_for(lambda: event_count(daemon) == len(acks), 30, "the replay")
    assert daemon.stop() == 0
    assert dict(daemon.query("SELECT id, seq FROM events")) == acks
    assert assert_seq_gap_free(daemon) == (len(acks), set())


POISON_TRIGGER = (
    "CREATE TRIGGER poison BEFORE INSERT ON events"
    " WHEN NEW.type = (SELECT id FROM names WHERE value = 'poison.event')"
    " BEGIN SELECT RAISE(ABORT, 'poisoned'); END")
BROKEN_TRIGGER = (
    "CREATE TRIGGER broken AFTER INSERT ON dead_letters"
    " BEGIN INSERT INTO no_such_table VALUES (1); END")


def schema_change(daemon: DaemonProcess, *statements: str) -> None:
    conn = sqlite3.connect(daemon.db_path, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for statement in statements:
            conn.execute(statement)
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_dead_letters_the_database_cannot_take_fail_health_and_are_said_once(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    """A batch with a poison event and a rejected one: the rejects are committed alone
    first (_commit_rejects), and meet a broken schema there."""
    daemon = make_daemon(FAST_RETRY)
    with daemon.connect() as conn:
        warm = events("w", 5)
        acks = acked_seqs(warm, conn.request(warm))
        wait_for(lambda: event_count(daemon) == 5, 20, "the first commit")
        schema_change(daemon, "INSERT INTO names (value) VALUES ('poison.event')",
                      POISON_TRIGGER, BROKEN_TRIGGER)
        frame = [{"type": "poison.event", "id": "p0"}, {"type": "normal", "actor": 7},
                 {"type": "normal", "id": "n0"}]
        reply = conn.request(frame)
        assert reply["ok"] == 2 and [r[0] for r in reply["rejected"]] == [1], reply

    document = wait_for(lambda: failing_check(daemon, "database_writable"), 30,
                        "health to show the broken dead-letter path")
    writable = document["checks"]["database_writable"]
    assert writable["severity"] == "failing" and "no_such_table" in writable["detail"]
    wait_for(lambda: commit_failures(daemon) >= 5, 30, "five failed attempts")
    (faulted,) = log_events_named(daemon, "database_faulted")
    assert faulted["dead_letters"] == 1 and faulted["events"] == 0, faulted

    schema_change(daemon, "DROP TRIGGER broken")  # the cause removed: it drains by itself
    wait_for(lambda: event_count(daemon) == 6, 30, "the neighbour committed")
    wait_for(lambda: health(daemon)["checks"]["database_writable"]["ok"], 10,
             "the fault to clear")
    (recovered,) = log_events_named(daemon, "commit_recovered")
    assert recovered["after"] == "SQLITE_ERROR", recovered
    assert daemon.stop() == 0
    dead = daemon.query("SELECT source, code, seq FROM dead_letters ORDER BY dlq_id")
    assert dead == [("ingest", "invalid", None), ("writer", "commit_failed", 6)], dead
    assert daemon.query("SELECT id FROM events WHERE seq = 7") == [("n0",)]
    assert dict(daemon.query("SELECT id, seq FROM events WHERE seq <= 5")) == acks
