"""Damaged database at start: moved aside (never overwritten), a fresh one replays the
journal, and `auditd recover OLD` salvages every row outside the damaged page.

Health reports the set-aside file. The damage is real: one leaf page of the events
table b-tree is overwritten with random bytes in the stopped daemon's database file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import wait_for
from fault_helpers import (
    acked_seqs,
    assert_integrity_ok,
    event_count,
    health,
    journal_records,
    log_events_named,
)

OLD_ONLY = 3000  # events whose journal segment was released: only the database has them
JOURNALED = 2000  # events the journal still holds when the database is damaged
FRAME = 500


def varint(buffer: bytes, offset: int) -> tuple[int, int]:
    value = 0
    for i in range(9):
        byte = buffer[offset + i]
        if i == 8:
            return (value << 8) | byte, offset + 9
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, offset + i + 1
    raise AssertionError("unreachable")


def leaf_rowids(db_path: Path, page_size: int, pageno: int) -> list[int]:
    """Rowids of the cells on one table-b-tree leaf page, read from the raw file."""
    with db_path.open("rb") as handle:
        handle.seek((pageno - 1) * page_size)
        page = handle.read(page_size)
    assert page[0] == 0x0D, f"page {pageno} is not a table leaf"
    cells = int.from_bytes(page[3:5], "big")
    rowids = []
    for i in range(cells):
        pointer = int.from_bytes(page[8 + 2 * i : 10 + 2 * i], "big")
        _payload, offset = varint(page, pointer)
        rowids.append(varint(page, offset)[0])
    return rowids


def events_leaf_page_holding(db_path: Path, seq: int) -> tuple[int, int, list[int]]:
    """(page size, page number, rowids on it) of the events leaf page that holds `seq`."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = [row[0] for row in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'events' AND pagetype = 'leaf'")]
    finally:
        conn.close()
    for pageno in pages:
        rowids = leaf_rowids(db_path, page_size, pageno)
        if seq in rowids:
            return page_size, pageno, rowids
    raise AssertionError(f"no events leaf page holds seq {seq}")


def damage_events_page(db_path: Path, seq: int) -> list[int]:
    """Overwrite the events leaf page holding `seq` with random bytes; its rowids."""
    page_size, pageno, rowids = events_leaf_page_holding(db_path, seq)
    with db_path.open("r+b") as handle:
        handle.seek((pageno - 1) * page_size)
        handle.write(os.urandom(page_size))
    return rowids


