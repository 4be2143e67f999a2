"""While the daemon replays its journal at start, /stats, /metrics and /health say how far
it got, out of how many: total is set before the first event is pushed, done follows
every push."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from conftest import DaemonProcess, UnixHTTPConnection, wait_committed, wait_for, write_lock

from auditd.bench.micro import write_journal
from auditd.store.connection import connect_sync
from auditd.store.migrations import migrate

MakeDaemon = Callable[..., DaemonProcess]
JOURNALED = 5000
CAPACITY = 1000  # what the replay can push while the writer commits nothing


def get(daemon: DaemonProcess, path: str) -> tuple[int, str]:
    conn = UnixHTTPConnection(daemon.status_socket)  # closes its socket when connect fails
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def stats(daemon: DaemonProcess) -> dict[str, Any] | None:
    """/stats, or None while the status socket is not up yet."""
    try:
        status, body = get(daemon, "/stats")
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    assert status == 200, body
    document: dict[str, Any] = json.loads(body)
    return document


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith(name + " "))


def test_replay_progress_shows_in_stats_metrics_and_health(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon({"buffer": {"capacity": CAPACITY}}, start=False)
    daemon.storage.mkdir()
    conn = connect_sync(daemon.db_path)
    migrate(conn)
    conn.close()
    write_journal(daemon.storage, JOURNALED)  # as a crash would leave it: nothing committed
    seen: list[dict[str, Any]] = []  # every replay figure read, in order

    def observed(until: Callable[[dict[str, Any]], bool]) -> Callable[[], bool]:
        def poll() -> bool:
            document = stats(daemon)
            if document is not None:
                seen.append(document["replay"])
            return document is not None and until(document)
        return poll

    # The writer is held (a write lock), so the replay stops once the buffer is full:
    # the figures are read there, not raced past.
    with write_lock(daemon):
        daemon.start(wait=False)
        wait_for(observed(lambda d: d["pending"] == CAPACITY), 60, "a full buffer")
        stuck = seen[-1]
        assert stuck == {"done": CAPACITY, "total": JOURNALED, "finished": False}

        status, text = get(daemon, "/metrics")
        assert status == 200
        assert metric(text, "auditd_replay_total_events") == JOURNALED
        assert metric(text, "auditd_replay_done_events") == CAPACITY
        assert metric(text, "auditd_replay_finished") == 0
        status, body = get(daemon, "/health")
        health = json.loads(body)
        assert (status, health["status"]) == (503, "degraded")
        assert health["checks"]["replay_finished"]["detail"] == (
            f"replaying the journal: {CAPACITY} of {JOURNALED} events so far")

    wait_for(observed(lambda d: d["replay"]["finished"]), 60, "the replay to finish")
    daemon.wait_ready()
    assert seen[-1] == {"done": JOURNALED, "total": JOURNALED, "finished": True}
    dones = [figures["done"] for figures in seen]
    assert dones == sorted(dones), dones  # it only ever rose
    assert all(figures["total"] in (0, JOURNALED) for figures in seen), seen
    wait_committed(daemon, JOURNALED)
    assert daemon.query("SELECT count(*) FROM events") == [(JOURNALED,)]
