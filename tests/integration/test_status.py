"""The status socket against the real daemon: shapes, access control, admin audit trail.

Requests go over the real Unix socket with the standard library's http.client, so
the server is tested the way curl and scripts use it. Calls "as another uid" run in
a child that drops to that uid before it connects (as_other_uid.run_as): SO_PEERCRED
then reports that uid, as it would in use.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import pytest
from as_other_uid import can_run_as_other_uid, run_as
from conftest import UnixHTTPConnection, wait_for

from auditd.client import Client
from auditd.status.health import HealthInputs, evaluate

T = TypeVar("T")

NOBODY = 65534
OTHER_UID = 65533  # no passwd entry needed: the kernel only carries numbers
READER_GID = 65532

STATS_KEYS = {"accepted", "committed", "rejected", "duplicates", "dead_letters", "pending",
              "buffer_capacity", "connections", "last_seq", "last_committed_seq",
              "commit_latency_ms", "journal_bytes", "db_bytes", "uptime_s",
              "reply_latency_ms", "batch_size", "dead_letters_by_reason",
              "connections_by_uid", "replay", "rates"}
HEALTH_CHECKS = {"running", "replay_finished", "writer_progress", "pending_age",
                 "database_writable", "journal_writable", "ingest_accepting", "disk_space",
                 "dead_letter_quota", "database_intact", "id_lookup", "sealing",
                 "proofs_tree", "retention"}

as_root_only = pytest.mark.skipif(not can_run_as_other_uid(),
                                  reason="calling as another uid needs root")




def call(path: str, method: str, url: str, body: Any = None,
         raw: bytes | None = None) -> tuple[int, Any]:
    conn = UnixHTTPConnection(path)
    try:
        payload = raw if raw is not None else (None if body is None else json.dumps(body))
        conn.request(method, url, body=payload, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        assert response.getheader("Content-Type", "").startswith("application/json"), data
        return response.status, json.loads(data)
    finally:
        conn.close()


# Runs as another uid (as_other_uid.run_as): the same request as call().
_AS_USER = r"""
import http.client, json, socket, sys
path, method, url, body = sys.argv[1:5]
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
conn = Conn("auditd", timeout=30)
conn.request(method, url, body=body or None, headers={"Content-Type": "application/json"})
response = conn.getresponse()
print(json.dumps({"status": response.status, "type": response.getheader("Content-Type"),
                  "body": response.read().decode()}))
"""


def call_as(uid: int, path: str, method: str, url: str, body: Any = None,
            groups: list[int] | None = None) -> tuple[int, Any]:
    answer = json.loads(run_as(uid, _AS_USER, path, method, url,
                               "" if body is None else json.dumps(body), groups=groups or ()))
    is_json = answer["type"].startswith("application/json")
    return answer["status"], json.loads(answer["body"]) if is_json else answer["body"]


_SEND = """
import json, sys
from auditd.client import Client
with Client(sys.argv[1], raise_on_reject=False) as client:
    client.send_batch(json.loads(sys.argv[2]))
"""


def send_as(uid: int, socket_path: str, events: list[dict[str, Any]]) -> None:
    run_as(uid, _SEND, socket_path, json.dumps(events), imports=["auditd.client"])


def open_to_everyone(daemon: Any) -> None:
    """Let other uids reach the sockets: the test's temp dirs are 0700."""
    for folder in (daemon.root.parent, daemon.root):
        os.chmod(folder, 0o755)


