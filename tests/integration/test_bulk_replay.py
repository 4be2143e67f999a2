"""A long journal replayed at start: every event in the buffer before the daemon says
ready, all of it committed, and the hot table sealed into partitions behind the replay
(schema 3 has no filter index to set aside for it)."""

from __future__ import annotations

from typing import Any

from conftest import catalogued, stored_seqs, wait_committed, wait_sealed_through

from auditd.bench.micro import write_journal

# Three partitions' worth, four times the buffer: the replay waits for commits, and
# seals, while it runs (a larger journal took a minute on a loaded machine and showed
# nothing more).
JOURNALED = 30_000
PARTITION = 10_000
CAPACITY = 7_500


def test_a_long_replay_is_committed_before_ready_and_sealed_behind(make_daemon: Any) -> None:
    daemon = make_daemon({"storage": {"partition_events": PARTITION},
                          "buffer": {"capacity": CAPACITY}}, start=False)
    write_journal(daemon.storage, JOURNALED)  # as a crash would leave it: nothing committed
    daemon.start(timeout=120)
    names = [line["event"] for line in daemon.log_events()]
    assert names.index("replay_finished") < names.index("daemon_ready")
    wait_committed(daemon, JOURNALED)

    wait_sealed_through(daemon, JOURNALED)
    assert [entry[:2] for entry in catalogued(daemon)] == [
        (1, 10_000), (10_001, 20_000), (20_001, 30_000)]
    assert daemon.query("SELECT count(*) FROM events") == [(0,)]
    stored = stored_seqs(daemon)
    assert sorted(stored) == list(range(1, JOURNALED + 1))
    assert len(set(stored.values())) == JOURNALED
    assert daemon.query("PRAGMA integrity_check") == [("ok",)]

    with daemon.connect() as conn:  # and ingest goes on from there
        reply = conn.request({"type": "after.replay", "id": "after-replay"})
    assert reply["ok"] == 1 and reply["first"] == JOURNALED + 1