def snapshot(db_path: Path) -> dict[int, tuple[Any, ...]]:
    """seq -> the event as values (names resolved), comparable across databases."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT e.seq, e.id, e.ts, t.value, a.value, s.value, e.stream_seq, e.data"
            " FROM events e JOIN names t ON t.id = e.type LEFT JOIN names a ON a.id = e.actor"
            " LEFT JOIN names s ON s.id = e.stream").fetchall()
    finally:
        conn.close()
    return {row[0]: row[1:] for row in rows}


def send(daemon: Any, prefix: str, count: int, stream: str) -> dict[str, int]:
    acks: dict[str, int] = {}
    with daemon.connect() as conn:
        for start in range(0, count, FRAME):
            events = [{"type": "damage.db", "id": f"{prefix}{i}", "actor": f"user{i % 7}",
                       "stream": stream, "data": {"i": i, "pad": "p" * 64}}
                      for i in range(start, start + FRAME)]
            acks.update(acked_seqs(events, conn.request(events)))
    return acks


def damage_only_copy(daemon: Any, prefix: str, stream: str
                     ) -> tuple[dict[str, int], list[int], Path]:
    """FRAME events committed and released from the journal, so the database holds the
    only copy; a page of them damaged; the daemon restarted on it. Returns the acks,
    the seqs on the damaged page and where the damaged file was moved."""
    acks = send(daemon, prefix, FRAME, stream)
    wait_for(lambda: event_count(daemon) == FRAME, 15, "the commit")
    daemon.restart()
    wait_for(lambda: log_events_named(daemon, "journal_released"), 10, "journal_released")
    assert daemon.stop() == 0
    lost = damage_events_page(daemon.db_path, FRAME // 2)
    daemon.start()
    moved = Path(log_events_named(daemon, "database_damaged")[0]["moved_to"])
    return acks, lost, moved


def recover(daemon: Any, damaged: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "auditd.cli", "recover", "--json", "--config",
         str(daemon.config_path), str(damaged)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def dead_letter_count(daemon: Any) -> int:
    return int(daemon.query("SELECT count(*) FROM dead_letters")[0][0])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_damaged_database_is_set_aside_replayed_and_recovered(make_daemon: Any) -> None:
    daemon = make_daemon()
    # Events only the database will hold: their segment is released after a restart.
    acks = send(daemon, "old", OLD_ONLY, "old-stream")
    wait_for(lambda: event_count(daemon) == OLD_ONLY, 15, "the first events to commit")
    daemon.restart()
    wait_for(lambda: log_events_named(daemon, "journal_released"), 10, "journal_released")
    acks |= send(daemon, "new", JOURNALED, "new-stream")
    assert daemon.stop() == 0
    assert [r.seq for r in journal_records(daemon.storage)] == list(
        range(OLD_ONLY + 1, OLD_ONLY + JOURNALED + 1))
    before = snapshot(daemon.db_path)
    assert {row[0]: seq for seq, row in before.items()} == acks

    # Real damage: garbage over the events leaf page holding an old event in the middle.
    page_size, pageno, lost_seqs = events_leaf_page_holding(daemon.db_path, OLD_ONLY // 2)
    assert set(lost_seqs) <= set(range(1, OLD_ONLY + 1))
    with daemon.db_path.open("r+b") as handle:
        handle.seek((pageno - 1) * page_size)
        handle.write(os.urandom(page_size))
    damaged_digest = sha256(daemon.db_path)

    daemon.start()
    damaged_logs = log_events_named(daemon, "database_damaged")
    assert len(damaged_logs) == 1, damaged_logs
    assert damaged_logs[0]["level"] == "critical"
    moved = Path(damaged_logs[0]["moved_to"])
    assert moved.parent == daemon.db_path.parent
    assert moved.name.startswith("auditd.db.damaged-"), moved
    assert sha256(moved) == damaged_digest, "the damaged file was changed"
    # The fresh database holds every journaled event, exactly as first sequenced...
    wait_for(lambda: event_count(daemon) == JOURNALED, 15, "the journal to replay")
    journaled = {seq: row for seq, row in before.items() if seq > OLD_ONLY}
    assert snapshot(daemon.db_path) == journaled
    # ...and seq continues past the highest ever assigned.
    with daemon.connect() as conn:
        reply = conn.request({"type": "damage.after", "id": "after-1"})
    assert reply["first"] == OLD_ONLY + JOURNALED + 1, reply
    assert daemon.stop() == 0

    first = recover(daemon, moved)
    recovered = snapshot(daemon.db_path)
    missing = sorted(set(before) - set(recovered))
    assert missing == sorted(lost_seqs), (
        f"readable rows not recovered: {sorted(set(missing) - set(lost_seqs))}; "
        f"damaged page {pageno} held seq {min(lost_seqs)}..{max(lost_seqs)}; {first}")
    assert first["unreadable"] == len(lost_seqs), first
    assert first["copied"] == OLD_ONLY - len(lost_seqs), first
    assert first["already_present"] == JOURNALED, first
    expected = {seq: row for seq, row in before.items() if seq not in lost_seqs}
    assert {seq: row for seq, row in recovered.items() if seq in before} == expected
    assert sha256(moved) == damaged_digest, "recover must only read the damaged file"

    again = recover(daemon, moved)
    assert again["copied"] == 0, again
    assert snapshot(daemon.db_path) == recovered
    assert_integrity_ok(daemon.db_path)


def test_recovered_stream_keeps_its_version(make_daemon: Any) -> None:
    """A stream that only the damaged database knew must continue, not restart at 1."""
    daemon = make_daemon()
    _, lost, moved = damage_only_copy(daemon, "old", "only-in-old")
    assert daemon.stop() == 0
    result = recover(daemon, moved)
    assert result["copied"] > FRAME - 2 * len(lost), result  # exact counts: the test above

    daemon.start()
    with daemon.connect() as conn:
        reply = conn.request({"type": "damage.after", "id": "next", "stream": "only-in-old"})
        assert reply["ok"] == 1, reply
        # A resent recovered id is a duplicate, never stored twice.
        resent = conn.request({"type": "damage.db", "id": "old0", "stream": "only-in-old"})
    # The seqs on the damaged page are given up as `missing` dead letters when the
    # Merkle tree catches up after the recover (every seq is one leaf).
    wait_for(lambda: event_count(daemon) + dead_letter_count(daemon)
             == result["copied"] + 1 + len(lost),
             10, "the new event to be committed or dead-lettered")
    assert daemon.stop() == 0
    assert resent.get("duplicates") == [[0, 1]], resent
    rows = daemon.query(
        "SELECT e.stream_seq FROM events e JOIN names s ON s.id = e.stream"
        " WHERE s.value = 'only-in-old' AND e.id = 'next'")
    assert rows == [(FRAME + 1,)], (
        "the stream restarted instead of continuing: "
        f"{daemon.query('SELECT seq, reason FROM dead_letters')}")
    # Only the unreadable page's seqs are dead letters, each a `missing` one.
    assert daemon.query("SELECT seq, code FROM dead_letters ORDER BY seq") == [
        (seq, "missing") for seq in sorted(lost)]


def test_recover_into_the_running_daemon_keeps_ids_idempotent(make_daemon: Any) -> None:
    """After `auditd recover` runs beside the live daemon, a client resending a
    recovered event's id must get `duplicates`, never a second copy."""
    daemon = make_daemon()
    acks, lost, moved = damage_only_copy(daemon, "old", "s")
    result = recover(daemon, moved)  # the daemon keeps running
    assert result["copied"] > 0, result
    resend_id = next(i for i, seq in acks.items() if seq not in lost and seq > 1)
    with daemon.connect() as conn:
        reply = conn.request({"type": "damage.db", "id": resend_id})
    assert daemon.stop() == 0
    assert reply.get("duplicates") == [[0, acks[resend_id]]], reply
    ((count, distinct),) = daemon.query("SELECT count(*), count(DISTINCT id) FROM events")
    assert count == distinct, "a recovered id was stored twice"


