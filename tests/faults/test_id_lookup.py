"""A failing id lookup: bounded retries, an error reply, health, and recovery.

The fault is real: another connection renames the `events` table away, so the
daemon's lookups fail with SQLite's own "no such table: events". Only frames whose ids
the Bloom filter cannot rule out need a lookup: here an id that is stored and, after a
restart, no longer in the recent window. Nothing is pending meanwhile, so the writer
is not involved.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Any

from conftest import DaemonProcess, wait_committed, wait_for
from fault_helpers import health, log_events_named, status_request


@contextlib.contextmanager
def events_table_unreadable(daemon: DaemonProcess) -> Iterator[None]:
    conn = sqlite3.connect(daemon.db_path, isolation_level=None, timeout=30)
    try:
        conn.execute("ALTER TABLE events RENAME TO events_unreadable")
        try:
            yield
        finally:
            conn.execute("ALTER TABLE events_unreadable RENAME TO events")
    finally:
        conn.close()


def test_a_failing_id_lookup_is_answered_shown_in_health_and_recovers(
        make_daemon: Any) -> None:
    daemon = make_daemon()
    with daemon.connect() as conn:
        assert conn.request({"type": "t", "id": "known"}) == {"ok": 1, "first": 1, "last": 1}
    wait_committed(daemon, 1)
    daemon.restart()  # "known" is now only in the Bloom filter and the database
    with daemon.connect() as conn, events_table_unreadable(daemon):
        replies = [conn.request({"type": "t", "id": "known"}) for _ in range(3)]
        during = health(daemon)
        stats = status_request(daemon, "GET", "/stats")[1]
    # Each frame is answered (not wedged), refused whole, with the reason.
    for reply in replies:
        assert reply["ok"] == 0 and reply["error"] == "overloaded", reply
        assert reply["retry_after_ms"] == 1000
        assert reply["message"].startswith("the id lookup failed 5 times ("), reply
        assert "no such table: events" in reply["message"], reply
        assert reply["message"].endswith("nothing of the frame was accepted, send it again")
    assert during["status"] == "failing", during
    check = during["checks"]["id_lookup"]
    assert not check["ok"] and check["severity"] == "failing", check
    assert "no such table: events" in check["detail"], check
    assert stats["id_lookup"]["refused_frames"] == 3
    assert stats["id_lookup"]["failures"] >= 15  # five attempts a frame
    assert stats["accepted"] == 0

    # Fixed: the probe finds lookups working, health clears by itself ...
    wait_for(lambda: health(daemon)["checks"]["id_lookup"]["ok"], 30, "id_lookup to recover")
    # (Other readers that met the missing table, retention's look at the store among
    # them, clear on their own next attempt.)
    wait_for(lambda: health(daemon)["status"] == "ok", 30, "health to be ok again")
    # ... and the client's resend gets the duplicates answer it was owed.
    with daemon.connect() as conn:
        assert conn.request({"type": "t", "id": "known"}) == {"ok": 0, "duplicates": [[0, 1]]}
    assert daemon.query("SELECT id, seq FROM events") == [("known", 1)]
    # Bounded logging: one line when lookups began failing, one when they recovered.
    failing = log_events_named(daemon, "id_lookup_failing")
    assert len(failing) == 1 and "no such table: events" in failing[0]["error"], failing
    assert len(log_events_named(daemon, "id_lookup_recovered")) == 1
    assert "Traceback" not in daemon.log_text()
