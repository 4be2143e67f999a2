"""`auditd migrate` on a real store: never under a running daemon, never deleting events
without `--yes-delete-events`, and a backup beside the database before any change."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import (
    DaemonProcess,
    stored_seqs,
    wait_committed,
    wait_for,
    wait_sealed_through,
)
from proofs_store import send, verify, wait_checkpointed

from auditd.store import migrations

MakeDaemon = Callable[..., DaemonProcess]
EVENTS = 40


def migrate(daemon: DaemonProcess, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "auditd.cli", "migrate", "--config", str(daemon.config_path),
         *flags], capture_output=True, text=True, timeout=120, check=False)


def applied(db: Path) -> list[int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return migrations.applied(conn)
    finally:
        conn.close()


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def backups(daemon: DaemonProcess) -> list[Path]:
    return sorted(daemon.storage.glob("auditd.db.pre-migrate-*"))


def stored_store(make_daemon: MakeDaemon) -> DaemonProcess:
    """A stopped daemon's store with EVENTS events and one dead letter."""
    daemon = make_daemon()
    with daemon.connect() as conn:
        events = [{"type": "m.event", "id": f"m{i}", "actor": "alice"} for i in range(EVENTS)]
        assert conn.request(events)["ok"] == EVENTS
        assert conn.request({"type": 1})["rejected"], "an invalid event: a dead letter"
    wait_for(lambda: daemon.query("SELECT count(*) FROM events") == [(EVENTS,)]
             and daemon.query("SELECT count(*) FROM dead_letters") == [(1,)], 30, "commit")
    assert daemon.stop() == 0
    return daemon


