"""Poison events: an insert that fails for one event must cost only that event.

The fault is a real schema change made from this test while the daemon runs: a
trigger that aborts the insert of events of type `poison.event`. The writer must
bisect the batch, dead-letter exactly the poison events (source "writer", their seq,
the SQLite error as reason) and commit every neighbour, keeping seq gap-free.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec
import pytest
from fault_helpers import (
    acked_seqs,
    assert_integrity_ok,
    assert_seq_gap_free,
    event_count,
    wait_for,
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
