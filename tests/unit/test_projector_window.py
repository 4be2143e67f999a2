"""The rebuild window on a real SQLite file: whatever the order of the writer's batches
(new events, a dead letter re-committed below, inside or above the window) and the
rebuild's chunks, every event is counted exactly once."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from auditd.projections.projector import Projector
from auditd.store.connection import connect_sync
from auditd.store.migrations import migrate
from auditd.store.statements import EVENTS, insert_rows, transaction

HOUR = 3_600_000_000_000


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = connect_sync(tmp_path / "auditd.db")
    migrate(conn)
    conn.execute("INSERT INTO names (id, value) VALUES (1, 't'), (2, 'a'), (3, 'c')")
    yield conn
    conn.close()


def row(seq: int) -> tuple[Any, ...]:
    """An events-table row (statements.event_row's shape) of type 1, actor 2, comm 3."""
    return (seq, f"id-{seq}", seq, 10 * HOUR + seq, 0, 1, 2, None, None, None, None, None,
            None, None, 1, 1000, 1000, 3)


def commit(db: sqlite3.Connection, projector: Projector, seqs: list[int],
           checkpoint: int) -> None:
    """One writer batch, as Store._insert_batch runs it."""
    rows = [row(s) for s in seqs]
    with transaction(db):
        insert_rows(db, EVENTS, rows)
        projector.project(db, rows, checkpoint)
        db.execute("UPDATE meta SET value = ? WHERE key = 'committed_seq' AND value < ?",
                   (checkpoint, checkpoint))
    projector.committed(checkpoint)


def counted(db: sqlite3.Connection) -> tuple[int, int, int]:
    ((by_type,),) = db.execute("SELECT coalesce(sum(n), 0) FROM counts_by_type").fetchall()
    ((total, last_seq),) = db.execute(
        "SELECT coalesce(sum(total), 0), coalesce(max(last_seq), 0) FROM actor_summary")
    return int(by_type), int(total), int(last_seq)


def test_restores_and_new_batches_during_a_rebuild_are_counted_once(
        db: sqlite3.Connection) -> None:
    projector = Projector()
    assert projector.load(db) == []
    # Seqs 1..20 with 5, 12 and 18 dead-lettered (not in events).
    commit(db, projector, [s for s in range(1, 21) if s not in (5, 12, 18)], 20)
    assert counted(db) == (17, 17, 20)
    for name in ("counts_by_type", "actor_summary"):
        assert projector.begin_rebuild(db, name) == 20
        assert projector.count_hot(db, name, 1, 8)  # position 8
    commit(db, projector, [5], 0)  # re-committed below the position: the writer counts it
    commit(db, projector, [12], 0)  # inside the window: left to the rebuild
    commit(db, projector, [21, 22, 23], 23)  # new events past the window
    for name in ("counts_by_type", "actor_summary"):
        assert projector.count_hot(db, name, 9, 16)
    commit(db, projector, [18], 0)  # still inside the window
    for name in ("counts_by_type", "actor_summary"):
        assert projector.count_hot(db, name, 17, 20)
        assert projector.finish_rebuild(db, name) == 23
    assert counted(db) == (23, 23, 23)
    commit(db, projector, [24], 24)
    assert counted(db) == (24, 24, 24)
    states = dict(db.execute("SELECT name, position FROM projections"))
    assert states == {name: 24 for name in states}


def test_a_batch_straddling_the_window_is_split_by_seq(db: sqlite3.Connection) -> None:
    """Not a batch the writer sends (restores go one by one), but the rule holds for
    any: seqs below the position and past the window counted now, inside it later."""
    projector = Projector()
    projector.load(db)
    commit(db, projector, [s for s in range(1, 11) if s not in (3, 7)], 10)
    projector.begin_rebuild(db, "counts_by_type")
    assert projector.count_hot(db, "counts_by_type", 1, 4)  # 1, 2, 4
    commit(db, projector, [3, 7, 30, 31], 31)  # 3 below, 7 inside, 30 and 31 past it
    ((n,),) = db.execute("SELECT sum(n) FROM counts_by_type").fetchall()
    assert n == 3 + 3  # not 7: the rebuild counts it
    assert projector.count_hot(db, "counts_by_type", 5, 10)
    assert projector.finish_rebuild(db, "counts_by_type") == 31
    ((n,),) = db.execute("SELECT sum(n) FROM counts_by_type").fetchall()
    assert n == 12 == db.execute("SELECT count(*) FROM events").fetchone()[0]
