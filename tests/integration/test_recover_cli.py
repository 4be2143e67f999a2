"""`auditd recover` beside a running daemon, moving damaged files aside, and the dead
letters of a damaged file recovered with its events."""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import DaemonProcess, committed_seq, wait_for, write_lock
from projection_truth import assert_counts_match
from proofs_store import checkpoint_size, get, verify, wait_checkpointed

from auditd.store.recovery import move_aside, read_remnant


def test_offline_recover_refuses_while_a_daemon_listens(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon()
    damaged = daemon.root / "old.db"
    damaged.write_bytes(b"not looked at: the refusal comes first")
    done = subprocess.run(
        [sys.executable, "-m", "auditd.cli", "recover", "--config", str(daemon.config_path),
         "--status-socket", str(daemon.root / "nothing-here.sock"), str(damaged)],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr == (
        f"auditd: a daemon is listening on {daemon.ingest_socket} but its status socket "
        "does not answer; recover through it (--status-socket) or stop it first\n")


def test_move_aside_never_overwrites_an_earlier_wal(tmp_path: Path) -> None:
    db = tmp_path / "auditd.db"
    db.write_bytes(b"first")
    Path(f"{db}-wal").write_bytes(b"first wal")
    first = move_aside(db)
    first.unlink()  # an operator removed the old file but kept its WAL
    db.write_bytes(b"second")
    Path(f"{db}-wal").write_bytes(b"second wal")
    second = move_aside(db)
    assert second != first
    assert Path(f"{first}-wal").read_bytes() == b"first wal"
    assert second.read_bytes() == b"second"
    assert Path(f"{second}-wal").read_bytes() == b"second wal"
    assert not db.exists()


# -- dead letters come back too: every seq an event or a dead letter again -------------------

_RECORD = struct.Struct(">HIQI")  # journal record header: magic, length, seq, crc32
POISON = ("CREATE TRIGGER poison BEFORE INSERT ON events"
          " WHEN NEW.type = (SELECT id FROM names WHERE value = 'poison.event')"
          " BEGIN SELECT RAISE(ABORT, 'poisoned'); END")
DEAD_LETTER_COLUMNS = ("seq, source, code, reason, raw, size, uid, attempts, first_failed_at,"
                       " last_failed_at")


def events_and_letters(db: Path) -> tuple[list[int], list[tuple[Any, ...]]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        seqs = [row[0] for row in conn.execute("SELECT seq FROM events ORDER BY seq")]
        letters = conn.execute(f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters "
                               "ORDER BY seq IS NULL, seq, first_failed_at").fetchall()
    finally:
        conn.close()
    return seqs, letters


def corrupt_journal_record(storage: Path, seq: int) -> None:
    """Flip bytes in the payload of the journal record holding `seq`."""
    for segment in sorted((storage / "journal").glob("*.journal")):
        data = segment.read_bytes()
        offset = 0
        while offset + _RECORD.size <= len(data):
            _magic, length, record_seq, _crc = _RECORD.unpack_from(data, offset)
            if record_seq == seq:
                at = offset + _RECORD.size + length // 2
                with segment.open("r+b") as handle:
                    handle.seek(at)
                    handle.write(bytes(b ^ 0xFF for b in data[at : at + 4]))
                return
            offset += _RECORD.size + length
    raise AssertionError(f"no journal record holds seq {seq}")


def damage_an_index_page(db: Path, index: str) -> None:
    """Random bytes over a page of `index`: the file fails quick_check, every table row
    stays readable."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pageno = conn.execute("SELECT pageno FROM dbstat WHERE name = ?",
                              (index,)).fetchone()[0]
    finally:
        conn.close()
    with db.open("r+b") as handle:
        handle.seek((pageno - 1) * page_size)
        handle.write(os.urandom(page_size))


def log_named(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("event") == name]


def recover(daemon: DaemonProcess, damaged: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "auditd.cli", "recover", "--json", "--config",
         str(daemon.config_path), str(damaged)],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def store_with_every_kind_of_dead_letter(daemon: DaemonProcess) -> None:
    """Events 1..10 committed; 11..20 journaled only when the daemon is killed, 15's
    record then damaged (replay: a journal dead letter); 21..30 with 23 and 30 poison
    (writer dead letters: 30 is the last seq); one invalid event (an ingest reject)."""
    with daemon.connect() as conn:
        assert conn.request([{"type": "ok.event", "id": f"a{i}"} for i in range(10)])["ok"]
        wait_for(lambda: committed_seq(daemon) == 10, 30, "the first commit")
        with write_lock(daemon):
            journaled = [{"type": "ok.event", "id": f"j{i}", "actor": "bob"} for i in range(10)]
            assert conn.request(journaled)["last"] == 20
            daemon.kill()
    corrupt_journal_record(daemon.storage, 15)
    daemon.start()
    wait_for(lambda: committed_seq(daemon) >= 20, 30, "the replay")
    db = sqlite3.connect(daemon.db_path, isolation_level=None, timeout=10)
    try:
        db.execute("INSERT INTO names (value) VALUES ('poison.event') ON CONFLICT DO NOTHING")
        db.execute(POISON)
    finally:
        db.close()
    with daemon.connect() as conn:
        batch = [{"type": "poison.event" if i in (2, 9) else "ok.event", "id": f"p{i}"}
                 for i in range(10)]
        assert conn.request(batch)["first"] == 21
        assert conn.request({"type": 17})["rejected"][0][1] == "invalid"
    wait_for(lambda: daemon.query("SELECT count(*) FROM dead_letters") == [(4,)], 30,
             "four dead letters")
    wait_for(lambda: committed_seq(daemon) == 30, 30, "the last commit")
    daemon.restart()  # the journal is released: only the database holds all this
    wait_for(lambda: log_named(daemon, "journal_released"), 30, "journal_released")
    assert daemon.stop() == 0


def test_recover_copies_dead_letters_and_leaves_no_seq_gap(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon()
    store_with_every_kind_of_dead_letter(daemon)
    old_seqs, old_letters = events_and_letters(daemon.db_path)
    assert [(row[0], row[1]) for row in old_letters] == [
        (15, "journal"), (23, "writer"), (30, "writer"), (None, "ingest")], old_letters
    assert sorted([*old_seqs, 15, 23, 30]) == list(range(1, 31))
    damage_an_index_page(daemon.db_path, "events_id_hash")

    daemon.start()
    moved = Path(log_named(daemon, "database_damaged")[0]["moved_to"])
    with daemon.connect() as conn:  # seq continues past the damaged file's dead letters
        assert conn.request({"type": "after.damage", "id": "after"})["first"] == 31
    # The file's highest seq was a dead letter's: seq must continue past it even without
    # the journal that also told the daemon.
    assert read_remnant(moved).max_seq == 30
    # A leaf is forever: the tree waits for the moved file's seqs instead of sealing
    # them as missing, and says so (events are still taken and stored).
    health = json.loads(get(daemon, "/health")[1])
    assert health["checks"]["proofs_tree"]["severity"] == "degraded", health
    assert str(moved) in health["checks"]["proofs_tree"]["detail"], health
    assert checkpoint_size(daemon) == 0
    first = recover(daemon, moved)  # through the running daemon
    # The rows are back under their seqs: the tree catches up over them.
    wait_for(lambda: json.loads(get(daemon, "/health")[1])["checks"]["proofs_tree"]["ok"],
             30, "the tree to catch up")
    wait_checkpointed(daemon, 31, 90)
    # The copied events went in beside the writer: the projections are rebuilt and
    # count them (and the admin event of the recover) like every other.
    assert first["projections"] == "rebuilding", first
    assert len(assert_counts_match(daemon)) == len(old_seqs) + 2
    assert daemon.stop() == 0

    seqs, letters = events_and_letters(daemon.db_path)
    assert letters == old_letters  # every column, the raw bytes and failure times too
    code, verified = verify(daemon.config_path)
    assert code == 0, verified  # each recovered row is the leaf of its seq
    dead = {row[0] for row in letters if row[0] is not None}
    assert not dead & set(seqs), "a seq both stored and dead-lettered"
    assert sorted(set(seqs) | dead) == list(range(1, max(seqs) + 1)), "a seq gap"
    assert first["copied"] == len(old_seqs) and first["unreadable"] == 0, first
    assert (first["dead_letters_copied"], first["dead_letters_already_present"],
            first["dead_letters_unreadable"]) == (4, 0, 0), first

    again = recover(daemon, moved)  # offline this time: nothing is added twice
    assert (again["copied"], again["dead_letters_copied"]) == (0, 0), again
    assert again["dead_letters_already_present"] == 4, again
    assert events_and_letters(daemon.db_path) == (seqs, letters)


def test_an_offline_recover_has_the_projections_rebuilt_at_the_next_start(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon()
    store_with_every_kind_of_dead_letter(daemon)
    old_seqs, _ = events_and_letters(daemon.db_path)
    damage_an_index_page(daemon.db_path, "events_id_hash")
    daemon.start()
    moved = Path(log_named(daemon, "database_damaged")[0]["moved_to"])
    with daemon.connect() as conn:
        assert conn.request({"type": "after.damage", "id": "after"})["first"] == 31
    assert daemon.stop() == 0
    done = recover(daemon, moved)  # offline: beside no writer
    assert done["copied"] == len(old_seqs), done
    assert done["projections"] == "rebuilt at the next start", done
    daemon.start()
    assert len(assert_counts_match(daemon)) == len(old_seqs) + 1
    assert {e["name"] for e in log_named(daemon, "projection_rebuilt")} >= {
        "counts_by_type", "actor_summary"}


def test_a_deleted_damaged_file_gives_its_seqs_up_as_missing(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    """The tree waits for a moved damaged file only while it exists: deleted, its seqs
    get `missing` dead letters at the next start and the tree covers every seq."""
    daemon = make_daemon()
    store_with_every_kind_of_dead_letter(daemon)
    damage_an_index_page(daemon.db_path, "events_id_hash")
    daemon.start()
    moved = Path(log_named(daemon, "database_damaged")[0]["moved_to"])
    with daemon.connect() as conn:
        assert conn.request({"type": "after.damage", "id": "after"})["first"] == 31
    assert not json.loads(get(daemon, "/health")[1])["checks"]["proofs_tree"]["ok"]
    assert daemon.stop() == 0
    moved.unlink()

    daemon.start()
    assert log_named(daemon, "tree_wait_abandoned")
    assert json.loads(get(daemon, "/health")[1])["checks"]["proofs_tree"]["ok"]
    wait_checkpointed(daemon, 31, 90)
    assert daemon.stop() == 0
    assert daemon.query("SELECT seq FROM dead_letters WHERE code = 'missing' ORDER BY seq") \
        == [(seq,) for seq in range(1, 31)]
    code, verified = verify(daemon.config_path)
    assert code == 0, verified
