"""GET /tail and `auditd tail` against the real daemon: follow, resume, cut, access.

Each test reads the stream as a client would (follow_helpers.TailReader on the
status socket), and checks seqs against the replies of the sends: exact, in order,
with nothing repeated.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from as_other_uid import can_run_as_other_uid, run_as
from conftest import DaemonProcess, wait_committed, wait_for, wait_sealed_through
from follow_helpers import TailReader, rss_kb, send

from auditd.client import Client
from auditd.query.feed import CommitFeed

OTHER_UID = 65533
OPEN = {"status": {"socket_mode": "0666"}, "ingest": {"socket_mode": "0666"}}
as_root_only = pytest.mark.skipif(not can_run_as_other_uid(),
                                  reason="calling as another uid needs root")


def seqs_of(lines: list[dict[str, Any]]) -> list[int]:
    return [line["seq"] for line in lines if "seq" in line]


def test_follow_sees_new_events_as_they_commit(daemon: DaemonProcess) -> None:
    with TailReader(daemon.status_socket, "follow=1&n=0&type=test.follow") as tail:
        assert tail.status == 200
        assert tail.response.getheader("Content-Type") == "application/x-ndjson"
        wait_for(lambda: daemon.stats()["follow"]["live"] == 1, what="a live follower")
        seqs = send(daemon.ingest_socket, 50)
        lines = tail.events(50)
        delivery = daemon.stats()["follow"]["delivery_ms"]
    assert seqs_of(lines) == seqs
    assert delivery["count"] >= 1 and {"p50", "p99"} <= delivery.keys()
    assert [line["data"] for line in lines] == [{"i": i} for i in range(50)]
    first = lines[0]
    assert first["type"] == "test.follow" and first["ts"].endswith("Z") and first["comm"]
    assert {"id", "received_at", "pid", "uid", "gid", "stream_seq"} <= first.keys()


def test_n_and_after_without_follow_answer_and_close(daemon: DaemonProcess) -> None:
    seqs = send(daemon.ingest_socket, 30)
    wait_committed(daemon, seqs[-1])
    with TailReader(daemon.status_socket, "n=5&type=test.follow") as tail:
        assert seqs_of(tail.rest()) == seqs[-5:]
    with TailReader(daemon.status_socket, f"after={seqs[9]}&type=test.follow") as tail:
        assert seqs_of(tail.rest()) == seqs[10:]
    with TailReader(daemon.status_socket, "type=test.follow") as tail:  # n=10 by default
        assert seqs_of(tail.rest()) == seqs[-10:]
    with TailReader(daemon.status_socket, "n=0") as tail:
        assert tail.rest() == []


def test_catch_up_then_live_while_a_writer_commits(daemon: DaemonProcess) -> None:
    """Subscribe, read the store, switch to the feed: no gap and no repeat while
    batches commit throughout the switch."""
    first = send(daemon.ingest_socket, 3000)
    sent: list[int] = []
    sender = threading.Thread(target=lambda: sent.extend(send(daemon.ingest_socket, 6000)))
    sender.start()
    try:
        with TailReader(daemon.status_socket, "follow=1&after=0&type=test.follow") as tail:
            sender.join()
            lines = tail.events(9000)
    finally:
        sender.join()
    assert seqs_of(lines) == sorted(first + sent)


def test_catch_up_reads_sealed_partitions_then_the_hot_tail(make_daemon: Any) -> None:
    daemon: DaemonProcess = make_daemon({"storage": {"partition_events": 100}})
    sealed = send(daemon.ingest_socket, 450)
    wait_sealed_through(daemon, 400)
    hot = send(daemon.ingest_socket, 30)
    wait_committed(daemon, hot[-1])
    with TailReader(daemon.status_socket, "follow=1&after=0&type=test.follow") as tail:
        assert seqs_of(tail.events(480)) == sealed + hot
        live = send(daemon.ingest_socket, 5)
        assert seqs_of(tail.events(5)) == live
    with TailReader(daemon.status_socket, "n=3&type=test.follow") as tail:
        assert seqs_of(tail.rest()) == live[-3:]


def test_dead_lettered_events_are_never_followed(daemon: DaemonProcess) -> None:
    """A trigger makes one type's inserts fail: the writer dead-letters those events
    while isolating them, and followers never see them (nor a gap in what they see)."""
    wait_committed(daemon, send(daemon.ingest_socket, 5)[-1])  # names cached
    conn = sqlite3.connect(daemon.db_path, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO names (value) VALUES ('poison') ON CONFLICT DO NOTHING")
        conn.execute("CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.type = "
                     "(SELECT id FROM names WHERE value = 'poison') "
                     "BEGIN SELECT RAISE(ABORT, 'poisoned'); END")
        conn.execute("COMMIT")
    finally:
        conn.close()
    events = [{"type": "poison" if i % 7 == 3 else "test.follow", "data": {"i": i}}
              for i in range(60)]
    with TailReader(daemon.status_socket, "follow=1&n=0") as tail, \
            Client(daemon.ingest_socket) as client:
        wait_for(lambda: daemon.stats()["follow"]["live"] == 1, what="a live follower")
        reply = client.send_batch(events)
        assert reply.first is not None
        seqs = list(range(reply.first, reply.first + len(events)))
        good = [seq for seq, e in zip(seqs, events, strict=True) if e["type"] != "poison"]
        lines = tail.events(len(good))
        wait_committed(daemon, seqs[-1])
        marker = send(daemon.ingest_socket, 1, "test.marker")
        lines += tail.events(1)
    assert seqs_of(lines) == good + marker
    stored = {row[0] for row in daemon.query("SELECT seq FROM dead_letters")}
    assert stored == set(seqs) - set(good)


def test_filters_or_repeated_and_across_names(daemon: DaemonProcess) -> None:
    send(daemon.ingest_socket, 5, "a.one", actor="alice", tags={"env": "prod"})
    want = send(daemon.ingest_socket, 5, "a.two", actor="alice", tags={"env": "dev"})
    wait_committed(daemon, send(daemon.ingest_socket, 5, "a.two", actor="bob",
                                tags={"env": "dev"})[-1])
    query = "type=a.two&type=a.three&actor=alice&tag.env=dev"
    with TailReader(daemon.status_socket, f"n=100&{query}") as tail:
        assert seqs_of(tail.rest()) == want
    with TailReader(daemon.status_socket, f"follow=1&n=2&{query}") as tail:
        assert seqs_of(tail.events(2)) == want[-2:]
        send(daemon.ingest_socket, 3, "a.two", actor="bob", tags={"env": "dev"})
        live = send(daemon.ingest_socket, 3, "a.three", actor="alice", tags={"env": "dev"})
        assert seqs_of(tail.events(3)) == live


BAD = [("follow=2", "follow"), ("follow=1&follow=0", "follow"), ("n=-1", "n"),
       ("n=x", "n"), ("n=10001", "n"), ("after=x", "after"), ("n=1&after=1", "n"),
       ("heartbeat_s=0", "heartbeat_s"), ("limit=5", "limit"), ("order=desc", "order"),
       ("before=9", "before"), ("nope=1", "nope"), ("uid=abc", "uid"),
       ("since=yesterday", "since"), ("tag=novalue", "tag"), ("type=", "type")]


def test_bad_parameters_answer_400_naming_them(daemon: DaemonProcess) -> None:
    for query, parameter in BAD:
        with TailReader(daemon.status_socket, query) as tail:
            assert tail.status == 400, query
            body = json.loads(tail.response.read())
        assert body["error"] == "bad_request", body
        assert body["message"].startswith(parameter), (query, body)


def test_heartbeat_while_nothing_matches(daemon: DaemonProcess) -> None:
    # heartbeat_s is a hidden parameter (default 10 s, as interfaces.md says).
    with TailReader(daemon.status_socket, "follow=1&n=0&type=none&heartbeat_s=0.1") as tail:
        send(daemon.ingest_socket, 3)  # committed, none of them matching
        beats = [tail.next(), tail.next()]
    for beat in beats:
        assert beat is not None and set(beat) == {"heartbeat"}
        assert abs(beat["heartbeat"] - time.time()) < 60


def test_daemon_stop_ends_the_stream_with_a_final_line_and_resume_misses_nothing(
        make_daemon: Any) -> None:
    daemon: DaemonProcess = make_daemon()
    before = send(daemon.ingest_socket, 200)
    wait_committed(daemon, before[-1])
    with TailReader(daemon.status_socket, "follow=1&n=0&type=test.follow") as tail:
        wait_for(lambda: daemon.stats()["follow"]["live"] == 1, what="a live follower")
        during = send(daemon.ingest_socket, 100)
        assert seqs_of(tail.events(100)) == during
        daemon.stop()
        final = tail.rest()
    assert final[-1]["error"] == "daemon_stopping" and "after=" in final[-1]["message"]
    saved = final[-1]["last_seq"]
    assert saved >= during[-1]
    daemon.start()
    after_restart = send(daemon.ingest_socket, 100)
    with TailReader(daemon.status_socket, f"follow=1&after={saved}&type=test.follow") as tail:
        assert seqs_of(tail.events(100)) == after_restart
    wait_committed(daemon, after_restart[-1])
    with TailReader(daemon.status_socket, "after=0&type=test.follow") as tail:
        assert seqs_of(tail.rest()) == before + during + after_restart


def test_cli_tail_follows_across_a_restart(make_daemon: Any) -> None:
    """`auditd tail -f` reconnects by itself after the seq it printed last."""
    daemon: DaemonProcess = make_daemon()
    first = send(daemon.ingest_socket, 50)
    wait_committed(daemon, first[-1])
    cli = subprocess.Popen(
        [sys.executable, "-m", "auditd.cli", "tail", "-f", "-n", "0", "--jsonl",
         "--type", "test.follow", "--config", str(daemon.config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: daemon.stats()["follow"]["live"] == 1, what="the CLI following")
        second = send(daemon.ingest_socket, 50)
        printed = [json.loads(cli.stdout.readline())["seq"] for _ in range(50)]  # type: ignore[union-attr]
        daemon.restart()
        third = send(daemon.ingest_socket, 50)
        printed += [json.loads(cli.stdout.readline())["seq"] for _ in range(50)]  # type: ignore[union-attr]
    finally:
        cli.terminate()
        _, err = cli.communicate(timeout=30)
    assert printed == second + third and not set(printed) & set(first)
    assert "reconnecting after seq" in err


def test_slow_reader_is_cut_with_a_final_line_and_memory_stays_bounded(
        daemon: DaemonProcess) -> None:
    assert daemon.proc is not None
    bound = CommitFeed().max_lag_events
    tail = TailReader(daemon.status_socket, "follow=1&n=0&type=test.follow", rcvbuf=4096)
    try:
        wait_for(lambda: daemon.stats()["follow"]["live"] == 1, what="a live follower")
        sent = send(daemon.ingest_socket, bound + 10_000)  # never read meanwhile
        wait_for(lambda: daemon.stats()["follow"]["cut"]["slow_reader"] == 1, what="the cut")
        cut_rss = rss_kb(daemon.proc.pid)
        follow = daemon.stats()["follow"]
        assert follow["live"] == 0 and follow["held_events"] == 0, follow
        sent += send(daemon.ingest_socket, 2 * bound)  # nobody holds the feed now
        lines = tail.rest()
    finally:
        tail.close()
    final = lines[-1]
    assert final["error"] == "slow_reader" and "after=" in final["message"], final
    got = seqs_of(lines)
    assert got == sent[:len(got)] and final["last_seq"] == got[-1]
    assert len(got) < len(sent)
    # After the cut the feed holds nothing: more events cost no follower memory.
    assert rss_kb(daemon.proc.pid) - cut_rss < 100_000
    wait_committed(daemon, sent[-1])
    with TailReader(daemon.status_socket, f"after={final['last_seq']}&type=test.follow") as rest:
        assert got + seqs_of(rest.rest()) == sent


def test_stats_count_followers(daemon: DaemonProcess) -> None:
    with TailReader(daemon.status_socket, "follow=1&n=0"), \
            TailReader(daemon.status_socket, "follow=1&n=0&type=x"):
        figures = wait_for(lambda: (f := daemon.stats()["follow"])["followers"] == 2 and f)
        assert figures["live"] == 2 and figures["served"] >= 2
    wait_for(lambda: daemon.stats()["follow"]["followers"] == 0, what="followers gone")


_FOLLOW_AS_USER = r"""
import http.client, json, socket, sys
path, count = sys.argv[1], int(sys.argv[2])
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
conn = Conn("auditd", timeout=60)
conn.request("GET", sys.argv[3])
response = conn.getresponse()
seen = []
while len(seen) < count and (raw := response.readline()):
    line = json.loads(raw)
    seen.append([line["seq"], line["uid"]] if "seq" in line else line)
