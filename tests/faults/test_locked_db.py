"""Locked database: another process holds `BEGIN IMMEDIATE` for 5 s under load.

Replies must keep flowing (they follow the journal write, not the commit), health must
say `degraded` with the reason, and once the lock is gone everything drains into the
database in order, with no operator action.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
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

LOCK_SECONDS = 5.0
FRAME = 20

HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
conn.execute("BEGIN IMMEDIATE")
print("locked", time.monotonic(), flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
print("released", time.monotonic(), flush=True)
conn.close()
"""


class Load(threading.Thread):
    """One connection sending FRAME-event batches back to back, timing each reply."""

    def __init__(self, daemon: Any) -> None:
        super().__init__(daemon=True)
        self.conn = daemon.connect()
        self.stop = threading.Event()
        self.acks: dict[str, int] = {}
        self.timings: list[tuple[float, float]] = []  # (reply arrived, latency)
        self.error: BaseException | None = None

    def run(self) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                events = [{"type": "lock.test", "id": f"e{n + i}", "stream": "locked",
                           "data": n + i} for i in range(FRAME)]
                n += FRAME
                sent = time.monotonic()
                reply = self.conn.request(events)
                arrived = time.monotonic()
                self.acks.update(acked_seqs(events, reply))
                self.timings.append((arrived, arrived - sent))
                time.sleep(0.005)
        except BaseException as exc:
            self.error = exc
        finally:
            self.conn.close()


def test_replies_keep_flowing_while_another_process_holds_the_write_lock(
        make_daemon: Any) -> None:
    daemon = make_daemon()
    load = Load(daemon)
    load.start()
    holder = None
    try:
        time.sleep(0.5)
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(daemon.db_path), str(LOCK_SECONDS)],
            stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None
        word, stamp = holder.stdout.readline().split()
        assert word == "locked"
        locked_at = float(stamp)
        committed_at_lock = event_count(daemon)
        time.sleep(1.0)
        locked_health = health(daemon)
        stuck, acked = event_count(daemon), len(load.acks)
        word, stamp = holder.stdout.readline().split()
        assert word == "released"
        released_at = float(stamp)
        assert holder.wait(10) == 0
        time.sleep(0.5)
    finally:
        load.stop.set()
        load.join(30)
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
            holder.stdout.close()  # type: ignore[union-attr]
        elif holder is not None and holder.stdout is not None:
            holder.stdout.close()
    assert load.error is None, repr(load.error)
    assert stuck == committed_at_lock, "commits went on: the lock was not really held"
    assert acked > stuck + 100, "too few events acknowledged while commits were blocked"

    during = [latency for arrived, latency in load.timings
              if locked_at + 0.3 < arrived < released_at - 0.1]
    assert len(during) > 50, f"only {len(during)} replies while the lock was held"
    during.sort()
    p99 = during[int(len(during) * 0.99)]
    assert during[-1] < 1.0, f"a reply waited {during[-1]:.3f}s: replies wait for SQLite"
    assert p99 < 0.1, f"p99 reply latency {p99 * 1000:.1f} ms while the database is locked"

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
