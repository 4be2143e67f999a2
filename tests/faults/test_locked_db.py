"""Locked database: another process holds `BEGIN IMMEDIATE` under load.

Replies must keep flowing (they follow the journal write, not the commit), health must
say `degraded` with the reason, and once the lock is gone everything drains into the
database in order, with no operator action. The lock is held until the test has seen
all that, not for a fixed time; how fast replies come meanwhile is `auditd bench`'s
business, not the suite's.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

from conftest import wait_for
from fault_helpers import (
    acked_seqs,
    assert_integrity_ok,
    assert_seq_gap_free,
    event_count,
    health,
    log_events_named,
)

FRAME = 20
REPLIES_WHILE_LOCKED = 50

# Holds the write lock until told to let go (a line on stdin).
HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
print("released", flush=True)
conn.close()
"""


class Load(threading.Thread):
    """One connection sending FRAME-event batches back to back, counting the replies."""

    def __init__(self, daemon: Any) -> None:
        super().__init__(daemon=True)
        self.conn = daemon.connect()
        self.stop = threading.Event()
        self.acks: dict[str, int] = {}
        self.replies = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                events = [{"type": "lock.test", "id": f"e{n + i}", "stream": "locked",
                           "data": n + i} for i in range(FRAME)]
                n += FRAME
                reply = self.conn.request(events)
                self.acks.update(acked_seqs(events, reply))
                self.replies += 1
        except BaseException as exc:
            self.error = exc
        finally:
            self.conn.close()

    def wait_replies(self, count: int, what: str) -> None:
        """Until `count` more replies than now have come back."""
        target = self.replies + count
        wait_for(lambda: self.replies >= target or self.error is not None, 60, what)
        assert self.error is None, repr(self.error)


def test_replies_keep_flowing_while_another_process_holds_the_write_lock(
        make_daemon: Any) -> None:
    daemon = make_daemon()
    load = Load(daemon)
    load.start()
    holder = None
    try:
        load.wait_replies(10, "load before the lock")
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(daemon.db_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdin is not None and holder.stdout is not None
        assert holder.stdout.readline().split() == ["locked"]
        # What the writer had committed before the lock, once it has stopped committing.
        locked_health = wait_for(lambda: (h := health(daemon))["status"] == "degraded" and h,
                                 30, "health to say degraded")
        committed_at_lock, acked_at_lock = event_count(daemon), len(load.acks)
        # Replies go on while the writer is stuck: they follow the journal, not SQLite.
        load.wait_replies(REPLIES_WHILE_LOCKED, "replies while the lock is held")
        stuck, acked = event_count(daemon), len(load.acks)
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert holder.stdout.readline().split() == ["released"]
        assert holder.wait(10) == 0
        load.wait_replies(10, "load after the lock")
    finally:
        load.stop.set()
        load.join(30)
        if holder is not None:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
            for pipe in (holder.stdin, holder.stdout):
                if pipe is not None:
                    pipe.close()
    assert load.error is None, repr(load.error)
    assert stuck == committed_at_lock, "commits went on: the lock was not really held"
    assert acked >= acked_at_lock + REPLIES_WHILE_LOCKED * FRAME, (
        "too few events acknowledged while commits were blocked")

    failing = log_events_named(daemon, "commit_failing")
    assert failing, "no commit_failing log line while the database was locked"
    assert "locked" in failing[0]["error"] or "busy" in failing[0]["error"], failing[0]
    assert locked_health["status"] == "degraded", locked_health
    check = locked_health["checks"]["database_writable"]
    assert not check["ok"] and "locked" in check["detail"], locked_health

    # Everything drains by itself (the writer retries with capped backoff), in order.
    wait_for(lambda: event_count(daemon) == len(load.acks), 20,
             f"all {len(load.acks)} acknowledged events to be committed")
    assert log_events_named(daemon, "commit_recovered")
    assert daemon.running
    assert health(daemon)["status"] == "ok"
    assert daemon.stop() == 0
    assert dict(daemon.query("SELECT id, seq FROM events")) == load.acks
    assert assert_seq_gap_free(daemon) == (len(load.acks), set())
    stream = daemon.query("SELECT stream_seq FROM events ORDER BY seq")
    assert [row[0] for row in stream] == list(range(1, len(stream) + 1))
    assert_integrity_ok(daemon.db_path)