print(json.dumps(seen))
"""

_SEND_AS_USER = r"""
import json, sys
from auditd.client import Client
with Client(sys.argv[1]) as client:
    replies = client.send_many([{"type": "test.follow", "data": {"i": i}}
                                for i in range(int(sys.argv[2]))])
print(json.dumps([[r.first, r.last] for r in replies]))
"""


def _send_as(uid: int, daemon: DaemonProcess, count: int) -> list[int]:
    replies = json.loads(run_as(uid, _SEND_AS_USER, daemon.ingest_socket, str(count),
                                imports=["auditd.client"]))
    return [seq for first, last in replies for seq in range(first, last + 1)]


@as_root_only
def test_a_non_reader_follows_only_its_own_events(make_daemon: Any) -> None:
    daemon: DaemonProcess = make_daemon(OPEN)
    for folder in (daemon.root.parent, daemon.root):
        folder.chmod(0o755)
    own = _send_as(OTHER_UID, daemon, 5)
    wait_committed(daemon, send(daemon.ingest_socket, 5)[-1])  # root's: never shown
    listed = json.loads(run_as(OTHER_UID, _FOLLOW_AS_USER, daemon.status_socket, "5",
                               "/tail?n=100&type=test.follow"))
    assert listed == [[seq, OTHER_UID] for seq in own]
    asked_for_root = json.loads(run_as(OTHER_UID, _FOLLOW_AS_USER, daemon.status_socket,
                                       "0", "/tail?n=100&uid=0"))
    assert asked_for_root == []
    follower: list[list[int]] = []
    child = threading.Thread(target=lambda: follower.extend(json.loads(run_as(
        OTHER_UID, _FOLLOW_AS_USER, daemon.status_socket, "5",
        "/tail?follow=1&n=0&type=test.follow"))))
    child.start()
    try:
        wait_for(lambda: daemon.stats()["follow"]["live"] == 1, what="the other uid following")
        send(daemon.ingest_socket, 20)
        live = _send_as(OTHER_UID, daemon, 5)
    finally:
        child.join(60)
    assert follower == [[seq, OTHER_UID] for seq in live]
