"""Projections end to end: counts and actor summaries equal the stored events (hot and
sealed), after a rebuild through the CLI while events arrive, and bad parameters are
refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

from conftest import (
    DaemonProcess,
    RawConnection,
    UnixHTTPConnection,
    wait_committed,
    wait_for,
    wait_sealed_through,
)
from projection_truth import (
    actor_truth,
    assert_counts_match,
    http,
    served,
    stored_rows,
    truth,
    wait_projections_live,
)

from auditd.projections.params import rfc3339

SMALL = {"storage": {"partition_events": 500}}
HOUR = 3_600_000_000_000
BASE_TS = 1_764_000_000 * 10**9  # 2025-11-24T16:00:00Z, an hour's start


def events(first: int, count: int) -> list[dict[str, Any]]:
    """Five types, seven actors and some without one, spread over 30 hours of `ts`."""
    out = []
    for i in range(first, first + count):
        event: dict[str, Any] = {"type": f"t{i % 5}", "id": f"ev-{i}",
                                 "ts": BASE_TS + (i % 30) * HOUR + i}
        if i % 9:
            event["actor"] = f"a{i % 7}"
        out.append(event)
    return out


def send(conn: RawConnection, first: int, count: int, batch: int = 200) -> None:
    for start in range(first, first + count, batch):
        reply = conn.request(events(start, min(batch, first + count - start)))
        assert reply["ok"] == min(batch, first + count - start), reply


def cli(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auditd.cli", *args, "--config",
                           str(daemon.config_path)], capture_output=True, text=True,
                          timeout=120)


def test_counts_and_actor_summaries_equal_the_events_hot_and_sealed(make_daemon: Any) -> None:
    daemon = make_daemon(SMALL)
    with daemon.connect() as conn:
        send(conn, 0, 3000)
    wait_committed(daemon, 3000)
    wait_sealed_through(daemon, 2000)
    wait_projections_live(daemon)
    rows = assert_counts_match(daemon)
    assert len(rows) == 3000 and len({bucket for bucket, _ in served(daemon, "type")}) == 30
    # A filter on the counted field narrows its values (OR); since/until pick hours.
    narrowed = served(daemon, "type", type="t1") + served(daemon, "type", type="t3")
    both = http(daemon, "GET", "/counts?by=type&type=t1&type=t3")[1]["buckets"]
    assert {(s, v): n for s, v, n in both} == narrowed
    assert narrowed == only_values(truth(rows, "type"), lambda v: v in ("t1", "t3"))
    since, until = rfc3339(BASE_TS + 3 * HOUR), rfc3339(BASE_TS + 5 * HOUR)
    window = served(daemon, "actor", since=since, until=until)
    assert {start for start, _ in window} == {rfc3339(BASE_TS + 3 * HOUR)[:19] + "Z",
                                             rfc3339(BASE_TS + 4 * HOUR)[:19] + "Z"}
    assert served(daemon, "type", type="never-sent") == {}
    # None of the actorless events are lost: they count under null.
    assert sum(n for (_, actor), n in served(daemon, "actor").items() if actor is None) \
        == sum(1 for r in rows if r[3] is None)
    for actor in ("a0", "a3"):
        status, summary = http(daemon, "GET", f"/actors/{actor}")
        expected = actor_truth(rows, actor)
        assert status == 200, summary
        assert (summary["total"], summary["last_seq"]) == (expected["total"],
                                                         expected["last_seq"])
        assert summary["first_seen"] == rfc3339(expected["first_ts"])
        assert summary["last_seen"] == rfc3339(expected["last_ts"])
        assert summary["last_event"]["seq"] == expected["last_seq"]
        assert summary["last_event"]["actor"] == actor
    assert http(daemon, "GET", "/actors/nobody-at-all")[0] == 404
    stats = daemon.stats()["projections"]
    assert stats["counts_by_type"] == {"version": 1, "state": "live", "position": 3000,
                                       "lag": 0}


def only_values(counts: Any, keep: Any) -> Any:
    return type(counts)({key: n for key, n in counts.items() if keep(key[1])})


def test_rebuild_through_the_cli_while_events_arrive(make_daemon: Any) -> None:
    daemon = make_daemon(SMALL)
    with daemon.connect() as conn:
        send(conn, 0, 4000)
    wait_committed(daemon, 4000)
    wait_sealed_through(daemon, 3000)
    # Drop what the projection holds by hand: the rebuild must recount all of it.
    rebuilds = []
    failures: list[BaseException] = []

    def more() -> None:
        try:
            with daemon.connect() as conn:
                send(conn, 4000, 3000, batch=50)
        except BaseException as exc:  # reported by the test's thread
            failures.append(exc)

    sender = threading.Thread(target=more)
    sender.start()
    try:
        for name in ("counts_by_type", "actor_summary", "counts_by_uid"):
            done = cli(daemon, "projections", "rebuild", name, "--json")
            assert done.returncode == 0, done.stderr
            rebuilds.append(json.loads(done.stdout))
    finally:
        sender.join(60)
    assert not failures, failures
    wait_committed(daemon, 7000)
    wait_projections_live(daemon)
    rows = assert_counts_match(daemon)
    assert len(rows) == 7000 + 3  # and the three auditd.admin.projections.rebuild events
    assert all(r["state"] == "live" and r["rebuild"]["done"] >= 4000 for r in rebuilds)
    summary = http(daemon, "GET", "/actors/a5")[1]
    assert summary["total"] == actor_truth(rows, "a5")["total"]
    rebuilt = [e for e in daemon.log_events() if e["event"] == "projection_rebuilt"]
    assert [e["name"] for e in rebuilt] == ["counts_by_type", "actor_summary", "counts_by_uid"]
    shown = cli(daemon, "projections", "status")
    assert shown.returncode == 0 and "counts_by_type" in shown.stdout and "live" in shown.stdout


def test_a_rebuild_interrupted_by_a_restart_resumes_and_counts_once(make_daemon: Any) -> None:
    daemon = make_daemon(SMALL)
    with daemon.connect() as conn:
        send(conn, 0, 3000)
    wait_committed(daemon, 3000)
    status, _ = http(daemon, "POST", "/projections/rebuild", {"name": "counts_by_actor"})
    assert status == 200
    daemon.kill()  # wherever the rebuild was: its position is in the database
    daemon.start()
    with daemon.connect() as conn:
        send(conn, 3000, 500)
    wait_committed(daemon, 3500)
    wait_projections_live(daemon)
    assert len(assert_counts_match(daemon)) == 3500 + 1  # and the admin event


def test_count_by_on_the_command_line(make_daemon: Any) -> None:
    daemon = make_daemon()
    with daemon.connect() as conn:
        send(conn, 0, 300)
    wait_committed(daemon, 300)
    with daemon.connect() as conn:
        assert conn.request({"type": "deploy", "actor": "svc/deploy bot"})["ok"] == 1
    wait_committed(daemon, 301)
    status, summary = http(daemon, "GET", "/actors/svc/deploy%20bot")
    assert status == 200 and summary["actor"] == "svc/deploy bot", summary
    assert summary["total"] == 1 and summary["last_seq"] == 301
    done = cli(daemon, "query", "--count-by", "type", "--type", "t2", "--interval", "1d")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)  # not a TTY: the /counts document
    assert document["by"] == "type" and document["interval"] == "1d"
    assert {value for _, value, _ in document["buckets"]} == {"t2"}
    assert sum(n for _, _, n in document["buckets"]) == 60
    refused = cli(daemon, "query", "--count-by", "type", "--actor", "a1")
    assert refused.returncode == 1 and "actor" in refused.stderr
    usage = cli(daemon, "query", "--count-by", "target")
    assert usage.returncode == 2


BAD = [
    ("", "by"),
    ("by=", "by"),
    ("by=target", "by"),
    ("by=stream", "by"),
    ("by=type&interval=1m", "interval"),
    ("by=type&interval=5h", "interval"),
    ("by=type&since=yesterday", "since"),
    ("by=type&until=2026-13-01", "until"),
    ("by=type&since=2h&until=3h", "until"),
    ("by=type&uid=alice", "uid"),
    ("by=type&uid=-1", "uid"),
    ("by=type&actor=a1", "actor"),
    ("by=type&type=", "type"),
    ("by=type&limit=5", "limit"),
    ("by=type&by=actor", "by"),
]


def test_bad_count_parameters_answer_400_naming_them(daemon: DaemonProcess) -> None:
    for query, parameter in BAD:
        status, document = http(daemon, "GET", f"/counts?{query}")
        assert status == 400, (query, document)
        assert document["message"].startswith(parameter), (query, document)
    status, document = http(daemon, "GET", "/actors/")
    assert status in (404, 405), document


def test_rebuild_refuses_an_unknown_projection_and_non_admins(daemon: DaemonProcess) -> None:
    status, document = http(daemon, "POST", "/projections/rebuild", {"name": "nope"})
    assert status == 409 and "counts_by_type" in document["message"], document
    status, document = http(daemon, "POST", "/projections/rebuild", {"nam": "x"})
    assert status == 400, document


def test_the_stats_section_shows_position_and_lag(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        send(conn, 0, 100)
    wait_committed(daemon, 100)
    wait_for(lambda: daemon.stats()["projections"]["counts_by_uid"]["position"] == 100)
    assert {p["lag"] for p in daemon.stats()["projections"].values()} == {0}
    assert stored_rows(daemon.db_path)[-1][0] == 100
    conn = UnixHTTPConnection(daemon.status_socket)
    try:
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
    finally:
        conn.close()
    assert 'auditd_projection_position_seq{projection="counts_by_type"} 100.0' in metrics
    assert 'auditd_projection_lag_events{projection="actor_summary"} 0.0' in metrics
    assert 'auditd_projection_rebuilding{projection="counts_by_uid"} 0.0' in metrics
    shown = cli(daemon, "status")
    assert "projections:  5 of 5 live, lag 0 events" in shown.stdout, shown.stdout
