"""Backpressure and isolation: many connections, slow readers, garbage, a stalled writer.

The writer is stalled the real way: another process (this test) holds SQLite's write
lock with BEGIN IMMEDIATE on the daemon's database file.
"""

from __future__ import annotations

import contextlib
import random
import resource
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
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








def vm_rss_kb(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    with open(f"/proc/{daemon.proc.pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")




@pytest.fixture
def many_files() -> Iterator[None]:
    """Enough descriptors for 1,000 client sockets here and in the daemon (it inherits)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- many connections --------------------------------------------------------------------



def test_1000_concurrent_connections_are_served(many_files: None,
                                                make_daemon: Callable[..., DaemonProcess]
                                                ) -> None:
    daemon = make_daemon()
    conns: list[RawConnection] = []
    try:
        # A burst of connects, faster than the daemon accepts them: the listen backlog
        # must hold them all (a client with a timeout gets EAGAIN from a full backlog).
        for i in range(1000):
            try:
                conns.append(RawConnection(daemon.ingest_socket))
            except BlockingIOError:
                pytest.fail(f"connect {i} refused with EAGAIN: the daemon's listen backlog "
                            "is full")
        # Every connection has a frame in flight at once, then all replies are read.
        for i, conn in enumerate(conns):
            conn.send({"type": "hello", "id": f"conn-{i}"})
        firsts = []
        for conn in conns:
            reply = conn.recv()
            assert reply["ok"] == 1, reply
            firsts.append(reply["first"])
        assert sorted(firsts) == list(range(1, 1001))
        # All still open and served: a second round, answered in turn.
        for i, conn in enumerate(reversed(conns)):
            assert conn.request({"type": "again", "id": f"again-{i}"})["ok"] == 1
    finally:
        for conn in conns:
            conn.close()
    wait_committed(daemon, 2000)
    assert daemon.query("SELECT count(*), count(DISTINCT id) FROM events") == [(2000, 2000)]
    seqs = dict(daemon.query("SELECT id, seq FROM events WHERE id LIKE 'conn-%'"))
    assert sorted(seqs.values()) == list(range(1, 1001))


# -- a client that never reads its replies -------------------------------------------------


def flood_without_reading(daemon: DaemonProcess, frame: bytes, limit: int,
                          progress: dict[str, Any]) -> None:
    """Write `frame` repeatedly without ever reading; stop at `limit` bytes, or once the
    socket takes no more while the daemon says it holds a connection for `writing`.

    That hold is for good: the daemon stopped reading this connection because its client
    does not read, and this one never will, so a full socket stays full.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(daemon.ingest_socket)
    sock.setblocking(False)
    chunk = frame * max(1, 65536 // len(frame))
    view = memoryview(chunk)
    offset = 0
    progress["sent"] = 0
    try:
        while progress["sent"] < limit:
            _, writable, _ = select.select([], [sock], [], 0.1)
            if not writable:
                if daemon.stats()["held_connections"]["writing"] >= 1:
                    progress["stalled"] = True
                    break
                continue
            try:
                written = sock.send(view[offset:])
            except BlockingIOError:
                continue
            progress["sent"] += written
            offset = (offset + written) % len(chunk)  # chunk holds whole frames
        progress.setdefault("stalled", False)
        progress["ready"].set()
        progress["release"].wait(60)
    finally:
        sock.close()


def test_client_that_never_reads_does_not_grow_the_daemon(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        assert conn.request({"type": "seed", "id": "seen"})["ok"] == 1
        for _ in range(200):  # warm up the daemon before measuring its memory
            conn.request({"type": "warm"})
    wait_committed(daemon, 201)
    baseline = vm_rss_kb(daemon)
    # Each frame is 20 events the daemon has seen: cheap to answer, nothing to store,
    # and the reply (20 duplicates) is a fair share of the frame's size.
    frame = encode_frame(encode([{"type": "seed", "id": "seen"}] * 20))
    progress: dict[str, Any] = {"ready": threading.Event(), "release": threading.Event()}
    limit = 200 * 1024 * 1024
    flooder = threading.Thread(target=flood_without_reading, daemon=True,
                               args=(daemon, frame, limit, progress))
    flooder.start()
    try:
        # While the flood is on, and once it is held, another client is served.
        # (How fast is `auditd bench`'s business, not the suite's.)
        with daemon.connect() as other:
            deadline = time.monotonic() + 60
            while not progress["ready"].is_set() and time.monotonic() < deadline:
                assert other.request({"type": "other"})["ok"] == 1
            assert progress["ready"].wait(60)
            for _ in range(20):
                assert other.request({"type": "other"})["ok"] == 1
        grown_mb = (vm_rss_kb(daemon) - baseline) / 1024
        assert progress["stalled"], f"the daemon read all {progress['sent']} bytes"
        assert progress["sent"] < limit
        assert grown_mb < 64, f"daemon RSS grew {grown_mb:.0f} MB for an unread flood"
        held = daemon.stats()["held_connections"]
        assert held["writing"] == 1, held  # the flood's connection, and only it
    finally:
        progress["release"].set()
        flooder.join(30)
    with daemon.connect() as conn:  # the flood's connection is gone; all is well
        assert conn.request({"type": "after"})["ok"] == 1


# -- garbage from one client --------------------------------------------------------------


def test_random_bytes_from_one_client_disturb_no_other(daemon: DaemonProcess) -> None:
    rng = random.Random(20240501)
    good_replies: list[dict[str, Any]] = []
    stop = threading.Event()

    def good_client() -> None:
        with daemon.connect() as conn:
            i = 0
            while not stop.is_set() or i < 100:
                good_replies.append(conn.request({"type": "good", "id": f"good-{i}"}))
                i += 1

    worker = threading.Thread(target=good_client, daemon=True)
    worker.start()
    garbage_replies = []
    try:
        for round_ in range(30):
            with daemon.connect() as bad:
                if round_ % 2:  # a plausible length prefix followed by random bytes
                    size = rng.randint(1, 4096)
                    payload = size.to_bytes(4, "big") + rng.randbytes(size) + rng.randbytes(64)
                else:
                    payload = rng.randbytes(rng.randint(1, 65536))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    bad.send_raw(payload)
                # All said: the daemon answers what it owes, then closes (a partial frame
                # is dropped), so reading to EOF collects every reply without guessing
                # when the answers are over.
                with contextlib.suppress(OSError):
                    bad.sock.shutdown(socket.SHUT_WR)
                with contextlib.suppress(ConnectionError):
                    while True:  # whatever the daemon answers is a well-formed reply frame
                        reply = bad.recv()
                        assert isinstance(reply, dict) and "ok" in reply, reply
                        garbage_replies.append(reply)
    finally:
        stop.set()
        worker.join(60)
    assert not worker.is_alive()
    assert len(good_replies) >= 100
    assert all(r["ok"] == 1 for r in good_replies), [r for r in good_replies if r["ok"] != 1]
    errors = {r.get("error") for r in garbage_replies if "error" in r}
    assert errors <= {"frame_too_large", "bad_frame", "batch_too_large"}, errors
    assert garbage_replies, "random bytes were never refused"
    assert all(r.get("fatal") is True for r in garbage_replies
               if r.get("error") in {"frame_too_large", "bad_frame"})
    last = good_replies[-1]["last"]
    wait_committed(daemon, last)
    good_ids = daemon.query("SELECT count(*) FROM events WHERE id LIKE 'good-%'")
    assert good_ids == [(len(good_replies),)]


# -- a stalled writer ------------------------------------------------------------------


def test_stalled_writer_blocks_senders_then_they_finish(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon({"buffer": {"capacity": 16}, **FAST_RETRY})
    senders, frames_each = 4, 40
    replies: dict[int, list[tuple[float, dict[str, Any]]]] = {n: [] for n in range(senders)}
    bulk_done: dict[str, float] = {}
    big_frame = encode_frame(encode([{"type": "bulk", "data": "x" * 2000}] * 8))

    def sender(number: int) -> None:
        with daemon.connect() as conn:
            conn.sock.settimeout(60)
            conn.send_raw(b"".join(
                encode_frame(encode({"type": "t", "id": f"s{number}-{i}"}))
                for i in range(frames_each)))
            for _ in range(frames_each):
                reply = conn.recv()
                replies[number].append((time.monotonic(), reply))

    def bulk_sender() -> None:
        # Enough bytes that the socket buffers fill: sendall itself must block.
        with daemon.connect() as conn:
            conn.sock.settimeout(60)
            reader = threading.Thread(
                target=lambda: [conn.recv() for _ in range(300)], daemon=True)
            reader.start()
            conn.send_raw(big_frame * 300)
            bulk_done["sent"] = time.monotonic()
            reader.join(60)
            bulk_done["replied"] = time.monotonic()

    with write_lock(daemon):
        threads = [threading.Thread(target=sender, args=(n,), daemon=True)
                   for n in range(senders)]
        threads.append(threading.Thread(target=bulk_sender, daemon=True))
        for thread in threads:
            thread.start()
        # Every sender is held back by the daemon, with the buffer full.
        figures = wait_held(daemon, senders + 1)
        assert figures["pending"] == 16, figures
        answered = sum(len(r) for r in replies.values())
        # Only what fits in the buffer was accepted; everyone else is held back.
        assert answered <= 16, answered
        assert "sent" not in bulk_done
        assert committed_seq(daemon) == 0
        released_at = time.monotonic()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    assert bulk_done["sent"] >= released_at
    late = [t for r in replies.values() for t, _ in r if t >= released_at]
    assert late, "no sender was ever held back"
    total = senders * frames_each + 300 * 8
    seqs = []
    for number, answers in replies.items():
        assert [reply["ok"] for _, reply in answers] == [1] * frames_each
        firsts = [reply["first"] for _, reply in answers]
        assert firsts == sorted(firsts), f"sender {number} out of order"
        seqs += firsts
    wait_committed(daemon, total)
    assert daemon.query("SELECT count(*), min(seq), max(seq) FROM events") == [(total, 1, total)]
    stored = dict(daemon.query("SELECT id, seq FROM events WHERE id LIKE 's%-%'"))
    assert sorted(stored.values()) == sorted(seqs)


def test_overflow_reject_answers_overloaded_and_a_retrying_client_loses_nothing(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon({"buffer": {"capacity": 16, "overflow": "reject"}, **FAST_RETRY})
    overloaded: list[dict[str, Any]] = []
    acknowledged: dict[str, int] = {}

    def client() -> None:
        with daemon.connect() as conn:
            for i in range(100):
                event = {"type": "t", "id": f"r-{i}"}
                while True:
                    reply = conn.request(event)
                    if reply.get("error") == "overloaded":
                        overloaded.append(reply)
                        time.sleep(reply["retry_after_ms"] / 1000)
                        continue
                    assert reply["ok"] == 1, reply
                    acknowledged[event["id"]] = reply["first"]
                    break

    with write_lock(daemon):
        worker = threading.Thread(target=client, daemon=True)
        worker.start()
        # Refused again and again while the writer cannot commit: the client retries.
        wait_for(lambda: len(overloaded) >= 3, what="overloaded replies")
        assert committed_seq(daemon) == 0
    worker.join(60)
    assert not worker.is_alive()
    assert overloaded, "the full buffer never answered overloaded"
    assert all(r == {"ok": 0, "error": "overloaded", "message": "the buffer is full",
                     "retry_after_ms": 100} for r in overloaded), overloaded[:3]
    assert sorted(acknowledged.values()) == list(range(1, 101))
    wait_committed(daemon, 100)
    assert dict(daemon.query("SELECT id, seq FROM events")) == acknowledged


def test_buffer_max_bytes_bounds_pending_events_too(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon({"buffer": {"capacity": 1000, "overflow": "reject",
                                     "max_bytes": "8KB"}, **FAST_RETRY})
    event = {"type": "big", "data": "x" * 3000}
    with daemon.connect() as conn:
        with write_lock(daemon):
            assert conn.request(event) == {"ok": 1, "first": 1, "last": 1}
            assert conn.request(event) == {"ok": 1, "first": 2, "last": 2}
            # A third would take pending bytes past 8 KB, though 997 slots are free.
            assert conn.request(event) == {"ok": 0, "error": "overloaded",
                                           "message": "the buffer is full",
                                           "retry_after_ms": 100}
            assert conn.request({"type": "small"}) == {"ok": 1, "first": 3, "last": 3}
        wait_buffer_empty(daemon)
        assert conn.request(event) == {"ok": 1, "first": 4, "last": 4}
