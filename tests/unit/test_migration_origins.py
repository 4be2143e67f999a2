"""Schema 6 (event_origins): up on a populated store keeps every row; down drops only
the origins, and up again takes them anew."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from auditd.store import migrations
from auditd.store.connection import connect_sync


def _populated(path: Path) -> sqlite3.Connection:
    conn = connect_sync(path)
    migrations.migrate(conn, to=5)
    conn.execute("INSERT INTO names (value) VALUES ('t'), ('c')")
    conn.executemany(
        "INSERT INTO events (seq, id, id_hash, ts, received_at, type, pid, uid, gid, comm)"
        " VALUES (?, ?, ?, 1, 2, 1, 3, 4, 5, 2)", [(s, f"id-{s}", s) for s in range(1, 201)])
    return conn


def test_migration_6_up_and_down_on_a_populated_store(tmp_path: Path) -> None:
    conn = _populated(tmp_path / "auditd.db")
    assert migrations.MIGRATIONS[5].version == 6
    assert migrations.migrate(conn, to=6) == ["applied 6 origins"]
    conn.execute("INSERT INTO event_origins VALUES (7, 'web-1', 70, 123)")
    with pytest.raises(sqlite3.IntegrityError):  # an origin is imported once
        conn.execute("INSERT INTO event_origins VALUES (8, 'web-1', 70, 123)")
    steps = migrations.plan(conn, to=5)
    assert [(d, m.version) for d, m in steps] == [("down", 6)]
    assert [(m.version, n) for m, n in migrations.losses(conn, steps)] == [
        (6, {"event_origins": 1})]
    assert migrations.migrate(conn, to=5) == ["rolled back 6 origins"]
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "event_origins" not in names
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 200
    migrations.migrate(conn)
    assert conn.execute("SELECT count(*) FROM event_origins").fetchone()[0] == 0
    conn.close()
