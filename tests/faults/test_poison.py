"""Poison events: an insert that fails for one event must cost only that event.

The fault is a real schema change made from this test while the daemon runs: a
trigger that aborts the insert of events of type `poison.event`. The writer must
bisect the batch, dead-letter exactly the poison events (source "writer", their seq,
the SQLite error as reason) and commit every neighbour, keeping seq gap-free; once the
cause is removed, `POST /dlq/retry` on the status socket stores the event under its
original seq.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec
import pytest
from conftest import wait_for
from fault_helpers import (
    acked_seqs,
    assert_integrity_ok,
    assert_seq_gap_free,
    event_count,
    status_request,
)

BATCH = 50
POISON_TRIGGER = (
    "CREATE TRIGGER poison BEFORE INSERT ON events"
    " WHEN NEW.type = (SELECT id FROM names WHERE value = 'poison.event')"
    " BEGIN SELECT RAISE(ABORT, 'poisoned'); END")


def poison_the_schema(daemon: Any) -> None:
    conn = sqlite3.connect(daemon.db_path, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO names (value) VALUES ('poison.event') ON CONFLICT DO NOTHING")
        conn.execute(POISON_TRIGGER)
        conn.execute("COMMIT")
    finally:
        conn.close()


def dead_letter_count(daemon: Any) -> int:
    return int(daemon.query("SELECT count(*) FROM dead_letters")[0][0])


@pytest.mark.parametrize("poison_at", [[25], [0, BATCH - 1], [17, 18, 40]],
                         ids=["middle", "first-and-last", "adjacent-and-apart"])
def test_poison_event_lands_alone_in_dead_letters_and_its_neighbours_commit(
        make_daemon: Any, poison_at: list[int]) -> None:
    daemon = make_daemon()
    with daemon.connect() as conn:
        # Something committed first, so the writer's name cache is warm.
        warm = [{"type": "normal.event", "id": f"w{i}", "stream": "s"} for i in range(5)]
        acks = acked_seqs(warm, conn.request(warm))
        wait_for(lambda: event_count(daemon) == 5, 10, "the first commit")
        poison_the_schema(daemon)

        events = [{"type": "poison.event" if i in poison_at else "normal.event",
                   "id": f"e{i}", "actor": "tester", "stream": "s", "data": i}
                  for i in range(BATCH)]
        reply = conn.request(events)  # accepted: the journal has them all
        assert reply["ok"] == BATCH, reply
        batch_acks = acked_seqs(events, reply)
        poison_seqs = {batch_acks[f"e{i}"] for i in poison_at}
        wait_for(lambda: event_count(daemon) + dead_letter_count(daemon) == 5 + BATCH, 15,
                 "the batch to be committed or dead-lettered")
        # The writer goes on with later batches.
        after = [{"type": "normal.event", "id": f"a{i}", "stream": "s"} for i in range(5)]
        after_acks = acked_seqs(after, conn.request(after))
        wait_for(lambda: event_count(daemon) == 5 + BATCH - len(poison_at) + 5, 10,
                 "the next batch to commit")
    assert daemon.stop() == 0

    dead = daemon.query(
        "SELECT seq, source, code, reason, raw, attempts FROM dead_letters ORDER BY seq")
    assert [row[0] for row in dead] == sorted(poison_seqs), dead
    for seq, source, code, reason, raw, attempts in dead:
        assert (source, code, attempts) == ("writer", "commit_failed", 1)
        assert "poisoned" in reason
        kept = msgspec.msgpack.decode(raw)  # the event as sequenced, to be retried later
        assert seq in (kept if isinstance(kept, list) else kept.values()), kept
    stored = dict(daemon.query("SELECT id, seq FROM events"))
    expected = acks | after_acks | {
        i: s for i, s in batch_acks.items() if s not in poison_seqs}
    assert stored == expected
    top, dead_seqs = assert_seq_gap_free(daemon)
    assert (top, dead_seqs) == (5 + BATCH + 5, poison_seqs)
    ((committed,),) = daemon.query("SELECT value FROM meta WHERE key = 'committed_seq'")
    assert committed == top
    assert_integrity_ok(daemon.db_path)


def test_poison_event_stays_dead_lettered_across_a_restart(make_daemon: Any) -> None:
    """The dead letter and the checkpoint commit together: a restart replays nothing."""
    daemon = make_daemon()
    poison_the_schema(daemon)
    with daemon.connect() as conn:
        events = [{"type": "poison.event" if i == 3 else "normal.event", "id": f"e{i}"}
                  for i in range(8)]
        acks = acked_seqs(events, conn.request(events))
    wait_for(lambda: event_count(daemon) + dead_letter_count(daemon) == 8, 15, "the commit")
    daemon.kill()
    daemon.start()
    assert daemon.stop() == 0
    assert daemon.query("SELECT seq FROM dead_letters") == [(acks["e3"],)]
    assert assert_seq_gap_free(daemon) == (8, {acks["e3"]})


def test_dead_lettered_poison_event_is_stored_by_retry_once_the_cause_is_removed(
        make_daemon: Any) -> None:
    daemon = make_daemon()
    poison_the_schema(daemon)
    with daemon.connect() as conn:
        events = [{"type": "poison.event" if i == 5 else "normal.event", "id": f"e{i}",
                   "stream": "s", "data": i} for i in range(10)]
        acks = acked_seqs(events, conn.request(events))
    wait_for(lambda: event_count(daemon) + dead_letter_count(daemon) == 10, 15, "the commit")
    ((dlq_id, seq),) = daemon.query("SELECT dlq_id, seq FROM dead_letters")
    assert seq == acks["e5"]

    # While the cause is still there, a retry fails again and the entry stays, counted.
    status, result = status_request(daemon, "POST", "/dlq/retry", {"ids": [dlq_id]})
    assert status == 200, result
    assert (result["retried"], result["accepted"], result["failed"]) == (1, 0, 1), result
    ((attempts, reason),) = daemon.query(
        "SELECT attempts, reason FROM dead_letters WHERE dlq_id = ?", dlq_id)
    assert attempts == 2 and "poisoned" in reason

    # Remove the cause (a real schema change), retry: stored under its original seq.
    conn = sqlite3.connect(daemon.db_path, isolation_level=None, timeout=10)
    try:
        conn.execute("DROP TRIGGER poison")
    finally:
        conn.close()
    status, result = status_request(daemon, "POST", "/dlq/retry", {"ids": [dlq_id]})
    assert status == 200, result
    assert (result["retried"], result["accepted"], result["failed"]) == (1, 1, 0), result
    assert daemon.query("SELECT count(*) FROM dead_letters") == [(0,)]

    # Retrying is idempotent: resending the id is a duplicate of the restored event.
    with daemon.connect() as conn:
        again = conn.request({"type": "poison.event", "id": "e5", "stream": "s"})
    assert again.get("duplicates") == [[0, seq]], again
    assert daemon.stop() == 0
    # Each admin action is itself recorded as an auditd.admin.* event after ours.
    admin = daemon.query("SELECT e.seq, n.value FROM events e JOIN names n ON n.id = e.type"
                         " WHERE n.value LIKE 'auditd.admin.%' ORDER BY e.seq")
    assert [row[1] for row in admin] == ["auditd.admin.dlq.retry"] * 2, admin
    stored = daemon.query("SELECT id, seq FROM events WHERE seq NOT IN"
                          f" ({','.join(str(row[0]) for row in admin)})")
    assert dict(stored) == acks
    assert assert_seq_gap_free(daemon) == (10 + len(admin), set())
    stream = [row[0] for row in daemon.query(
        "SELECT stream_seq FROM events WHERE stream IS NOT NULL ORDER BY seq")]
    assert stream == list(range(1, 11)), "the restored event keeps its stream_seq"
    assert_integrity_ok(daemon.db_path)
