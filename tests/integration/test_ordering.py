"""Order, gap-free sequencing, optimistic concurrency and idempotency under concurrency.

All against a daemon subprocess over real sockets; results are read back from the
SQLite file the daemon wrote.
"""

from __future__ import annotations

import itertools
import re
import signal
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import msgspec
from conftest import DaemonProcess, wait_committed, wait_for

from auditd.ingest.framing import encode_frame

encode = msgspec.msgpack.encode








def run_threads(targets: list[Callable[[], None]], timeout: float = 120.0) -> None:
    """Run callables concurrently; re-raise the first failure in the test thread."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a client thread hung"
    if errors:
        raise errors[0]


# -- 100,000 events from 8 connections ---------------------------------------------------

CONNECTIONS = 8
FRAMES = 125
BATCH = 100
STREAMS = 5


def load_event(conn: int, n: int) -> dict[str, Any]:
    return {"type": "load", "id": f"c{conn}-{n:05d}", "stream": f"s{(conn + n) % STREAMS}",
            "data": [conn, n]}


def test_100k_events_from_8_connections_stored_once_in_order(daemon: DaemonProcess) -> None:
    replies: dict[int, list[dict[str, Any]]] = {}

    def client(number: int) -> None:
        frames = [encode_frame(encode([load_event(number, f * BATCH + j) for j in range(BATCH)]))
                  for f in range(FRAMES)]
        with daemon.connect() as conn:
            conn.sock.settimeout(60)
            sender = threading.Thread(target=lambda: [conn.send_raw(f) for f in frames],
                                      daemon=True)
            sender.start()  # pipelined: every frame is sent before replies are read
            replies[number] = [conn.recv() for _ in range(FRAMES)]
            sender.join(60)

    run_threads([lambda n=n: client(n) for n in range(CONNECTIONS)])
    total = CONNECTIONS * FRAMES * BATCH
    assert total == 100_000

    # Replies: every frame fully accepted, ranges disjoint, covering 1..N, in send order.
    ranges = []
    for number, answers in replies.items():
        assert all(set(r) == {"ok", "first", "last"} for r in answers), answers[:3]
        assert all(r["ok"] == BATCH and r["last"] - r["first"] == BATCH - 1 for r in answers)
        firsts = [r["first"] for r in answers]
        assert firsts == sorted(firsts), f"connection {number}: replies out of order"
        ranges += [(r["first"], r["last"], number, k) for k, r in enumerate(answers)]
    ranges.sort()
    assert ranges[0][0] == 1 and ranges[-1][1] == total
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ranges))

    wait_committed(daemon, total)
    rows = daemon.query(
        "SELECT e.seq, e.id, s.value, e.stream_seq, e.data FROM events e"
        " JOIN names s ON s.id = e.stream ORDER BY e.seq")
    assert [r[0] for r in rows] == list(range(1, total + 1))  # gap-free, each once
    assert len({r[1] for r in rows}) == total
    by_seq = {seq: (event_id, stream, data) for seq, event_id, stream, _, data in rows}
    # Each reply's seqs hold exactly the events of that frame, in the order sent.
    for first, _last, number, k in ranges:
        for j in range(BATCH):
            n = k * BATCH + j
            event_id, stream, data = by_seq[first + j]
            assert event_id == f"c{number}-{n:05d}"
            assert stream == f"s{(number + n) % STREAMS}"
            assert msgspec.msgpack.decode(data) == [number, n]
    # Per connection, seq grows with the sender's counter.
    per_connection: dict[int, list[int]] = defaultdict(list)
    for _seq, event_id, *_ in rows:
        conn_part, n = event_id[1:].split("-")
        per_connection[int(conn_part)].append(int(n))
    assert all(ns == list(range(FRAMES * BATCH)) for ns in per_connection.values())
    # stream_seq: 1, 2, 3... per stream, following seq.
    per_stream: dict[str, list[int]] = defaultdict(list)
    for _seq, _id, stream, stream_seq, _data in rows:
        per_stream[stream].append(stream_seq)
    assert set(per_stream) == {f"s{i}" for i in range(STREAMS)}
    for stream, numbers in per_stream.items():
        assert numbers == list(range(1, len(numbers) + 1)), stream
    versions = dict(daemon.query(
        "SELECT n.value, s.version FROM streams s JOIN names n ON n.id = s.stream"))
    assert versions == {stream: len(numbers) for stream, numbers in per_stream.items()}


# -- expect under concurrent appenders ----------------------------------------------------

APPENDERS = 8
VERSIONS = 40  # each appender tries expect = 0 .. VERSIONS-1 in turn
CONFLICT = re.compile(r"^stream 'ledger' is at version (\d+), not (\d+)$")


def test_expect_exactly_one_winner_per_version(daemon: DaemonProcess) -> None:
    outcomes: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    barrier = threading.Barrier(APPENDERS)

    def appender(number: int) -> None:
        results = []
        with daemon.connect() as conn:
            barrier.wait(30)
            for version in range(VERSIONS):
                reply = conn.request({"type": "append", "stream": "ledger", "expect": version,
                                      "id": f"a{number}-v{version}"})
                results.append((version, reply))
        outcomes[number] = results

    run_threads([lambda n=n: appender(n) for n in range(APPENDERS)])

    winners: dict[int, list[int]] = defaultdict(list)
    conflicts = 0
    for number, results in outcomes.items():
        for version, reply in results:
            if reply["ok"] == 1:
                assert set(reply) == {"ok", "first", "last"}
                winners[version].append(number)
            else:
                assert reply["ok"] == 0 and set(reply) == {"ok", "rejected"}, reply
                ((index, code, message),) = reply["rejected"]
                assert (index, code) == (0, "conflict")
                match = CONFLICT.match(message)
                assert match is not None, message
                current, expected = int(match.group(1)), int(match.group(2))
                assert expected == version
                assert current > version  # the stream had moved on, never fallen behind
                conflicts += 1
    assert sorted(winners) == list(range(VERSIONS))
    assert all(len(w) == 1 for w in winners.values()), winners
    assert conflicts == APPENDERS * VERSIONS - VERSIONS

    wait_committed(daemon, VERSIONS)
    rows = daemon.query("SELECT e.id, e.stream_seq FROM events e ORDER BY e.seq")
    assert rows == [(f"a{winners[v][0]}-v{v}", v + 1) for v in range(VERSIONS)]
    assert daemon.query("SELECT version, last_seq FROM streams") == [(VERSIONS, VERSIONS)]
    wait_for(lambda: daemon.query("SELECT count(*) FROM dead_letters WHERE code = 'conflict'")
             == [(conflicts,)], what="conflict dead letters")

    # The stream's version holds across a restart.
    daemon.restart()
    with daemon.connect() as conn:
        assert conn.request({"type": "append", "stream": "ledger", "expect": VERSIONS - 1}) == {
            "ok": 0, "rejected": [[0, "conflict", f"stream 'ledger' is at version {VERSIONS},"
                                                  f" not {VERSIONS - 1}"]]}
        assert conn.request({"type": "append", "stream": "ledger", "expect": VERSIONS}) == {
            "ok": 1, "first": VERSIONS + 1, "last": VERSIONS + 1}


def test_expect_chain_inside_one_batch(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        reply = conn.request([{"type": "t", "stream": "b", "expect": v} for v in (0, 1, 2, 2, 3)])
    assert reply == {"ok": 4, "first": 1, "last": 4,
                     "rejected": [[3, "conflict", "stream 'b' is at version 3, not 2"]]}


# -- idempotency ----------------------------------------------------------------------


def id_count(daemon: DaemonProcess, event_id: str) -> int:
    return int(daemon.query("SELECT count(*) FROM events WHERE id = ?", event_id)[0][0])


def test_duplicate_inside_one_batch(daemon: DaemonProcess) -> None:
    batch = [{"type": "t", "id": "a"}, {"type": "t", "id": "a"}, {"type": "t", "id": "b"},
             {"type": "t", "id": "a", "actor": "someone-else"}]
    with daemon.connect() as conn:
        assert conn.request(batch) == {"ok": 2, "first": 1, "last": 2,
                                       "duplicates": [[1, 1], [3, 1]]}
        # And in a later frame on another connection.
        with daemon.connect() as other:
            assert other.request({"type": "t", "id": "b"}) == {"ok": 0, "duplicates": [[0, 2]]}
        # A duplicate takes no seq.
        assert conn.request({"type": "t", "id": "c"}) == {"ok": 1, "first": 3, "last": 3}
    wait_committed(daemon, 3)
    assert daemon.query("SELECT seq, id, actor FROM events ORDER BY seq") == [
        (1, "a", None), (2, "b", None), (3, "c", None)]
    assert daemon.query("SELECT count(*) FROM dead_letters") == [(0,)]


def test_duplicate_after_restart_answers_the_original_seq(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        assert conn.request({"type": "order", "id": "order-1"})["first"] == 1
        assert conn.request([{"type": "filler"}, {"type": "filler"}])["last"] == 3
    daemon.restart()
    with daemon.connect() as conn:
        reply = conn.request([{"type": "order", "id": "order-1"},
                              {"type": "order", "id": "order-2"}])
        assert reply == {"ok": 1, "first": 4, "last": 4, "duplicates": [[0, 1]]}
        assert conn.request({"type": "order", "id": "order-1"}) == {
            "ok": 0, "duplicates": [[0, 1]]}
    wait_committed(daemon, 4)
    assert id_count(daemon, "order-1") == 1
    assert id_count(daemon, "order-2") == 1


def test_duplicate_after_a_crash_and_journal_replay(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        reply = conn.request([{"type": "t", "id": f"k-{i}", "stream": "crash"}
                              for i in range(50)])
        assert reply == {"ok": 50, "first": 1, "last": 50}
    daemon.stop(signal.SIGKILL)  # acknowledged, maybe not yet committed: the journal has it
    daemon.start()
    with daemon.connect() as conn:
        reply = conn.request([{"type": "t", "id": "k-7"}, {"type": "t", "id": "k-49"},
                              {"type": "t", "id": "k-new"}])
        assert reply == {"ok": 1, "first": 51, "last": 51, "duplicates": [[0, 8], [1, 50]]}
        # The stream's version came back too.
        assert conn.request({"type": "t", "stream": "crash", "expect": 49}) == {
            "ok": 0, "rejected": [[0, "conflict", "stream 'crash' is at version 50, not 49"]]}
        assert conn.request({"type": "t", "stream": "crash", "expect": 50}) == {
            "ok": 1, "first": 52, "last": 52}
    wait_committed(daemon, 52)
    assert daemon.query("SELECT count(*), count(DISTINCT id), min(seq), max(seq) FROM events") == [
        (52, 52, 1, 52)]
    assert daemon.query("SELECT stream_seq FROM events WHERE seq = 52") == [(51,)]


def test_duplicate_beyond_the_in_memory_window_is_found_in_the_database(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon({"buffer": {"capacity": 64}})
    with daemon.connect() as conn:
        assert conn.request({"type": "t", "id": "old"}) == {"ok": 1, "first": 1, "last": 1}
        assert conn.request({"type": "t", "id": "old-2"}) == {"ok": 1, "first": 2, "last": 2}
        seq = 2
        for _ in range(8):  # 400 more events: over 2 x capacity, so "old" leaves the window
            reply = conn.request([{"type": "filler"} for _ in range(50)])
            assert reply["ok"] == 50
            seq = reply["last"]
            wait_committed(daemon, seq)
        assert seq == 402
        assert conn.request({"type": "t", "id": "old"}) == {"ok": 0, "duplicates": [[0, 1]]}
        assert conn.request([{"type": "t", "id": "fresh"}, {"type": "t", "id": "old-2"},
                             {"type": "t", "id": "old"}]) == {
            "ok": 1, "first": 403, "last": 403, "duplicates": [[1, 2], [2, 1]]}
        # Pipelined: a frame waiting on the database lookup keeps its place in line.
        conn.send_raw(encode_frame(encode({"type": "t", "id": "p-1"}))
                      + encode_frame(encode({"type": "t", "id": "old"}))
                      + encode_frame(encode({"type": "t", "id": "p-2"})))
        assert [conn.recv() for _ in range(3)] == [
            {"ok": 1, "first": 404, "last": 404}, {"ok": 0, "duplicates": [[0, 1]]},
            {"ok": 1, "first": 405, "last": 405}]
    wait_committed(daemon, 405)
    assert id_count(daemon, "old") == 1
    assert id_count(daemon, "old-2") == 1
    assert daemon.query("SELECT count(*) FROM events") == [(405,)]


def test_same_ids_from_many_connections_are_stored_once(daemon: DaemonProcess) -> None:
    ids = [f"shared-{i}" for i in range(200)]
    results: dict[int, list[dict[str, Any]]] = {}

    def sender(number: int) -> None:
        order = ids if number % 2 == 0 else list(reversed(ids))
        with daemon.connect() as conn:
            conn.send_raw(b"".join(encode_frame(encode({"type": "t", "id": i})) for i in order))
            results[number] = [conn.recv() for _ in order]
            results[number] = [dict(r, id=i) for r, i in zip(results[number], order, strict=True)]

    run_threads([lambda n=n: sender(n) for n in range(6)])
    owner: dict[str, int] = {}
    for replies in results.values():
        for reply in replies:
            if reply["ok"] == 1:
                assert reply["id"] not in owner, f"{reply['id']} stored twice"
                owner[reply["id"]] = reply["first"]
    assert sorted(owner) == sorted(ids)
    for replies in results.values():
        for reply in replies:
            if reply["ok"] == 0:
                assert reply["duplicates"] == [[0, owner[reply["id"]]]]
    wait_committed(daemon, len(ids))
    assert dict(daemon.query("SELECT id, seq FROM events")) == owner
    assert daemon.query("SELECT count(*) FROM events") == [(200,)]



def test_resent_expect_append_is_a_duplicate_not_a_conflict(daemon: DaemonProcess) -> None:
    append = {"type": "deposit", "id": "dep-1", "stream": "acct", "expect": 0}
    with daemon.connect() as conn:
        assert conn.request(append) == {"ok": 1, "first": 1, "last": 1}
        # The reply was "lost": the client sends the very same frame again.
        assert conn.request(append) == {"ok": 0, "duplicates": [[0, 1]]}
    daemon.restart()
    with daemon.connect() as conn:
        assert conn.request(append) == {"ok": 0, "duplicates": [[0, 1]]}
        assert conn.request({"type": "deposit", "id": "dep-2", "stream": "acct",
                             "expect": 1}) == {"ok": 1, "first": 2, "last": 2}
    wait_committed(daemon, 2)
    assert daemon.query("SELECT id, stream_seq FROM events ORDER BY seq") == [
        ("dep-1", 1), ("dep-2", 2)]
