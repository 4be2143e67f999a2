"""Damaged journal at start: a torn tail is cut and logged, a corrupt middle record is
dead-lettered, and every other journaled event is committed exactly as first sequenced.

Setup for each test: a few events are committed, then this test process holds
SQLite's write lock (`BEGIN IMMEDIATE`) while more events are sent, so they are
acknowledged from the journal but cannot be committed; the daemon is then SIGKILLed,
the lock released, and the journal damaged with real byte edits.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import pytest
from conftest import wait_for, write_config
from fault_helpers import (
    HEADER,
    JournalRecord,
    acked_seqs,
    assert_integrity_ok,
    assert_seq_gap_free,
    event_count,
    journal_records,
    log_events_named,
    write_lock,
)

COMMITTED = 10  # events committed before the lock is taken
JOURNALED = 200  # events acknowledged while the lock is held: only in the journal
FRAME = 20


def committed_seq(daemon: Any) -> int:
    return int(daemon.query("SELECT value FROM meta WHERE key='committed_seq'")[0][0])


def journal_only_setup(daemon: Any) -> tuple[dict[str, int], list[JournalRecord]]:
    """Acknowledged events 1..COMMITTED committed, the rest only in the journal; killed."""
    acks: dict[str, int] = {}
    with daemon.connect() as conn:
        events = [{"type": "damage.test", "id": f"c{i}", "data": i} for i in range(COMMITTED)]
        acks.update(acked_seqs(events, conn.request(events)))
        wait_for(lambda: committed_seq(daemon) == COMMITTED, 10, "the first commit")
        with write_lock(daemon.db_path):
            for start in range(0, JOURNALED, FRAME):
                events = [{"type": "damage.test", "id": f"j{i}", "actor": "tester",
                           "stream": "s", "data": i} for i in range(start, start + FRAME)]
                acks.update(acked_seqs(events, conn.request(events)))
            daemon.kill()
    assert sorted(acks.values()) == list(range(1, COMMITTED + JOURNALED + 1))
    assert committed_seq(daemon) == COMMITTED, "the held lock did not stop the commits"
    records = [r for r in journal_records(daemon.storage) if r.seq > COMMITTED]
    assert [r.seq for r in records] == list(range(COMMITTED + 1, COMMITTED + JOURNALED + 1))
    return acks, records


def stored_ids(daemon: Any) -> dict[str, int]:
    return dict(daemon.query("SELECT id, seq FROM events"))


def send_one_more(daemon: Any) -> int:
    with daemon.connect() as conn:
        reply = conn.request({"type": "damage.after", "id": "after"})
    assert reply["ok"] == 1, reply
    return int(reply["first"])


@pytest.mark.parametrize("cut_in", ["payload", "header"])
def test_torn_tail_record_is_cut_and_every_complete_record_recovered(
        make_daemon: Any, cut_in: str) -> None:
    daemon = make_daemon()
    acks, records = journal_only_setup(daemon)
    last = records[-1]
    keep = last.offset + (HEADER.size + last.length // 2 if cut_in == "payload" else 7)
    size = last.segment.stat().st_size
    assert size == last.end
    os.truncate(last.segment, keep)

    daemon.start()
    cuts = log_events_named(daemon, "journal_tail_cut")
    assert len(cuts) == 1, cuts
    assert cuts[0]["segment"] == last.segment.name
    assert cuts[0]["offset"] == last.offset
    assert cuts[0]["bytes_cut"] == keep - last.offset
    assert last.segment.stat().st_size == last.offset, "the torn bytes are still there"
    after = send_one_more(daemon)
    assert daemon.stop() == 0

    stored = stored_ids(daemon)
    torn_id = next(i for i, s in acks.items() if s == last.seq)
    expected = {i: s for i, s in acks.items() if i != torn_id}
    assert {i: s for i, s in stored.items() if i != "after"} == expected
    # The torn record was never whole, so its seq was never really assigned: the next
    # event takes it and seq stays gap-free.
    assert after == last.seq
    top, dead = assert_seq_gap_free(daemon)
    assert (top, dead) == (last.seq, set())
    stream = daemon.query("SELECT stream_seq FROM events WHERE stream IS NOT NULL ORDER BY seq")
    assert [row[0] for row in stream] == list(range(1, JOURNALED))
    assert_integrity_ok(daemon.db_path)


@pytest.mark.parametrize("damage", ["payload", "length-field"])
def test_corrupt_middle_record_is_dead_lettered_and_the_rest_committed(
        make_daemon: Any, damage: str) -> None:
    daemon = make_daemon()
    acks, records = journal_only_setup(daemon)
    victim = records[len(records) // 2]
    raw_before = victim.segment.read_bytes()[victim.offset : victim.end]
    with victim.segment.open("r+b") as handle:
        if damage == "payload":
            handle.seek(victim.payload_offset + victim.length // 2)
            handle.write(bytes(b ^ 0xFF for b in raw_before[HEADER.size + victim.length // 2:
                                                             HEADER.size + victim.length // 2
                                                             + 4]))
        else:  # the length field (bytes 2..5 of the header) now claims far too much
            handle.seek(victim.offset + 2)
            handle.write((victim.length + 5000).to_bytes(4, "big"))
    damaged_raw = victim.segment.read_bytes()[victim.offset : victim.end]
    assert damaged_raw != raw_before

    daemon.start()
    corrupt = log_events_named(daemon, "journal_record_corrupt")
    assert len(corrupt) == 1, corrupt
    assert (corrupt[0]["segment"], corrupt[0]["offset"]) == (victim.segment.name, victim.offset)
    assert (corrupt[0]["first_seq"], corrupt[0]["last_seq"]) == (victim.seq, victim.seq)
    assert not log_events_named(daemon, "journal_tail_cut")
    after = send_one_more(daemon)
    assert after == COMMITTED + JOURNALED + 1, "seq must continue past the journal"
    # A second restart replays nothing twice and dead-letters nothing twice.
    daemon.restart()
    assert daemon.stop() == 0

    stored = stored_ids(daemon)
    victim_id = next(i for i, s in acks.items() if s == victim.seq)
    assert {i: s for i, s in stored.items() if i != "after"} == {
        i: s for i, s in acks.items() if i != victim_id}
    dead = daemon.query("SELECT seq, source, code, raw, reason FROM dead_letters")
    assert len(dead) == 1, dead
    seq, source, code, raw, reason = dead[0]
    assert (seq, source, code) == (victim.seq, "journal", "journal_corrupt")
    assert raw == damaged_raw, "the dead letter must keep the damaged record's raw bytes"
    assert victim.segment.name in reason
    top, dead_seqs = assert_seq_gap_free(daemon)
    assert (top, dead_seqs) == (after, {victim.seq})
    # The stream keeps the versions first assigned: the dead-lettered event's
    # stream_seq is simply absent, nothing is renumbered.
    victim_stream_seq = victim.seq - COMMITTED
    stream = [row[0] for row in daemon.query(
        "SELECT stream_seq FROM events WHERE stream IS NOT NULL ORDER BY seq")]
    assert stream == [v for v in range(1, JOURNALED + 1) if v != victim_stream_seq]
    assert_integrity_ok(daemon.db_path)


def test_replay_after_clean_journal_commits_everything_once(make_daemon: Any) -> None:
    """Control: the same setup without damage loses nothing and logs no damage."""
    daemon = make_daemon()
    acks, _records = journal_only_setup(daemon)
    daemon.start()
    replayed = log_events_named(daemon, "replay_finished")
    assert replayed and replayed[-1]["events"] == JOURNALED
    wait_for(lambda: committed_seq(daemon) == COMMITTED + JOURNALED, 15, "replay commit")
    assert daemon.stop() == 0
    assert stored_ids(daemon) == acks
    assert not log_events_named(daemon, "journal_tail_cut")
    assert not log_events_named(daemon, "journal_record_corrupt")
    assert assert_seq_gap_free(daemon) == (COMMITTED + JOURNALED, set())
    assert_integrity_ok(daemon.db_path)


def test_corrupt_record_ending_a_segment_is_dead_lettered_not_cut(make_daemon: Any) -> None:
    """The last record of a segment that is followed by another segment is not a tail."""
    daemon = make_daemon({"storage": {"journal_segment_bytes": "4KB"}})
    acks, records = journal_only_setup(daemon)
    segments = sorted({r.segment for r in records})
    assert len(segments) > 3, "the journal did not rotate"
    middle = segments[len(segments) // 2]
    victim = [r for r in records if r.segment == middle][-1]
    with victim.segment.open("r+b") as handle:
        handle.seek(victim.payload_offset + victim.length // 2)
        handle.write(b"\xde\xad\xbe\xef")

    daemon.start()
    wait_for(lambda: event_count(daemon) == COMMITTED + JOURNALED - 1, 15, "the replay commit")
    assert daemon.stop() == 0
    victim_id = next(i for i, s in acks.items() if s == victim.seq)
    assert stored_ids(daemon) == {i: s for i, s in acks.items() if i != victim_id}
    assert daemon.query("SELECT seq, source FROM dead_letters") == [(victim.seq, "journal")], (
        f"log: {log_events_named(daemon, 'journal_tail_cut')}")
    assert assert_seq_gap_free(daemon) == (COMMITTED + JOURNALED, {victim.seq})


def test_checkpoint_never_passes_events_still_uncommitted(make_daemon: Any) -> None:
    """A crash while replaying around a corrupt record must lose nothing.

    The writer commits the replayed events in small batches; the corrupt record's dead
    letter must not carry the checkpoint past events of later batches. The crash is a
    real SIGKILL while the second batch's commit is in progress (made slow by a
    test-only trigger on events).
    """
    daemon = make_daemon()
    acks, records = journal_only_setup(daemon)
    victim = records[len(records) // 2]
    with victim.segment.open("r+b") as handle:
        handle.seek(victim.payload_offset + victim.length // 2)
        handle.write(b"\xde\xad\xbe\xef")
    second_batch = COMMITTED + 11
    conn = sqlite3.connect(daemon.db_path, isolation_level=None)
    try:
        conn.execute("CREATE TABLE slow (x)")
        conn.executemany("INSERT INTO slow VALUES (?)", [(i,) for i in range(10_000)])
        conn.execute(f"CREATE TRIGGER slow BEFORE INSERT ON events WHEN NEW.seq = {second_batch}"
                     " BEGIN SELECT count(*) FROM slow a, slow b; END")
    finally:
        conn.close()
    daemon.sections["writer"] = {"batch_max": 10}
    write_config(daemon.config_path, daemon.sections)

    daemon.start()
    wait_for(lambda: event_count(daemon) >= COMMITTED + 10, 10, "the first replayed batch",
             interval=0.01)
    daemon.kill()  # the second batch is inside its slow commit
    checkpoint = committed_seq(daemon)
    present = event_count(daemon) + int(
        daemon.query("SELECT count(*) FROM dead_letters WHERE seq <= ?", checkpoint)[0][0])
    assert present == checkpoint, (
        f"checkpoint {checkpoint} ran ahead: only {present} seqs up to it are stored")

    conn = sqlite3.connect(daemon.db_path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER slow")
    finally:
        conn.close()
    daemon.start()
    assert daemon.stop() == 0
    victim_id = next(i for i, s in acks.items() if s == victim.seq)
    stored = stored_ids(daemon)
    lost = sorted(s for i, s in acks.items() if i != victim_id and i not in stored)
    assert not lost, f"acknowledged events lost after the crash: seq {lost[0]}..{lost[-1]}"
    assert assert_seq_gap_free(daemon) == (COMMITTED + JOURNALED, {victim.seq})