def test_health_reports_the_set_aside_database(make_daemon: Any) -> None:
    """An operator must learn from health that a database was set aside, and where."""
    daemon = make_daemon()
    send(daemon, "a", FRAME, "s")
    assert daemon.stop() == 0
    damage_events_page(daemon.db_path, FRAME // 2)
    daemon.start()
    moved = log_events_named(daemon, "database_damaged")[0]["moved_to"]
    document = health(daemon)
    assert document["status"] != "ok", document
    assert moved in json.dumps(document), document


def test_a_damaged_database_never_overwrites_an_earlier_one(make_daemon: Any) -> None:
    """Set-aside names must be unique: an earlier damaged database is never replaced.

    Files named as the daemon would name a set-aside database during the next minute
    stand for earlier damaged databases (a crash loop sets several aside within one
    second); none of them may be overwritten.
    """
    daemon = make_daemon()
    send(daemon, "a", FRAME, "s")
    assert daemon.stop() == 0
    daemon.db_path.write_bytes(b"damaged database " * 400)
    digest = sha256(daemon.db_path)
    now = time.time()
    earlier = {}
    for ahead in range(60):
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now + ahead))
        path = daemon.db_path.with_name(f"auditd.db.damaged-{stamp}")
        path.write_bytes(f"earlier damaged database {ahead}".encode())
        earlier[path] = sha256(path)
    daemon.start()
    moved = Path(log_events_named(daemon, "database_damaged")[0]["moved_to"])
    assert daemon.stop() == 0
    replaced = [path.name for path, old in earlier.items() if sha256(path) != old]
    assert not replaced, f"earlier damaged databases overwritten: {replaced}"
    assert moved.exists() and sha256(moved) == digest