def wait_reply(sock: str, url: str, accept: Callable[[Any], T | None],
               what: str, statuses: tuple[int, ...] = (200,), timeout: float = 30.0) -> T:
    """GET `url` until a reply with one of `statuses` makes `accept(body)` truthy.

    Any other reply (an error document has none of the keys `accept` reads) is retried
    until the deadline, and the last reply is shown if it passes.
    """
    last: list[tuple[int, Any]] = []

    def attempt() -> T | None:
        last[:] = [call(sock, "GET", url)]
        status, body = last[0]
        return accept(body) if status in statuses else None

    try:
        found: T = wait_for(attempt, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last reply to GET {url}: {last[0]!r}") from None
    return found


BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def admin_events(daemon: Any) -> list[tuple[str, int, str, dict[str, Any]]] | None:
    """The committed auditd.admin.* events; None while the database is busy or locked
    (retry), any other error fails at once."""
    try:
        rows = daemon.query(
            "SELECT t.value, e.uid, a.value, e.data FROM events e"
            " JOIN names t ON t.id = e.type LEFT JOIN names a ON a.id = e.actor"
            " WHERE t.value LIKE 'auditd.admin.%' ORDER BY e.seq")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF in BUSY_CODES:
            return None
        raise
    return [(kind, uid, actor, msgspec.msgpack.decode(data)) for kind, uid, actor, data in rows]


def admin_events_when(daemon: Any, count: int) -> list[tuple[str, int, str, dict[str, Any]]]:
    """The admin events once `count` of them are committed."""
    def enough() -> list[tuple[str, int, str, dict[str, Any]]] | None:
        events = admin_events(daemon)
        return events if events is not None and len(events) >= count else None
    found: list[tuple[str, int, str, dict[str, Any]]] = wait_for(
        enough, what=f"{count} admin events")
    return found


OPEN = {"status": {"socket_mode": "0666"}, "ingest": {"socket_mode": "0666"}}


# -- shapes --------------------------------------------------------------------------


def test_health_answers_ok_with_every_named_check(daemon: Any) -> None:
    status, body = call(daemon.status_socket, "GET", "/health")
    assert status == 200, body
    assert body["status"] == "ok"
    assert set(body["checks"]) == HEALTH_CHECKS
    for check in body["checks"].values():
        assert check["ok"] is True and isinstance(check["detail"], str) and check["detail"]
    assert "problems" not in body


def test_stats_has_the_documented_figures_and_counts_traffic(daemon: Any) -> None:
    with Client(daemon.ingest_socket, raise_on_reject=False) as client:
        client.send_batch([{"type": "status.test", "data": i} for i in range(10)])
        client.send({"type": ""})  # rejected: type must not be empty

    def settled(body: dict[str, Any]) -> dict[str, Any] | None:
        done = body["last_committed_seq"] == body["last_seq"] and body["dead_letters"]
        return body if done else None

    body = wait_reply(daemon.status_socket, "/stats", settled, "everything committed")
    assert set(body) >= STATS_KEYS
    assert body["accepted"] == 10 and body["rejected"] == 1 and body["duplicates"] == 0
    assert body["committed"] >= 10 and body["last_seq"] >= 10 and body["pending"] == 0
    assert body["buffer_capacity"] == 65536
    assert body["dead_letters_by_reason"] == {"rejected": 1}
    assert set(body["commit_latency_ms"]) >= {"p50", "p95", "p99"}
    assert 0 < body["commit_latency_ms"]["p50"] <= body["commit_latency_ms"]["p99"]
    assert body["reply_latency_ms"]["count"] == 2
    assert body["journal_bytes"] > 0 and body["db_bytes"] > 0 and body["uptime_s"] > 0
    assert body["replay"]["finished"] is True
    assert set(body["rates"]) == {"window_s", "accepted_per_s", "committed_per_s",
                                  "rejected_per_s"}


def test_stats_counts_open_connections_by_uid(daemon: Any) -> None:
    with Client(daemon.ingest_socket) as client:
        client.send({"type": "hello"})
        body = call(daemon.status_socket, "GET", "/stats")[1]
        assert body["connections"] == 1 and body["connections_by_uid"] == {"0": 1}
    wait_reply(daemon.status_socket, "/stats", lambda body: body["connections"] == 0,
               "the connection to close")


def test_unknown_paths_and_methods_answer_json_errors(daemon: Any) -> None:
    assert call(daemon.status_socket, "GET", "/nope") == (
        404, {"error": "not_found", "message": "no such endpoint: GET /nope"})
    status, body = call(daemon.status_socket, "GET", "/reload")
    assert status == 405 and body["error"] == "method_not_allowed" and "POST" in body["message"]
    status, body = call(daemon.status_socket, "GET", "/dlq?limit=zero")
    assert status == 400 and body == {"error": "bad_request",
                                      "message": "limit='zero': expected an integer"}
    status, body = call(daemon.status_socket, "POST", "/dlq/drop", raw=b'{"ids": [1')
    assert status == 400 and body["error"] == "bad_request"
    status, body = call(daemon.status_socket, "POST", "/dlq/drop", {"ids": [1], "all": True})
    assert status == 400 and "not both" in body["message"]
    status, body = call(daemon.status_socket, "POST", "/dlq/drop",
                        {"ids": list(range(20_000))})  # over the 64 KB body bound
    assert status == 413 and body["error"] == "too_large"


# -- the dead-letter store -----------------------------------------------------------


def test_dlq_list_retry_drop(daemon: Any) -> None:
    with Client(daemon.ingest_socket, raise_on_reject=False) as client:
        client.send_batch([{"type": ""}, {"type": "fine"}, {"type": "x" * 300}])
    sock = daemon.status_socket
    listed = wait_reply(sock, "/dlq", lambda body: body["dead_letters"], "dead letters")
    assert len(listed) == 2
    first, second = listed
    assert {"id", "seq", "source", "code", "reason", "size", "uid", "attempts",
            "first_failed_at", "last_failed_at", "raw"} <= set(first)
    assert first["source"] == "ingest" and first["uid"] == 0 and first["seq"] is None
    assert msgspec.msgpack.decode(base64.b64decode(first["raw"]["$bytes"]))["type"] == ""
    # Paging: limit and the `next` cursor.
    assert call(sock, "GET", "/dlq?limit=1")[1] == {"dead_letters": [first],
                                                   "next": first["id"]}
    page = call(sock, "GET", f"/dlq?limit=1&after={first['id']}")[1]
    assert [e["id"] for e in page["dead_letters"]] == [second["id"]]

    status, body = call(sock, "POST", "/dlq/retry", {"ids": [first["id"], 99999]})
    assert status == 200, body
    assert body["retried"] == 1 and body["failed"] == 1 and body["missing"] == [99999]
    retried = call(sock, "GET", "/dlq?limit=1")[1]["dead_letters"][0]
    assert retried["attempts"] == 2

    status, body = call(sock, "POST", "/dlq/drop", {"ids": [first["id"]]})
    assert (status, body["dropped"]) == (200, 1)
    status, body = call(sock, "POST", "/dlq/drop", {"all": True})
    assert (status, body["dropped"]) == (200, 1)
    assert call(sock, "GET", "/dlq")[1] == {"dead_letters": [], "next": None}


@as_root_only
def test_dlq_readers_see_every_entry_others_only_their_own(make_daemon: Any) -> None:
    daemon = make_daemon({**OPEN, "status": {**OPEN["status"], "reader_gids": [READER_GID]}})
    open_to_everyone(daemon)
    with Client(daemon.ingest_socket, raise_on_reject=False) as client:
        client.send({"type": ""})
    send_as(NOBODY, daemon.ingest_socket, [{"type": ""}])
    sock = daemon.status_socket

    def both(body: dict[str, Any]) -> list[dict[str, Any]] | None:
        entries: list[dict[str, Any]] = body["dead_letters"]
        return entries if len(entries) == 2 else None

    everything = wait_reply(sock, "/dlq", both, "both dead letters")
    assert sorted(e["uid"] for e in everything) == [0, NOBODY]

    status, own = call_as(NOBODY, sock, "GET", "/dlq")
    assert status == 200 and [e["uid"] for e in own["dead_letters"]] == [NOBODY]
    assert call_as(OTHER_UID, sock, "GET", "/dlq")[1]["dead_letters"] == []
    # A supplementary group (read from /proc, not SO_PEERCRED) makes a reader.
    reader = call_as(OTHER_UID, sock, "GET", "/dlq", groups=[READER_GID])[1]
    assert len(reader["dead_letters"]) == 2


# -- admin actions -------------------------------------------------------------------


@as_root_only
def test_non_admins_get_403_on_every_admin_call_and_can_read(make_daemon: Any) -> None:
    daemon = make_daemon(OPEN)
    open_to_everyone(daemon)
    sock = daemon.status_socket
    for path in ("/health", "/stats", "/metrics", "/dlq"):
        assert call_as(NOBODY, sock, "GET", path)[0] == 200, path
    calls = [("/dlq/retry", {"all": True}), ("/dlq/drop", {"ids": [1]}), ("/reload", None),
             ("/backup", {"dest": str(daemon.root / "nope.db")})]
    for path, body in calls:
        status, answer = call_as(NOBODY, sock, "POST", path, body)
        assert status == 403, (path, answer)
        assert answer == {"error": "forbidden",
                          "message": f"uid {NOBODY} is not in status.admin_uids"}
    assert not (daemon.root / "nope.db").exists()
    # Each refusal is itself audited, under the caller's uid.
    denied = admin_events_when(daemon, 4)
    assert [(kind, uid, data["attempted"]) for kind, uid, _actor, data in denied] == [
        ("auditd.admin.denied", NOBODY, action)
        for action in ("dlq.retry", "dlq.drop", "reload", "backup")]


def test_admin_actions_are_recorded_as_auditd_admin_events(daemon: Any) -> None:
    sock = daemon.status_socket
    assert call(sock, "POST", "/reload")[0] == 200
    assert call(sock, "POST", "/dlq/drop", {"all": True})[0] == 200
    assert call(sock, "POST", "/backup", {"dest": str(daemon.root / "b.db")})[0] == 200
    events = admin_events_when(daemon, 3)
    assert [(kind, uid) for kind, uid, _actor, _data in events] == [
        ("auditd.admin.reload", 0), ("auditd.admin.dlq.drop", 0), ("auditd.admin.backup", 0)]
    assert all(actor.startswith("uid:0 ") for _kind, _uid, actor, _data in events)
    reload_data, drop_data, backup_data = (data for *_rest, data in events)
    assert reload_data["outcome"] == "ok" and "applied" in reload_data["result"]
    assert drop_data == {"all": True, "outcome": "ok",
                         "result": {"dropped": 0, "missing": []}}
    assert backup_data["dest"] == str(daemon.root / "b.db")
    # Long lists are cut short in the event (it must stay a small event), not in the reply.
    status, body = call(sock, "POST", "/dlq/drop", {"ids": list(range(1000, 1500))})
    assert status == 200 and len(body["missing"]) == 500
    recorded = admin_events_when(daemon, 4)[3][3]
    assert recorded["ids"][-1] == "... 400 more" and len(recorded["ids"]) == 101
    assert recorded["result"]["missing"][:2] == [1000, 1001]


def test_reload_applies_safe_keys_and_refuses_a_broken_file(daemon: Any) -> None:
    sock, path = daemon.status_socket, daemon.config_path
    original = path.read_text()
    path.write_text(original.replace('level = "info"', 'level = "debug"'))
    status, body = call(sock, "POST", "/reload")
    assert (status, body) == (200, {"applied": ["log.level"], "needs_restart": []})

    path.write_text(original + "\n[buffer]\ncapacity = 0\n")
    status, body = call(sock, "POST", "/reload")
    assert status == 400 and body["error"] == "invalid_config"
    assert "buffer.capacity" in body["message"]
    assert call(sock, "GET", "/health")[0] == 200  # the old config keeps running
    refused = admin_events_when(daemon, 2)[1][3]
    assert refused["outcome"] == "refused" and "buffer.capacity" in refused["message"]

    # Admin lists reload too, and access is decided per request from the new config.
    path.write_text(original.replace("admin_uids = [0]", "admin_uids = [4242]"))
    assert "status.admin_uids" in call(sock, "POST", "/reload")[1]["applied"]
    assert call(sock, "POST", "/reload") == (
        403, {"error": "forbidden", "message": "uid 0 is not in status.admin_uids"})


def test_backup_writes_a_consistent_copy_and_refuses_bad_targets(daemon: Any) -> None:
    with Client(daemon.ingest_socket) as client:
        client.send_batch([{"type": "before.backup"} for _ in range(50)])
    sock, dest = daemon.status_socket, daemon.root / "copy.db"
    # The copy holds what is committed; acknowledged means journaled, not yet committed.
    wait_reply(sock, "/stats", lambda body: body["last_committed_seq"] >= 50, "50 commits")
    status, body = call(sock, "POST", "/backup", {"dest": str(dest)})
    assert status == 200, body
    assert body["dest"] == str(dest) and body["bytes"] == dest.stat().st_size
    copy = sqlite3.connect(dest)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert copy.execute("SELECT count(*) FROM events").fetchone()[0] >= 50
    finally:
        copy.close()
    assert call(sock, "POST", "/backup", {"dest": str(dest)})[0] == 409  # never overwrites
    status, body = call(sock, "POST", "/backup", {"dest": "relative.db"})
    assert status == 400 and "absolute" in body["message"]
    status, body = call(sock, "POST", "/backup", {"where": "/tmp/x"})
    assert status == 400 and body["error"] == "bad_request"


# -- health, as a pure function ------------------------------------------------------


def _inputs(**changes: Any) -> HealthInputs:
    base: dict[str, Any] = dict(pending=0, oldest_pending_age_s=0.0, since_commit_s=0.1,
                                disk_free_bytes=10 << 30, reserve_bytes=64 << 20,
                                dlq_bytes=0, dlq_max_bytes=64 << 20, replay_finished=True)
    return HealthInputs(**{**base, **changes})


def test_health_degrades_and_fails_with_a_sentence_per_check() -> None:
    assert evaluate(_inputs()).status == "ok"
    # An event that arrived after a long idle spell is not a stall.
    assert evaluate(_inputs(pending=3, oldest_pending_age_s=0.01, since_commit_s=600)).status \
        == "ok"
    stalled = evaluate(_inputs(pending=3, oldest_pending_age_s=60, since_commit_s=60,
                               writer_fault="commits are failing: database is locked"))
    assert stalled.status == "failing" and stalled.http_status == 503
    document = stalled.document()
    assert document["problems"]["writer_progress"] == (
        "no commit for 60 s while 3 events wait: commits are failing: database is locked")
    assert document["checks"]["pending_age"]["severity"] == "degraded"
    assert set(document["problems"]) == {"writer_progress", "pending_age",
                                         "database_writable"}
    refusing = evaluate(_inputs(ingest_refusal="the buffer is full"))
    assert refusing.status == "degraded"
    assert refusing.document()["problems"] == {"ingest_accepting": "the buffer is full"}
    assert evaluate(_inputs(disk_free_bytes=1 << 20)).status == "failing"
    assert evaluate(_inputs(dlq_bytes=64 << 20)).status == "degraded"
    replaying = evaluate(_inputs(replay_finished=False, replay_done=10, replay_total=40))
    assert replaying.document()["problems"] == {
        "replay_finished": "replaying the journal: 10 of 40 events so far"}
    assert evaluate(_inputs(stopping=True)).status == "failing"


def test_health_degrades_while_the_database_is_locked_and_recovers(daemon: Any) -> None:
    sock = daemon.status_socket
    wait_reply(sock, "/health", lambda body: body, "health ok")
    holder = sqlite3.connect(daemon.db_path, isolation_level=None, timeout=30)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the writer's commits now fail with SQLITE_BUSY
        with Client(daemon.ingest_socket) as client:
            client.send({"type": "while.locked"})

        body = wait_reply(sock, "/health", lambda body: body, "health 503", statuses=(503,))
        assert body["status"] == "degraded"
        assert body["checks"]["database_writable"]["severity"] == "degraded"
        assert "locked" in body["problems"]["database_writable"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_reply(sock, "/health", lambda body: body, "health ok")


def test_health_reports_a_full_disk_as_failing(make_daemon: Any) -> None:
    # A reserve larger than the volume is a full disk as far as the daemon can tell.
    daemon = make_daemon({"storage": {"reserve_bytes": shutil.disk_usage("/tmp").total}})

    def unhealthy(body: dict[str, Any]) -> dict[str, Any] | None:
        return body if "ingest_accepting" in body.get("problems", {}) else None

    body = wait_reply(daemon.status_socket, "/health", unhealthy,
                      "health naming ingest_accepting", statuses=(503,))
    assert body["status"] == "failing"
    assert body["checks"]["disk_space"]["ok"] is False
    assert "below the" in body["problems"]["disk_space"]
    assert "disk space low" in body["problems"]["ingest_accepting"]
