"""The wire protocol of protocol.md, byte for byte, against a daemon subprocess.

Every error code is provoked through a real socket and its reply checked to the
message; every rejected event is then looked up in the daemon's dead-letter table.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import (
    FAST_RETRY,
    DaemonProcess,
    RawConnection,
    committed_seq,
    wait_buffer_empty,
    wait_committed,
    wait_for,
    wait_held,
    write_lock,
)

from auditd.ingest.framing import encode_frame

encode = msgspec.msgpack.encode

VECTOR = bytes.fromhex(
    "00 00 00 1d 82 a4 74 79 70 65 aa 75 73 65 72 2e 6c 6f 67 69 6e a5 61"
    " 63 74 6f 72 a5 61 6c 69 63 65")

EVENTS_SQL = """
SELECT e.seq, e.id, t.value, a.value, s.value, e.stream_seq, e.data, e.pid, e.uid, e.gid,
       c.value
FROM events e JOIN names t ON t.id = e.type LEFT JOIN names a ON a.id = e.actor
LEFT JOIN names s ON s.id = e.stream JOIN names c ON c.id = e.comm
ORDER BY e.seq"""









def dead_letters(daemon: DaemonProcess) -> list[tuple[Any, ...]]:
    return daemon.query(
        "SELECT seq, source, code, reason, raw, size, uid FROM dead_letters ORDER BY dlq_id")


def wait_dead_letters(daemon: DaemonProcess, count: int) -> list[tuple[Any, ...]]:
    wait_for(lambda: len(dead_letters(daemon)) >= count, what=f"{count} dead letters")
    return dead_letters(daemon)


def stored(daemon: DaemonProcess) -> list[tuple[Any, ...]]:
    return daemon.query(EVENTS_SQL)


def vm_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def daemon_pid(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    return daemon.proc.pid


def assert_closed(conn: RawConnection, timeout: float = 10.0) -> None:
    """The daemon closed the connection: EOF (or a reset), not merely silence."""
    conn.sock.settimeout(timeout)
    try:
        data = conn.sock.recv(1)
    except ConnectionResetError:
        return
    except TimeoutError:
        raise AssertionError("connection still open after a fatal error") from None
    assert data == b"", f"unexpected bytes after a fatal reply: {data!r}"




def own_comm() -> str:
    with open("/proc/self/comm") as handle:
        return handle.read().strip()


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[DaemonProcess]:
    """One daemon for tests that need no fresh state (each uses its own connections)."""
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="adp"))
    daemon = DaemonProcess(root)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- the test vector -----------------------------------------------------------------


def test_protocol_vector_byte_for_byte(daemon: DaemonProcess) -> None:
    assert encode_frame(encode({"type": "user.login", "actor": "alice"})) == VECTOR
    with daemon.connect() as conn:
        conn.send_raw(VECTOR)
        body = conn.recv_frame()
        assert msgspec.msgpack.decode(body) == {"ok": 1, "first": 1, "last": 1}
    wait_committed(daemon, 1)
    ((seq, event_id, type_, actor, stream, stream_seq, data, pid, uid, gid, comm),) = (
        stored(daemon))
    assert (seq, type_, actor, stream, stream_seq, data) == (
        1, "user.login", "alice", None, None, None)
    # Identity comes from the kernel, not the client.
    assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())
    assert comm == own_comm()
    assert len(event_id) == 36 and event_id[14] == "7"  # a UUIDv7 was assigned


def unread_bytes(sock: socket.socket) -> int:
    """Bytes this end has sent that the peer has not read yet (SIOCOUTQ)."""
    return int(struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0])


def test_vector_split_into_single_bytes_is_one_frame(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        for byte in VECTOR:
            conn.send_raw(bytes([byte]))
            # The daemon has read this byte on its own before the next one is sent.
            wait_for(lambda: unread_bytes(conn.sock) == 0, 30, "the daemon to read a byte",
                     interval=0.001)
        assert conn.recv() == {"ok": 1, "first": 1, "last": 1}


def test_pipelined_frames_are_answered_in_order(daemon: DaemonProcess) -> None:
    frames = [
        {"type": "a"},
        [{"type": "b"}, {"type": "c"}],
        {"type": "bad", "actor": 1},
        [],
        [{"type": "d"}] * 3,
    ]
    with daemon.connect() as conn:
        conn.send_raw(b"".join(encode_frame(encode(f)) for f in frames))
        replies = [conn.recv() for _ in frames]
    assert replies == [
        {"ok": 1, "first": 1, "last": 1},
        {"ok": 2, "first": 2, "last": 3},
        {"ok": 0, "rejected": [[0, "invalid", "actor: expected str, got int"]]},
        {"ok": 0},
        {"ok": 3, "first": 4, "last": 6},
    ]
    wait_committed(daemon, 6)
    assert [row[2] for row in stored(daemon)] == ["a", "b", "c", "d", "d", "d"]


def test_batch_of_one_and_bare_map_mean_the_same(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        assert conn.request([{"type": "x", "actor": 7}]) == {
            "ok": 0, "rejected": [[0, "invalid", "actor: expected str, got int"]]}
        assert conn.request({"type": "x", "actor": 7}) == {
            "ok": 0, "rejected": [[0, "invalid", "actor: expected str, got int"]]}
        assert conn.request([{"type": "x"}]) == {"ok": 1, "first": 1, "last": 1}
        assert conn.request({"type": "x"}) == {"ok": 1, "first": 2, "last": 2}


def test_event_fields_are_stored(daemon: DaemonProcess) -> None:
    event = {"type": "file.open", "actor": "bob", "target": "/etc/shadow", "id": "evt-1",
             "ts": 1_700_000_000_123_456_789, "stream": "acct-9", "correlation_id": "op-1",
             "causation_id": "evt-0", "tags": {"severity": "high", "workspace": "w1"},
             "data": {"bytes": 12, "ok": False}}
    sent_at = time.time_ns()
    with daemon.connect() as conn:
        assert conn.request(event) == {"ok": 1, "first": 1, "last": 1}
    answered_at = time.time_ns()
    wait_committed(daemon, 1)
    rows = daemon.query(
        "SELECT e.id, e.ts, tg.value, e.stream_seq, e.correlation_id, e.causation_id, e.tags,"
        " e.data, e.received_at FROM events e JOIN names tg ON tg.id = e.target")
    ((event_id, ts, target, stream_seq, correlation, causation, tags, data, received),) = rows
    assert (event_id, ts, target, stream_seq, correlation, causation) == (
        "evt-1", 1_700_000_000_123_456_789, "/etc/shadow", 1, "op-1", "evt-0")
    assert msgspec.msgpack.decode(tags) == {"severity": "high", "workspace": "w1"}
    assert msgspec.msgpack.decode(data) == {"bytes": 12, "ok": False}
    assert sent_at <= received <= answered_at  # the daemon's clock when it took the event


# -- invalid -------------------------------------------------------------------------

INVALID_CASES = [
    ({"type": "t", "actor": 5}, "actor: expected str, got int"),
    ({"actor": "alice"}, "type: required"),
    ({"type": "t", "seq": 1}, "seq: set by the daemon, a client may not send it"),
    ({"type": "t", "hash": "x"}, "hash: set by the daemon, a client may not send it"),
    ({"type": "t", "pid": 1}, "pid: set by the daemon, a client may not send it"),
    ({"type": "t", "expect": 0}, "expect: only allowed together with stream"),
    ({"type": "t", "ts": "yesterday"}, "ts: expected a timestamp, int (ns) or float (s)"),
    ({"type": "t", "tags": {f"k{i}": "v" for i in range(33)}},
     "tags: expected object of length <= 32"),
    ({"type": "t", "tags": {"k": "v" * 257}}, "tags: expected str of length <= 256"),
    ({"type": "t", "colour": "red"}, "colour: unknown key"),
    ({"type": ""}, "type: expected str of length >= 1"),
    ({"type": "t", "stream": "s", "expect": -1}, "expect: expected int >= 0"),
]


def test_invalid_events_are_named_by_field_and_dead_lettered(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        for event, message in INVALID_CASES:
            assert conn.request(event) == {"ok": 0, "rejected": [[0, "invalid", message]]}
        # The connection survives every per-event rejection.
        assert conn.request({"type": "fine"}) == {"ok": 1, "first": 1, "last": 1}
    letters = wait_dead_letters(daemon, len(INVALID_CASES))
    assert [(seq, source, code, reason, raw, size, uid)
            for seq, source, code, reason, raw, size, uid in letters] == [
        (None, "ingest", "invalid", message, encode(event), len(encode(event)), os.getuid())
        for event, message in INVALID_CASES]


def test_tag_key_too_long_names_the_tags_field(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        reply = conn.request({"type": "t", "tags": {"k" * 65: "v"}})
    assert reply["ok"] == 0
    ((index, code, message),) = reply["rejected"]
    assert (index, code) == (0, "invalid")
    assert message.startswith("tags"), message
    assert "64" in message


# -- too_large, conflict -----------------------------------------------------------------


def test_too_large_event(make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon({"ingest": {"max_event_bytes": "1KB"}})
    big = {"type": "t", "data": "x" * 2000}
    size = len(encode(big))
    message = f"event is {size} bytes, over the 1024-byte limit"
    with daemon.connect() as conn:
        assert conn.request(big) == {"ok": 0, "rejected": [[0, "too_large", message]]}
        assert conn.request([{"type": "a"}, big, {"type": "b"}]) == {
            "ok": 2, "first": 1, "last": 2, "rejected": [[1, "too_large", message]]}
    letters = wait_dead_letters(daemon, 2)
    assert [(source, code, reason, raw) for _, source, code, reason, raw, _, _ in letters] == [
        ("ingest", "too_large", message, encode(big))] * 2


def test_frame_of_exactly_max_frame_bytes_is_not_a_framing_error(
        daemon: DaemonProcess) -> None:
    prefix = len(encode({"type": "t", "data": b""}))
    # bin32 header is 5 bytes, the bin8 header counted in `prefix` was 2.
    event = {"type": "t", "data": b"x" * (1_048_576 - prefix - 3)}
    body = encode(event)
    assert len(body) == 1_048_576
    with daemon.connect() as conn:
        reply = conn.request(body)
        assert reply == {"ok": 0, "rejected": [
            [0, "too_large", "event is 1048576 bytes, over the 262144-byte limit"]]}
        assert conn.request({"type": "after"}) == {"ok": 1, "first": 1, "last": 1}


def test_conflict_gives_the_current_version(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        assert conn.request({"type": "t", "stream": "acct", "expect": 0}) == {
            "ok": 1, "first": 1, "last": 1}
        assert conn.request({"type": "t", "stream": "acct", "expect": 0}) == {
            "ok": 0, "rejected": [[0, "conflict", "stream 'acct' is at version 1, not 0"]]}
        assert conn.request({"type": "t", "stream": "new", "expect": 3}) == {
            "ok": 0, "rejected": [[0, "conflict", "stream 'new' is at version 0, not 3"]]}
        assert conn.request({"type": "t", "stream": "acct", "expect": 1}) == {
            "ok": 1, "first": 2, "last": 2}
        # Without expect an append always goes to the end.
        assert conn.request({"type": "t", "stream": "acct"}) == {"ok": 1, "first": 3, "last": 3}
    letters = wait_dead_letters(daemon, 2)
    assert [(source, code, reason) for _, source, code, reason, _, _, _ in letters] == [
        ("ingest", "conflict", "stream 'acct' is at version 1, not 0"),
        ("ingest", "conflict", "stream 'new' is at version 0, not 3")]
    wait_committed(daemon, 3)
    assert [(row[4], row[5]) for row in stored(daemon)] == [("acct", 1), ("acct", 2), ("acct", 3)]
    assert daemon.query("SELECT n.value, s.version, s.last_seq FROM streams s"
                        " JOIN names n ON n.id = s.stream") == [("acct", 3, 3)]


# -- mixed frames --------------------------------------------------------------------


def test_mixed_frame_accepts_the_valid_and_reports_the_rest(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon({"ingest": {"max_event_bytes": 1024}})
    big = {"type": "big", "data": "x" * 2000}
    batch = [
        {"type": "a", "stream": "s"},
        {"type": "b", "actor": 1},
        {"type": "c", "stream": "s", "expect": 1},
        {"type": "d", "stream": "s", "expect": 5},
        big,
        {"type": "e", "id": "dup"},
        {"type": "f", "id": "dup"},
        17,
        {"type": "g", "stream": "s"},
    ]
    expected_rejected = [
        [1, "invalid", "actor: expected str, got int"],
        [3, "conflict", "stream 's' is at version 2, not 5"],
        [4, "too_large", f"event is {len(encode(big))} bytes, over the 1024-byte limit"],
        [7, "invalid", "event: expected object, got int"],
    ]
    with daemon.connect() as conn:
        reply = conn.request(batch)
    assert reply == {"ok": 4, "first": 1, "last": 4, "rejected": expected_rejected,
                     "duplicates": [[6, 3]]}
    wait_committed(daemon, 4)
    rows = stored(daemon)
    assert [(r[0], r[2], r[4], r[5]) for r in rows] == [
        (1, "a", "s", 1), (2, "c", "s", 2), (3, "e", None, None), (4, "g", "s", 3)]
    letters = wait_dead_letters(daemon, 4)
    assert sorted((code, reason, raw) for _, _, code, reason, raw, _, _ in letters) == sorted(
        (code, reason, encode(batch[index])) for index, code, reason in expected_rejected)
    assert {source for _, source, *_ in letters} == {"ingest"}


# -- frame errors --------------------------------------------------------------------


@pytest.mark.parametrize(("body", "message"), [
    (b"\xc1", "body is not valid MessagePack: MessagePack data is malformed: "
              "invalid opcode '\\xc1' (byte 0)"),
    (encode({"type": "t"}) + b"\x00",
     "body is not valid MessagePack: MessagePack data is malformed: trailing characters "
     "(byte 8)"),
    (encode([{"type": "t"}]) + b"\x01",
     "body is not valid MessagePack: MessagePack data is malformed: trailing characters "
     "(byte 9)"),
    (encode(42), "body must be a map (one event) or an array (a batch), got int"),
    (encode("hello"), "body must be a map (one event) or an array (a batch), got str"),
    (b"\x82\xa4type", "body is not valid MessagePack: Input data was truncated"),
], ids=["not-msgpack", "trailing-map", "trailing-array", "int", "str", "truncated"])
def test_bad_frame_is_fatal(shared_daemon: DaemonProcess, body: bytes, message: str) -> None:
    daemon = shared_daemon
    marker = f"never-{body.hex()[:16]}"
    with daemon.connect() as conn:
        conn.send_raw(encode_frame(encode({"type": "before"})) + encode_frame(body)
                      + encode_frame(encode({"type": marker})))
        before = conn.recv()
        assert before["ok"] == 1 and before["first"] == before["last"]
        assert conn.recv() == {"ok": 0, "error": "bad_frame", "message": message,
                               "fatal": True}
        assert_closed(conn)
    with daemon.connect() as other:  # the daemon itself is fine
        assert other.request({"type": "next"})["first"] == before["first"] + 1
    wait_committed(daemon, before["first"] + 1)
    assert daemon.query("SELECT count(*) FROM events e JOIN names n ON n.id = e.type"
                        " WHERE n.value = ?", marker) == [(0,)]


@pytest.mark.parametrize("length", [0, 1_048_577, 0x7FFFFFFF, 0xFFFFFFFF])
def test_frame_too_large_is_fatal_and_allocates_nothing(shared_daemon: DaemonProcess,
                                                        length: int) -> None:
    daemon = shared_daemon
    pid = daemon_pid(daemon)
    with daemon.connect() as conn:  # warm up the daemon's code paths first
        assert conn.request({"type": "warm"})["ok"] == 1
    before = vm_rss_kb(pid)
    for _ in range(5):
        with daemon.connect() as conn:
            conn.send_raw(length.to_bytes(4, "big") + b"\x00" * 4096)
            assert conn.recv() == {
                "ok": 0, "error": "frame_too_large",
                "message": f"frame length {length} is outside 1..1048576 bytes", "fatal": True}
            assert_closed(conn)
    assert vm_rss_kb(pid) - before < 8 * 1024  # nowhere near `length` bytes
    with daemon.connect() as conn:
        assert conn.request({"type": "still-fine"})["ok"] == 1


def test_frame_too_large_after_good_frames_answers_them_first(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        conn.send_raw(encode_frame(encode({"type": "a"})) + encode_frame(encode({"type": "b"}))
                      + b"\x00\x00\x00\x00")
        assert conn.recv() == {"ok": 1, "first": 1, "last": 1}
        assert conn.recv() == {"ok": 1, "first": 2, "last": 2}
        assert conn.recv()["error"] == "frame_too_large"
        assert_closed(conn)


def test_batch_too_large(make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon({"ingest": {"max_batch_events": 10}})
    with daemon.connect() as conn:
        assert conn.request([{"type": "t"}] * 11) == {
            "ok": 0, "error": "batch_too_large", "message": "batch of 11 events exceeds 10"}
        # Not fatal, and nothing of the frame was taken.
        assert conn.request([{"type": "t"}] * 10) == {"ok": 10, "first": 1, "last": 10}
    wait_committed(daemon, 10)
    assert daemon.query("SELECT count(*) FROM events") == [(10,)]
    # The refused frame is kept whole, so a fire-and-forget client's events can be found.
    assert daemon.query("SELECT seq, source, code, reason, raw FROM dead_letters") == [
        (None, "ingest", "batch_too_large", "batch of 11 events exceeds 10",
         encode([{"type": "t"}] * 11))]


def test_batch_larger_than_the_buffer_is_batch_too_large(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon({"buffer": {"capacity": 16}})
    with daemon.connect() as conn:
        assert conn.request([{"type": "t"}] * 17) == {
            "ok": 0, "error": "batch_too_large",
            "message": "batch of 17 events exceeds the buffer capacity of 16"}
        assert conn.request([{"type": "t"}] * 16) == {"ok": 16, "first": 1, "last": 16}


def test_overloaded_when_the_buffer_is_full_and_overflow_rejects(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon({"buffer": {"capacity": 16, "overflow": "reject"}, **FAST_RETRY})
    with daemon.connect() as conn:
        with write_lock(daemon):
            assert conn.request([{"type": "fill"}] * 16) == {"ok": 16, "first": 1, "last": 16}
            # The writer has tried to commit them and failed: the buffer stays full.
            wait_for(lambda: daemon.stats()["commit_failures"] >= 1, what="a failed commit")
            overloaded = {"ok": 0, "error": "overloaded", "message": "the buffer is full",
                          "retry_after_ms": 100}
            assert conn.request({"type": "late"}) == overloaded
            assert conn.request([{"type": "late"}, {"type": "late"}]) == overloaded
            assert committed_seq(daemon) == 0
        wait_buffer_empty(daemon)
        # Nothing of the refused frames took a seq.
        assert conn.request({"type": "retry"}) == {"ok": 1, "first": 17, "last": 17}
    wait_committed(daemon, 17)
    assert [row[2] for row in stored(daemon)] == ["fill"] * 16 + ["retry"]


def test_max_connections_refuses_with_overloaded(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon({"ingest": {"max_connections": 3}})
    conns = [daemon.connect() for _ in range(3)]
    try:
        for conn in conns:
            assert conn.request({"type": "t"})["ok"] == 1
        with daemon.connect() as extra:
            assert extra.recv() == {"ok": 0, "error": "overloaded",
                                    "message": "too many connections (max 3)",
                                    "retry_after_ms": 1000, "fatal": True}
            assert_closed(extra)
        conns.pop().close()

        def served_again() -> dict[str, Any] | None:
            with daemon.connect() as again:
                try:
                    reply = again.request({"type": "t"})
                except (BrokenPipeError, ConnectionError):
                    return None  # refused and closed before our frame got in
            return None if reply.get("error") == "overloaded" else reply

        # Served once the daemon has seen the close (it may take a moment under load).
        assert wait_for(served_again, timeout=10) == {"ok": 1, "first": 4, "last": 4}
    finally:
        for conn in conns:
            conn.close()


# -- durability = fsync, half-closed clients -------------------------------------------


def test_fsync_durability_replies_in_order_then_the_fatal_error(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon({"ingest": {"durability": "fsync"}})
    with daemon.connect() as conn:
        conn.send_raw(b"".join(encode_frame(encode([{"type": "f"}] * 3)) for _ in range(20))
                      + encode_frame(encode(7)))
        replies = [conn.recv() for _ in range(21)]
        assert replies[:20] == [{"ok": 3, "first": 3 * i + 1, "last": 3 * i + 3}
                                for i in range(20)]
        assert replies[20] == {"ok": 0, "error": "bad_frame", "fatal": True, "message":
                               "body must be a map (one event) or an array (a batch), got int"}
        assert_closed(conn)
    wait_committed(daemon, 60)


@pytest.mark.parametrize("durability", ["write", "fsync"])
def test_client_that_half_closes_still_gets_every_reply(
        make_daemon: Callable[..., DaemonProcess], durability: str) -> None:
    daemon = make_daemon({"ingest": {"durability": durability}})
    with daemon.connect() as conn:
        conn.send_raw(b"".join(encode_frame(encode({"type": "h", "id": f"h{i}"}))
                               for i in range(10)))
        conn.sock.shutdown(socket.SHUT_WR)  # "that is all I have to say"; still reading
        replies = [conn.recv() for _ in range(10)]
    assert replies == [{"ok": 1, "first": i, "last": i} for i in range(1, 11)]


def test_half_closed_client_held_by_a_full_buffer_gets_every_reply(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon({"buffer": {"capacity": 16}, **FAST_RETRY})
    with daemon.connect() as conn:
        with write_lock(daemon):
            conn.send_raw(b"".join(encode_frame(encode({"type": "h", "id": f"h{i}"}))
                                   for i in range(24)))
            conn.sock.shutdown(socket.SHUT_WR)
            replies = [conn.recv() for _ in range(16)]
            # Half-closed and held with 8 frames unanswered: the daemon must not close it.
            wait_held(daemon, 1)
        replies += [conn.recv() for _ in range(8)]
    assert replies == [{"ok": 1, "first": i, "last": i} for i in range(1, 25)]


# -- transport and identity ------------------------------------------------------------

CHILD_CLIENT = """
import socket, sys
import msgspec
with open("/proc/self/comm", "w") as handle:
    handle.write("audit-writer")
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
body = msgspec.msgpack.encode([{"type": "from.child", "id": "child-1"},
                               {"type": "forged", "pid": 1, "uid": 0, "comm": "init"}])