def test_refused_while_the_daemon_runs(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon()
    assert daemon.proc is not None
    done = migrate(daemon, "--to", "1")
    assert done.returncode == 1, done
    assert done.stderr.startswith(f"auditd: pid {daemon.proc.pid} ("), done.stderr
    assert f"has {daemon.db_path} open; stop the daemon" in done.stderr
    assert done.stderr.count("\n") == 1
    assert applied(daemon.db_path) == [m.version for m in migrations.MIGRATIONS]
    assert backups(daemon) == []
    status = migrate(daemon, "--status")  # reading is fine
    assert status.returncode == 0, status
    first = status.stdout.split("\n")[0].split()
    assert first[:3] == ["1", "initial", "applied"] and first[4] == migrations.checksum(
        migrations.MIGRATIONS[0]), status.stdout


def test_refused_while_a_daemon_answers_on_its_socket(make_daemon: MakeDaemon) -> None:
    """A daemon that does not have the file open (yet) is still seen by its socket."""
    daemon = stored_store(make_daemon)
    Path(daemon.ingest_socket).unlink(missing_ok=True)  # the stopped daemon's stale file
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(daemon.ingest_socket)
        listener.listen(1)
        done = migrate(daemon, "--to", "1")
    assert done.returncode == 1, done
    assert done.stderr == (f"auditd: a daemon answers on its ingest socket "
                           f"{daemon.ingest_socket}; stop it before migrating\n")
    assert applied(daemon.db_path) == [m.version for m in migrations.MIGRATIONS]


def test_a_roll_back_that_deletes_events_needs_the_flag(make_daemon: MakeDaemon) -> None:
    daemon = stored_store(make_daemon)
    before = rows(daemon.db_path, "SELECT * FROM events_view ORDER BY seq")
    refused = migrate(daemon, "--to", "0")
    assert refused.returncode == 1, refused
    assert refused.stderr == (
        f"auditd: rolling back migration 1 (initial) would delete {EVENTS} events and "
        "1 dead letter; pass --yes-delete-events to do it (a backup is taken first)\n")
    assert rows(daemon.db_path, "SELECT * FROM events_view ORDER BY seq") == before
    assert applied(daemon.db_path) == [m.version for m in migrations.MIGRATIONS]
    assert backups(daemon) == []

    done = migrate(daemon, "--to", "0", "--yes-delete-events")
    assert done.returncode == 0, done
    (backup,) = backups(daemon)
    assert backup.name.startswith(f"auditd.db.pre-migrate-{migrations.LATEST}-0-"), backup
    assert done.stdout == (f"backup: {backup}\nrolled back 8 forward\nrolled back 7 prune_points\n"
                           "rolled back 6 origins\nrolled back 5 merkle\n"
                           "rolled back 4 projections\n"
                           "rolled back 3 partitions\n"
                           "rolled back 2 id_key\nrolled back 1 initial\n")
    assert applied(daemon.db_path) == []
    assert not rows(daemon.db_path,
                    "SELECT 1 FROM sqlite_master WHERE name IN ('events', 'dead_letters')")
    # The backup is the store as it was: every event and the dead letter, intact.
    assert rows(backup, "SELECT * FROM events_view ORDER BY seq") == before
    assert rows(backup, "SELECT count(*) FROM dead_letters") == [(1,)]
    assert rows(backup, "PRAGMA integrity_check") == [("ok",)]
    assert applied(backup) == [m.version for m in migrations.MIGRATIONS]


def test_a_roll_back_that_keeps_events_runs_after_a_backup(make_daemon: MakeDaemon) -> None:
    daemon = stored_store(make_daemon)
    before = rows(daemon.db_path, "SELECT seq, id FROM events ORDER BY seq")
    down = migrate(daemon, "--to", "1")
    assert down.returncode == 0, down
    (backup,) = backups(daemon)
    assert backup.name.startswith(f"auditd.db.pre-migrate-{migrations.LATEST}-1-")
    assert down.stdout == (f"backup: {backup}\nrolled back 8 forward\nrolled back 7 prune_points\n"
                           "rolled back 6 origins\nrolled back 5 merkle\n"
                           "rolled back 4 projections\n"
                           "rolled back 3 partitions\nrolled back 2 id_key\n")
    assert applied(daemon.db_path) == [1]
    assert rows(daemon.db_path, "SELECT seq, id FROM events ORDER BY seq") == before

    up = migrate(daemon)
    assert up.returncode == 0, up
    assert up.stdout.endswith("applied 2 id_key\napplied 3 partitions\napplied 4 projections\n"
                              "applied 5 merkle\napplied 6 origins\napplied 7 prune_points\n"
                              "applied 8 forward\n"), \
        up.stdout
    latest = migrations.LATEST
    assert {b.name.split("pre-migrate-")[1][:4] for b in backups(daemon)} == {
        f"{latest}-1-", f"1-{latest}-"}
    assert migrate(daemon).stdout == "schema is up to date\n"
    assert len(backups(daemon)) == 2  # nothing to do, nothing copied
    daemon.start()  # the daemon takes the store back
    with daemon.connect() as conn:
        assert conn.request({"type": "m.event", "id": "m0"})["duplicates"] == [[0, 1]]


def test_an_unknown_version_is_a_usage_error(make_daemon: MakeDaemon) -> None:
    daemon = stored_store(make_daemon)
    done = migrate(daemon, "--to", "9")
    assert done.returncode == 2, done
    assert done.stderr == f"auditd: no schema version 9; versions are 0..{migrations.LATEST}\n"
    assert backups(daemon) == []


def test_an_older_store_is_migrated_at_start_with_a_backup_beside_it(
        make_daemon: MakeDaemon) -> None:
    daemon = stored_store(make_daemon)
    down = migrate(daemon, "--to", "5")
    assert down.returncode == 0, down
    copies = set(backups(daemon))
    before = rows(daemon.db_path, "SELECT seq, id FROM events ORDER BY seq")
    daemon.start()
    assert applied(daemon.db_path) == [m.version for m in migrations.MIGRATIONS]
    (taken,) = set(backups(daemon)) - copies
    assert taken.name.startswith(f"auditd.db.pre-migrate-5-{migrations.LATEST}-"), taken
    assert applied(taken) == [1, 2, 3, 4, 5]
    assert rows(taken, "SELECT seq, id FROM events ORDER BY seq") == before
    assert any(e["event"] == "migration_backup_taken" for e in daemon.log_events())
    status = migrate(daemon, "--status")
    assert "CHECKSUM DIFFERS" not in status.stdout, status.stdout


def test_a_store_newer_than_this_auditd_is_refused_naming_both_versions(
        make_daemon: MakeDaemon) -> None:
    daemon = stored_store(make_daemon)
    conn = sqlite3.connect(daemon.db_path)
    try:
        conn.execute("INSERT INTO schema_migrations VALUES (99, 'future', 1, NULL)")
        conn.commit()
    finally:
        conn.close()
    done = subprocess.run(daemon.command(), capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 1, done
    assert "schema version 99, newer than this auditd knows (its newest is " \
        f"{migrations.LATEST})" in done.stderr, done.stderr
    assert applied(daemon.db_path)[-1] == 99  # untouched
    refused = migrate(daemon, "--to", "1")
    assert refused.returncode == 1 and "schema version 99" in refused.stderr, refused
    status = migrate(daemon, "--status")
    assert "newer than this auditd knows" in status.stdout, status.stdout


def test_steps_4_to_7_roll_back_and_forward_on_a_sealed_store(make_daemon: MakeDaemon) -> None:
    """Down to schema 2 on a store with sealed partitions, a tree and checkpoints: every
    event comes back into the one table; up again, the daemon seals and signs anew, and
    the store verifies."""
    daemon = make_daemon({"storage": {"partition_events": 300},
                          "proofs": {"checkpoint_every": "100ms"}})
    send(daemon, 0, 1000)
    last = int(daemon.stats()["last_seq"])
    wait_committed(daemon, last)
    wait_sealed_through(daemon, 900)
    before = stored_seqs(daemon)
    assert daemon.stop() == 0

    down = migrate(daemon, "--to", "2")
    assert down.returncode == 0, down
    assert "rolled back 3 partitions" in down.stdout
    assert rows(daemon.db_path, "SELECT seq, id FROM events ORDER BY seq") == sorted(
        before.items())
    indexes = {name for (name,) in rows(daemon.db_path,
                                        "SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"events_type_ts", "events_actor_ts", "events_target_ts"} <= indexes

    daemon.start()  # migrated at start, with a backup beside it
    assert applied(daemon.db_path)[-1] == migrations.LATEST
    wait_sealed_through(daemon, 900)
    wait_checkpointed(daemon, last)
    assert stored_seqs(daemon) == before
    code, report = verify(daemon.config_path)
    assert code == 0, report
