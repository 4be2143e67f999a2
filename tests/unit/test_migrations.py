"""Migrations on real SQLite files: up, down, re-run no-op, append-only triggers."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from auditd.schema import hash64, id_hash, uuid7
from auditd.store import migrations
from auditd.store.connection import connect_sync
from auditd.store.migrations import deferred, guard

TABLES = {"names", "events", "streams", "meta", "dead_letters"}


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = connect_sync(tmp_path / "auditd.db")
    yield connection
    connection.close()


def tables(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")}


def insert_event(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("INSERT INTO names (value) VALUES ('t') ON CONFLICT DO NOTHING")
    conn.execute(
        "INSERT INTO events (seq, id, id_hash, ts, received_at, type, pid, uid, gid, comm)"
        " VALUES (?, ?, ?, 1, 1, 1, 1, 0, 0, 1)", (seq, f"id-{seq}", seq))


def test_fresh_database_has_nothing_applied(conn: sqlite3.Connection) -> None:
    assert migrations.applied(conn) == []
    assert [m.version for m in migrations.pending(conn)] == [
        m.version for m in migrations.MIGRATIONS]
    assert tables(conn) == set()  # applied()/pending() are read-only


def test_migrate_up_creates_the_schema_and_records_it(conn: sqlite3.Connection) -> None:
    actions = migrations.migrate(conn)
    assert actions == [f"applied {m.version} {m.name}" for m in migrations.MIGRATIONS]
    assert migrations.applied(conn) == [m.version for m in migrations.MIGRATIONS]
    assert migrations.pending(conn) == []
    assert TABLES | {"schema_migrations"} <= tables(conn)
    assert conn.execute("SELECT value FROM meta WHERE key='committed_seq'").fetchone() == (0,)
    indexes = {row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='events'")}
    # Schema 3: the hot table keeps only the id key's index; filters are the sealed
    # partitions' (and the hot index's, in memory).
    assert indexes == {"events_id_hash"}
    assert "partitions" in tables(conn)
    (name, applied_at), = conn.execute(
        "SELECT name, applied_at FROM schema_migrations WHERE version = 1").fetchall()
    assert name == "initial" and applied_at > 0


def test_rerunning_is_a_no_op(conn: sqlite3.Connection) -> None:
    migrations.migrate(conn)
    insert_event(conn, 1)
    before = conn.execute("SELECT * FROM schema_migrations").fetchall()
    assert migrations.migrate(conn) == []
    assert conn.execute("SELECT * FROM schema_migrations").fetchall() == before
    assert conn.execute("SELECT count(*) FROM events").fetchone() == (1,)


def test_migrate_down_to_zero_and_up_again(conn: sqlite3.Connection) -> None:
    migrations.migrate(conn)
    actions = migrations.migrate(conn, to=0)
    assert actions == [f"rolled back {m.version} {m.name}"
                       for m in reversed(migrations.MIGRATIONS)]
    assert migrations.applied(conn) == []
    assert tables(conn) == {"schema_migrations"}
    assert migrations.migrate(conn, to=0) == []
    migrations.migrate(conn)
    assert tables(conn) >= TABLES
    assert migrations.applied(conn) == [m.version for m in migrations.MIGRATIONS]


def test_unknown_target_version_is_refused(conn: sqlite3.Connection) -> None:
    with pytest.raises(ValueError, match="no schema version"):
        migrations.migrate(conn, to=migrations.LATEST + 1)
    with pytest.raises(ValueError, match="no schema version"):
        migrations.migrate(conn, to=-1)


def test_a_failing_migration_leaves_nothing_behind(conn: sqlite3.Connection,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    broken = migrations.Migration(1, "initial", (
        "CREATE TABLE half_done (x)", "THIS IS NOT SQL"), ())
    monkeypatch.setattr(migrations, "MIGRATIONS", (broken,))
    with pytest.raises(sqlite3.OperationalError):
        migrations.migrate(conn)
    assert migrations.applied(conn) == []
    assert "half_done" not in tables(conn)  # the migration and its row: one transaction


def test_events_refuse_update_and_delete(conn: sqlite3.Connection) -> None:
    migrations.migrate(conn)
    insert_event(conn, 1)
    insert_event(conn, 2)
    with pytest.raises(sqlite3.IntegrityError, match="events are append-only"):
        conn.execute("UPDATE events SET actor = 5 WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="events are append-only"):
        conn.execute("DELETE FROM events WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="events are append-only"):
        conn.execute("DELETE FROM events")
    assert conn.execute("SELECT seq, actor FROM events ORDER BY seq").fetchall() == [
        (1, None), (2, None)]


def test_only_the_retention_gate_allows_delete_and_never_update(
        conn: sqlite3.Connection) -> None:
    migrations.migrate(conn)
    insert_event(conn, 1)
    insert_event(conn, 2)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE meta SET value = 1 WHERE key = 'retention_gate'")
    conn.execute("DELETE FROM events WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE events SET actor = 5 WHERE seq = 2")
    conn.execute("UPDATE meta SET value = 0 WHERE key = 'retention_gate'")
    conn.execute("COMMIT")
    assert conn.execute("SELECT seq FROM events").fetchall() == [(2,)]
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM events WHERE seq = 2")


def test_stream_seq_is_unique_per_stream_in_schema_2(conn: sqlite3.Connection) -> None:
    migrations.migrate(conn, to=2)
    conn.execute("INSERT INTO names (value) VALUES ('t'), ('s')")
    row = ("INSERT INTO events (seq, id, id_hash, ts, received_at, type, stream, stream_seq,"
           " pid, uid, gid, comm) VALUES (?, ?, 0, 1, 1, 1, 2, ?, 1, 0, 0, 1)")
    conn.execute(row, (1, "a", 1))
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(row, (2, "b", 1))


def test_migration_2_rekeys_uuid7_ids_and_rolling_back_restores_plain_hashes(
        conn: sqlite3.Connection) -> None:
    migrations.migrate(conn, to=1)
    event_ids = [uuid7(), "order-17-created"]
    conn.execute("INSERT INTO names (value) VALUES ('t')")
    for seq, event_id in enumerate(event_ids, 1):
        conn.execute(
            "INSERT INTO events (seq, id, id_hash, ts, received_at, type, pid, uid, gid, comm)"
            " VALUES (?, ?, ?, 1, 1, 1, 1, 0, 0, 1)", (seq, event_id, hash64(event_id)))

    def keys() -> list[int]:
        return [key for (key,) in conn.execute("SELECT id_hash FROM events ORDER BY seq")]

    migrations.migrate(conn)
    assert keys() == [id_hash(event_ids[0]), hash64(event_ids[1])]
    assert keys()[0] != hash64(event_ids[0])
    migrations.migrate(conn, to=1)
    assert keys() == [hash64(e) for e in event_ids]
    # The append-only trigger is back after either direction.
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE events SET id_hash = 0")


def index_sql(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type='index' AND sql IS NOT NULL"))


SET_ASIDE = ["events_actor_ts", "events_correlation", "events_target_ts", "events_ts",
             "events_type_ts"]


def test_indexes_set_aside_are_built_again_as_they_were(conn: sqlite3.Connection) -> None:
    migrations.migrate(conn, to=2)  # schema 3 has no filter index left to set aside
    before = index_sql(conn)
    assert deferred.set_aside(conn) == SET_ASIDE
    remaining = index_sql(conn)
    # Ingest's id lookups and the unique stream constraint are never set aside.
    assert {"events_id_hash", "events_stream"} <= set(remaining)
    assert not set(SET_ASIDE) & set(remaining)
    for seq in range(1, 101):
        insert_event(conn, seq)
    assert deferred.restore(conn) == SET_ASIDE
    assert index_sql(conn) == before
    assert conn.execute("SELECT count(*) FROM meta WHERE key='deferred_indexes'").fetchone() == (0,)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert deferred.restore(conn) == []  # nothing left to build


def test_an_interrupted_bulk_load_gets_its_indexes_back_at_the_next_open(
        tmp_path: Path) -> None:
    path = tmp_path / "auditd.db"
    first = connect_sync(path)
    migrations.migrate(first, to=2)
    before = index_sql(first)
    deferred.set_aside(first)
    first.close()  # as a crash would leave it: set aside, never built
    second = connect_sync(path)
    try:
        # One of them was built by hand meanwhile: the others are built all the same.
        second.execute(before["events_ts"])
        # Nothing to migrate, indexes built all the same.
        assert migrations.migrate(second, to=2) == []
        assert index_sql(second) == before
    finally:
        second.close()


def test_restore_on_a_fresh_file_does_nothing(conn: sqlite3.Connection) -> None:
    assert deferred.restore(conn) == []
    assert tables(conn) == set()


# -- what `auditd migrate` checks first: the plan, what a roll-back deletes, the holder ------

def test_plan_and_losses_say_what_a_roll_back_would_delete(conn: sqlite3.Connection) -> None:
    assert migrations.current(conn) == 0
    every = range(1, migrations.LATEST + 1)
    assert [(d, m.version) for d, m in migrations.plan(conn)] == [("up", v) for v in every]
    migrations.migrate(conn)
    assert migrations.current(conn) == migrations.LATEST
    assert migrations.plan(conn) == []
    steps = migrations.plan(conn, to=0)
    assert [(d, m.version) for d, m in steps] == [("down", v) for v in reversed(every)]
    assert migrations.losses(conn, steps) == []  # nothing stored: nothing to lose
    insert_event(conn, 1)
    insert_event(conn, 2)
    lost = migrations.losses(conn, steps)
    assert [(m.version, counts) for m, counts in lost] == [(1, {"events": 2})]
    assert migrations.losses(conn, migrations.plan(conn, to=1)) == []
    assert migrations.current(conn) == migrations.LATEST  # all of it read-only


_HOLD_OPEN = r"""
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
conn.execute("SELECT count(*) FROM events").fetchone()
print("open", flush=True)
sys.stdin.read()
"""


def test_database_holder_names_another_process_with_the_file_open(tmp_path: Path) -> None:
    path = tmp_path / "auditd.db"
    setup = connect_sync(path)
    migrations.migrate(setup)
    setup.close()
    assert guard.database_holder(path) is None
    with subprocess.Popen([sys.executable, "-c", _HOLD_OPEN, str(path)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        try:
            assert holder.stdout.readline() == "open\n"
            assert guard.database_holder(path) == holder.pid
            assert guard.process_name(holder.pid).startswith(f"pid {holder.pid} (")
        finally:
            holder.stdin.close()  # the child reads EOF and exits
            holder.wait(timeout=30)
    assert guard.database_holder(path) is None  # the -shm file stays; its lock does not


def test_backup_beside_copies_everything_and_never_reuses_a_name(tmp_path: Path) -> None:
    path = tmp_path / "auditd.db"
    live = connect_sync(path)
    migrations.migrate(live)
    insert_event(live, 1)  # in the WAL only: the backup must include it
    first = guard.backup_beside(path, 2, 0)
    second = guard.backup_beside(path, 2, 0)
    live.close()
    assert first != second and first.parent == second.parent == tmp_path
    assert first.name.startswith("auditd.db.pre-migrate-2-0-")
    for copy in (first, second):
        check = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
        try:
            assert check.execute("SELECT seq, id FROM events").fetchall() == [(1, "id-1")]
        finally:
            check.close()
