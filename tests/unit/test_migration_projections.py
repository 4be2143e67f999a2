"""Migration 4 (projections) on real SQLite files: up on an empty store leaves every
projection live at 0; up on a populated one leaves each rebuilding through the
checkpoint; down drops exactly its tables and nothing stored; up again is clean."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from auditd.projections.definitions import PROJECTIONS
from auditd.store import migrations
from auditd.store.connection import connect_sync

TABLES = {"projections", "counts_by_type", "counts_by_actor", "counts_by_uid",
          "counts_by_comm", "actor_summary"}


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = connect_sync(tmp_path / "auditd.db")
    yield connection
    connection.close()


def tables(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")}


def states(conn: sqlite3.Connection) -> dict[str, tuple[int, str, int, int | None]]:
    return {name: (version, state, position, through) for name, version, state, position,
            through in conn.execute("SELECT name, version, state, position, rebuild_through"
                                    " FROM projections")}


def test_the_version_is_4() -> None:
    assert migrations.MIGRATIONS[3].version == 4
    assert migrations.MIGRATIONS[3].name == "projections"
    assert migrations.MIGRATIONS[3].down_deletes == ()  # derived rows only


def test_up_on_an_empty_store_leaves_every_projection_live(conn: sqlite3.Connection) -> None:
    migrations.migrate(conn)
    assert tables(conn) >= TABLES
    assert states(conn) == {p.name: (1, "live", 0, None) for p in PROJECTIONS}
    assert {p.version for p in PROJECTIONS} == {1}


def test_up_on_a_populated_store_rebuilds_through_the_checkpoint_and_down_keeps_events(
        conn: sqlite3.Connection) -> None:
    migrations.migrate(conn, to=3)
    conn.execute("INSERT INTO names (value) VALUES ('t'), ('c')")
    for seq in range(1, 6):
        conn.execute("INSERT INTO events (seq, id, id_hash, ts, received_at, type, pid, uid,"
                     " gid, comm) VALUES (?, ?, ?, 1, 1, 1, 1, 0, 0, 2)", (seq, f"e{seq}", seq))
    conn.execute("UPDATE meta SET value = 5 WHERE key = 'committed_seq'")
    before = tables(conn)
    assert migrations.migrate(conn, to=4) == ["applied 4 projections"]
    assert states(conn) == {p.name: (1, "rebuilding", 0, 5) for p in PROJECTIONS}
    assert tables(conn) == before | TABLES
    assert migrations.migrate(conn, to=3) == ["rolled back 4 projections"]
    assert tables(conn) == before
    assert conn.execute("SELECT count(*) FROM events").fetchone() == (5,)
    assert migrations.losses(conn, migrations.plan(conn, 3)) == []
    migrations.migrate(conn)
    assert states(conn)["counts_by_type"] == (1, "rebuilding", 0, 5)
