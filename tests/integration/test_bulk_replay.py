"""A long journal replayed at start: the secondary indexes are set aside for it and built
again, from the rows committed, before the daemon says ready."""

from __future__ import annotations

from typing import Any

from auditd.bench.micro import write_journal

JOURNALED = 120_000  # past the 100,000 replayed events after which indexes are set aside
SET_ASIDE = ["events_actor_ts", "events_correlation", "events_target_ts", "events_ts",
             "events_type_ts"]


def test_a_long_replay_builds_its_indexes_before_ready(make_daemon: Any) -> None:
    daemon = make_daemon(start=False)
    write_journal(daemon.storage, JOURNALED)  # as a crash would leave it: nothing committed
    daemon.start(timeout=120)

    lines = daemon.log_events()
    names = [line["event"] for line in lines]
    aside = next(line for line in lines if line["event"] == "indexes_set_aside")
    built = next(line for line in lines if line["event"] == "indexes_built")
    assert aside["indexes"] == built["indexes"] == SET_ASIDE
    assert aside["replayed"] == 100_000
    assert names.index("indexes_set_aside") < names.index("indexes_built") \
        < names.index("daemon_ready")

    # Ready came after every replayed event was committed and the indexes were built.
    assert daemon.query("SELECT value FROM meta WHERE key='committed_seq'") == [(JOURNALED,)]
    assert daemon.query("SELECT count(*), min(seq), max(seq) FROM events") == [
        (JOURNALED, 1, JOURNALED)]
    assert daemon.query("SELECT count(*) FROM meta WHERE key='deferred_indexes'") == [(0,)]
    indexes = {name for (name,) in daemon.query(
        "SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='events'")}
    assert set(SET_ASIDE) <= indexes
    plan = " ".join(str(row) for row in daemon.query(
        "EXPLAIN QUERY PLAN SELECT seq FROM events WHERE actor = 2 AND ts > 0"))
    assert "events_actor_ts" in plan
    # Every row is in the rebuilt indexes: counted through the index and through the table.
    assert daemon.query("SELECT count(*) FROM events INDEXED BY events_ts WHERE ts > 0") == [
        (JOURNALED,)]
    assert daemon.query("PRAGMA integrity_check") == [("ok",)]

    with daemon.connect() as conn:  # and ingest goes on from there
        reply = conn.request({"type": "after.replay", "id": "after-replay"})
    assert reply["ok"] == 1 and reply["first"] == JOURNALED + 1
