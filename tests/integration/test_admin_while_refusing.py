"""Admin calls answer while ingest refuses, and their audit events are never lost.

Every admin action (a refused one too) records an `auditd.admin.*` event through
ingest. Here ingest cannot take it: the buffer is full and the writer stalled (another
connection holds the database's write lock with BEGIN EXCLUSIVE), or the disk is
below the reserve. Each call must answer with its own result regardless, and the admin
events must be stored once ingest can take them: by the daemon while it runs, or by
the replay at the next start when it is stopped first.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from typing import Any

import msgspec
from conftest import (
    FAST_RETRY,
    DaemonProcess,
    UnixHTTPConnection,
    wait_committed,
    wait_for,
    write_config,
)

CAPACITY = 16
ACTIONS = ["reload", "dlq.drop", "dlq.retry", "backup", "recover", "reload", "denied"]


@contextlib.contextmanager
def exclusive_lock(daemon: DaemonProcess) -> Iterator[None]:
    """The database's write lock, held from another connection: the writer stalls."""
    conn = sqlite3.connect(daemon.db_path, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        conn.close()


def post(daemon: DaemonProcess, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    """One admin call. The timeout is far above the daemon's bound, and fails the test
    where a call hangs."""
    conn = UnixHTTPConnection(daemon.status_socket)
    conn.timeout = 20
    try:
        conn.request("POST", path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        document: dict[str, Any] = json.loads(response.read())
        return response.status, document
    finally:
        conn.close()


def admin_events(daemon: DaemonProcess) -> list[tuple[str, int, dict[str, Any]]]:
    rows = daemon.query(
        "SELECT t.value, e.uid, e.data FROM events e JOIN names t ON t.id = e.type"
        " WHERE t.value LIKE 'auditd.admin.%' ORDER BY e.seq")
    return [(kind, uid, msgspec.msgpack.decode(data)) for kind, uid, data in rows]


def log_named(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [event for event in daemon.log_events() if event.get("event") == name]


def every_admin_call(daemon: DaemonProcess) -> dict[str, tuple[int, dict[str, Any]]]:
    """Each admin action once, then a 403: admin_uids reloaded away from uid 0."""
    answers = {
        "reload": post(daemon, "/reload"),
        "dlq.drop": post(daemon, "/dlq/drop", {"ids": [4242]}),
        "dlq.retry": post(daemon, "/dlq/retry", {"ids": [4242]}),
        "backup": post(daemon, "/backup", {"dest": str(daemon.root / "copy.db")}),
        "recover": post(daemon, "/recover", {"path": str(daemon.root / "missing.db")}),
    }
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(text.replace("admin_uids = [0]", "admin_uids = [4242]"))
    answers["reload again"] = post(daemon, "/reload")
    answers["denied"] = post(daemon, "/dlq/drop", {"all": True})
    return answers


def assert_answered_with_their_results(answers: dict[str, tuple[int, dict[str, Any]]],
                                       daemon: DaemonProcess) -> None:
    queued = ("ingest is not accepting events now; the admin event is queued and recorded "
              "as soon as it does")
    assert answers["reload"] == (200, {"applied": [], "needs_restart": [], "audit": queued})
    assert answers["dlq.drop"] == (200, {"dropped": 0, "missing": [4242], "audit": queued})
    assert answers["dlq.retry"] == (200, {"retried": 0, "accepted": 0, "failed": 0,
                                          "missing": [4242], "audit": queued})
    status, backup = answers["backup"]
    assert status == 200 and backup["audit"] == queued, backup
    assert (daemon.root / "copy.db").stat().st_size == backup["bytes"]
    assert answers["recover"] == (409, {"error": "refused", "message":
                                        f"{daemon.root / 'missing.db'}: no such file"})
    assert answers["reload again"] == (200, {"applied": ["status.admin_uids"],
                                             "needs_restart": [], "audit": queued})
    assert answers["denied"] == (403, {"error": "forbidden",
                                       "message": "uid 0 is not in status.admin_uids"})


def assert_the_trail(daemon: DaemonProcess) -> None:
    events = wait_for(lambda: len(admin_events(daemon)) >= len(ACTIONS) and
                      admin_events(daemon), 30, "the queued admin events to be stored")
    assert [kind for kind, _uid, _data in events] == [f"auditd.admin.{a}" for a in ACTIONS]
    assert {uid for _kind, uid, _data in events} == {0}
    outcomes = [data.get("outcome") for _kind, _uid, data in events]
    assert outcomes == ["ok", "ok", "ok", "ok", "refused", "ok", "forbidden"]
    assert events[-1][2]["attempted"] == "dlq.drop"


def test_admin_calls_answer_while_the_buffer_is_full_and_the_writer_stalled(
        make_daemon: Any) -> None:
    daemon = make_daemon({"buffer": {"capacity": CAPACITY, "overflow": "reject"},
                          **FAST_RETRY})
    with exclusive_lock(daemon):
        with daemon.connect() as conn:
            for i in range(CAPACITY):
                assert conn.request({"type": "fill", "id": f"f{i}"})["ok"] == 1
            refused = conn.request({"type": "fill", "id": "one-too-many"})
            assert refused["error"] == "overloaded", refused
        answers = every_admin_call(daemon)
        assert_answered_with_their_results(answers, daemon)
        queued = log_named(daemon, "admin_event_queued")
        assert [e["type"] for e in queued] == [f"auditd.admin.{a}" for a in ACTIONS]
        assert admin_events(daemon) == []  # nothing was committed meanwhile
    # The lock is gone: the writer drains, ingest takes the queued events, in order.
    assert_the_trail(daemon)
    fill = daemon.query("SELECT id FROM events WHERE id LIKE 'f%' ORDER BY seq")
    assert [row[0] for row in fill] == [f"f{i}" for i in range(CAPACITY)]
    seqs = [row[0] for row in daemon.query("SELECT seq FROM events ORDER BY seq")]
    assert seqs == list(range(1, CAPACITY + len(ACTIONS) + 1))
    assert daemon.stop() == 0


def test_admin_events_queued_at_stop_are_journaled_and_stored_at_the_next_start(
        make_daemon: Any) -> None:
    # Below the disk reserve from the first maintenance pass: ingest refuses everything.
    daemon = make_daemon({"storage": {"reserve_bytes": "1000TB"}})
    wait_for(lambda: "disk space low" in json.dumps(get_health(daemon)), 30,
             "ingest to refuse for the disk reserve")
    answers = every_admin_call(daemon)
    assert_answered_with_their_results(answers, daemon)
    assert daemon.stop() == 0
    journaled = log_named(daemon, "admin_event_journaled_at_stop")
    assert [e["type"] for e in journaled] == [f"auditd.admin.{a}" for a in ACTIONS]
    assert not log_named(daemon, "admin_event_lost")
    # Started again with room on the disk: the replay commits them.
    daemon.sections["storage"]["reserve_bytes"] = "1MB"
    write_config(daemon.config_path, daemon.sections)
    daemon.start()
    wait_committed(daemon, len(ACTIONS))
    assert_the_trail(daemon)


def get_health(daemon: DaemonProcess) -> dict[str, Any]:
    conn = UnixHTTPConnection(daemon.status_socket)
    try:
        conn.request("GET", "/health")
        document: dict[str, Any] = json.loads(conn.getresponse().read())
        return document
    finally:
        conn.close()


def test_admin_events_past_the_queue_bound_are_counted_in_one_summary_event(
        make_daemon: Any) -> None:
    """A caller spamming refused admin calls while ingest refuses: the queue stops at its
    bound (MAX_QUEUED), each one past it is logged whole, and one auditd.admin.suppressed
    event, behind the queued ones, says how many were left out."""
    from auditd.ingest.daemon_events import MAX_QUEUED

    daemon = make_daemon({"storage": {"reserve_bytes": "1000TB"},
                          "status": {"admin_uids": [4242]}})
    wait_for(lambda: "disk space low" in json.dumps(get_health(daemon)), 30,
             "ingest to refuse for the disk reserve")
    extra = 5
    for _ in range(MAX_QUEUED + extra):
        status, answer = post(daemon, "/dlq/drop", {"all": True})
        assert status == 403, answer
    suppressed = wait_for(lambda: len(found := log_named(daemon, "admin_event_suppressed"))
                          >= extra and found, 10, "the suppressed events' log lines")
    assert len(suppressed) == extra
    assert suppressed[-1]["suppressed"] == extra
    assert suppressed[-1]["record"]["type"] == "auditd.admin.denied"
    assert len(log_named(daemon, "admin_event_queued")) == MAX_QUEUED
    assert not log_named(daemon, "admin_event_failed")
    # Room again (a reload lowers the reserve): the queue drains, then the summary.
    daemon.sections["storage"]["reserve_bytes"] = "1MB"
    write_config(daemon.config_path, daemon.sections)
    assert daemon.stop() == 0  # the reserve needs a restart: queued ones are journaled
    daemon.start()
    wait_committed(daemon, MAX_QUEUED + 1)
    events = admin_events(daemon)
    assert [kind for kind, _uid, _data in events] == (
        ["auditd.admin.denied"] * MAX_QUEUED + ["auditd.admin.suppressed"])
    summary = events[-1][2]
    assert summary["suppressed"] == {"auditd.admin.denied": extra}
    assert summary["total"] == extra and summary["max_queued"] == MAX_QUEUED
    assert summary["first_ns"] <= summary["last_ns"]
