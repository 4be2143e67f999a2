"""Migration 5 (the Merkle log) on real SQLite files: up creates the tables and the host
id; a populated store of schema 4 gets its tree built from the stored records (as the
daemon does at start), equal to a tree built from the records by hand; down drops the
tables and nothing stored; up again is clean."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from auditd.proofs.ledger import Ledger
from auditd.proofs.merkle import root_of
from auditd.proofs.records import RecordSource
from auditd.store import migrations
from auditd.store.connection import connect_sync

TABLES = {"merkle_nodes", "merkle_edge", "checkpoints"}


def tables(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")}


def test_migration_5_up_builds_down_drops(tmp_path: Path) -> None:
    conn = connect_sync(tmp_path / "auditd.db")
    assert migrations.MIGRATIONS[4].version == 5
    migrations.migrate(conn, to=4)
    conn.execute("INSERT INTO names (value) VALUES ('t'), ('c')")
    for seq in range(1, 601):
        if seq % 100 == 0:  # a seq held by a dead letter
            conn.execute("INSERT INTO dead_letters (seq, source, code, reason, raw, size,"
                         " attempts, first_failed_at, last_failed_at)"
                         " VALUES (?, 'writer', 'x', 'y', x'00', 1, 1, 0, 0)", (seq,))
            continue
        conn.execute("INSERT INTO events (seq, id, id_hash, ts, received_at, type, pid, uid,"
                     " gid, comm) VALUES (?, ?, ?, 1, 1, 1, 1, 0, 0, 2)", (seq, f"e{seq}", seq))
    conn.execute("UPDATE meta SET value = 600 WHERE key = 'committed_seq'")
    before = tables(conn)
    assert migrations.migrate(conn, to=5) == ["applied 5 merkle"]
    assert tables(conn) == before | TABLES
    assert conn.execute("SELECT value FROM meta WHERE key = 'host_id'").fetchone()[0]
    ledger = Ledger(tmp_path / "partitions")
    ledger.load(conn)
    assert ledger.tree.size == 600
    source = RecordSource(conn, tmp_path / "partitions")
    leaves = [hashlib.sha256(b"\x00" + e).digest() for _, e in source.records(1, 600)]
    assert len(leaves) == 600
    assert ledger.tree.edge.root() == root_of(leaves)
    assert conn.execute("SELECT count(*) FROM merkle_nodes WHERE height = 8").fetchone() == (2,)
    assert migrations.migrate(conn, to=4) == ["rolled back 5 merkle"]
    assert tables(conn) == before
    assert conn.execute("SELECT value FROM meta WHERE key = 'host_id'").fetchone() is None
    assert conn.execute("SELECT count(*) FROM events").fetchone() == (594,)
    assert migrations.migrate(conn, to=5) == ["applied 5 merkle"]
    conn.close()