sock.sendall(len(body).to_bytes(4, "big") + body)
size = int.from_bytes(sock.recv(4), "big")
reply = b""
while len(reply) < size:
    reply += sock.recv(size - len(reply))
print(msgspec.msgpack.decode(reply))
"""


def test_identity_comes_from_the_kernel_not_the_client(daemon: DaemonProcess) -> None:
    child = subprocess.run([sys.executable, "-c", CHILD_CLIENT, daemon.ingest_socket],
                           capture_output=True, text=True, timeout=60, check=True)
    # A client cannot set its identity: the forged keys are refused by name.
    assert child.stdout.strip() == str({"ok": 1, "first": 1, "last": 1, "rejected": [
        [1, "invalid", "pid: set by the daemon, a client may not send it"]]})
    wait_committed(daemon, 1)
    rows = daemon.query("SELECT e.pid, e.uid, e.gid, c.value FROM events e"
                        " JOIN names c ON c.id = e.comm")
    assert len(rows) == 1
    pid, uid, gid, comm = rows[0]
    assert pid != os.getpid() and pid > 0  # the child's own pid
    assert (uid, gid, comm) == (os.getuid(), os.getgid(), "audit-writer")


def test_socket_mode_and_a_refused_second_daemon(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    first = make_daemon()
    assert stat.S_IMODE(os.stat(first.ingest_socket).st_mode) == 0o660
    second = make_daemon({"ingest": {"socket": first.ingest_socket},
                          "status": {"socket": str(first.root / "status2.sock")}}, start=False)
    second.start(wait=False)
    proc = second.proc
    assert proc is not None
    refusal = f"auditd: another daemon is already listening on {first.ingest_socket}"
    wait_for(lambda: refusal in second.log_text() or proc.poll() is not None,
             what="the refusal")
    assert refusal in second.log_text()
    try:
        code = proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("the refused daemon said why but never exited")
    assert code == 1
    with first.connect() as conn:  # the first one was not disturbed
        assert conn.request({"type": "t"}) == {"ok": 1, "first": 1, "last": 1}


def test_stale_socket_file_is_replaced(make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon(start=False)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(daemon.ingest_socket)
    stale.close()  # the file stays, nobody listens: what a crash leaves behind
    assert os.path.exists(daemon.ingest_socket)
    daemon.start()
    with daemon.connect() as conn:
        assert conn.request({"type": "t"}) == {"ok": 1, "first": 1, "last": 1}
    assert '"stale_socket_replaced"' in daemon.log_text()
