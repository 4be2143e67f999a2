"""Schema 7 (prune_points): up on a populated store keeps every row; the rows are
append-only outside retention's gate; down counts them as a loss (a pruned store no
longer verifies without them) and drops only them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from test_migration_origins import _populated

from auditd.store import migrations


def test_migration_7_up_and_down_on_a_populated_store(tmp_path: Path) -> None:
    conn = _populated(tmp_path / "auditd.db")
    migrations.migrate(conn, to=6)
    assert migrations.MIGRATIONS[6].version == 7
    assert migrations.migrate(conn, to=7) == ["applied 7 prune_points"]
    conn.execute("INSERT INTO prune_points VALUES (100, ?, 'text', 1, 100, 4096)",
                 (b"\0" * 96,))
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM prune_points")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE prune_points SET size = 5")
    steps = migrations.plan(conn, to=6)
    assert [(m.version, n) for m, n in migrations.losses(conn, steps)] == [
        (7, {"prune_points": 1})]
    assert migrations.migrate(conn, to=6) == ["rolled back 7 prune_points"]
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "prune_points" not in names
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 200
    assert migrations.migrate(conn, to=7) == ["applied 7 prune_points"]
