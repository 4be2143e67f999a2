"""Ordered shutdown: SIGTERM under load loses nothing acknowledged; shutting_down; a second
signal exits at once and the journal brings the acknowledged events back at the next start.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from conftest import FAST_RETRY, DaemonProcess, wait_for, wait_held, write_lock

from auditd.ingest.framing import encode_frame

encode = msgspec.msgpack.encode
SHUTTING_DOWN = {"ok": 0, "error": "shutting_down",
                 "message": "the daemon is stopping; nothing was accepted"}




def wait_stopping(daemon: DaemonProcess) -> None:
    wait_for(lambda: '"daemon_stopping"' in daemon.log_text(), what="daemon_stopping")




def stored_ids(daemon: DaemonProcess) -> dict[str, int]:
    return dict(daemon.query("SELECT id, seq FROM events"))


def assert_refuses_connections(daemon: DaemonProcess) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
            sock.connect(daemon.ingest_socket)
    finally:
        sock.close()


def signal_daemon(daemon: DaemonProcess, signum: int) -> None:
    assert daemon.proc is not None
    daemon.proc.send_signal(signum)


def exit_code(daemon: DaemonProcess, timeout: float = 60.0) -> int:
    assert daemon.proc is not None
    return daemon.proc.wait(timeout)


# -- SIGTERM under load ----------------------------------------------------------------


class Sender:
    """Pipelines batches on one connection; records every acknowledged and refused id."""

    def __init__(self, daemon: DaemonProcess, number: int) -> None:
        self.daemon = daemon
        self.number = number
        self.acknowledged: dict[str, int] = {}
        self.refused: list[str] = []
        self.unanswered: list[str] = []
        self.frames = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self._send_until_refused()
        except BaseException as exc:
            self.error = exc

    def _send_until_refused(self) -> None:
        conn = self.daemon.connect()
        window, batch, counter = 4, 50, 0
        try:
            while True:
                frames = []
                for _ in range(window):
                    ids = [f"c{self.number}-{counter + j}" for j in range(batch)]
                    counter += batch
                    frames.append(ids)
                try:
                    conn.send_raw(b"".join(encode_frame(encode(
                        [{"type": "load", "id": i, "data": self.number} for i in ids]))
                        for ids in frames))
                except (BrokenPipeError, ConnectionResetError):
                    self.unanswered += [i for ids in frames for i in ids]
                    return
                for position, ids in enumerate(frames):
                    try:
                        reply = conn.recv()
                    except (ConnectionError, TimeoutError):
                        self.unanswered += [i for rest in frames[position:] for i in rest]
                        return
                    self.frames += 1
                    if reply == SHUTTING_DOWN:
                        self.refused += ids
                        continue
                    assert reply == {"ok": batch, "first": reply["first"],
                                     "last": reply["first"] + batch - 1}, reply
                    for offset, event_id in enumerate(ids):
                        self.acknowledged[event_id] = reply["first"] + offset
                if self.refused:
                    return
        finally:
            conn.close()


def test_sigterm_under_load_loses_nothing_acknowledged(daemon: DaemonProcess) -> None:
    senders = [Sender(daemon, n) for n in range(4)]
    for sender in senders:
        sender.thread.start()
    wait_for(lambda: all(s.frames >= 20 for s in senders), what="load to build up")
    signal_daemon(daemon, signal.SIGTERM)
    assert exit_code(daemon) == 0
    for sender in senders:
        sender.thread.join(30)
        assert not sender.thread.is_alive()
        assert sender.error is None, repr(sender.error)
    acknowledged = {k: v for s in senders for k, v in s.acknowledged.items()}
    refused = [i for s in senders for i in s.refused]
    assert len(acknowledged) >= 4 * 20 * 50

    stored = stored_ids(daemon)
    missing = [i for i in acknowledged if i not in stored]
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {missing[:5]}"
    assert all(stored[i] == seq for i, seq in acknowledged.items())
    assert not [i for i in refused if i in stored], "a shutting_down frame was stored"
    seqs = sorted(stored.values())
    assert seqs == list(range(1, len(seqs) + 1))
    committed = daemon.query("SELECT value FROM meta WHERE key = 'committed_seq'")
    assert committed == [(seqs[-1],)]
    log = daemon.log_text()
    assert '"daemon_stopping"' in log and '"daemon_stopped"' in log

    # Nothing left to replay: a restart adds nothing and loses nothing.
    daemon.start()
    with daemon.connect() as conn:
        assert conn.request({"type": "after"}) == {
            "ok": 1, "first": seqs[-1] + 1, "last": seqs[-1] + 1}
    daemon.stop()
    assert len(stored_ids(daemon)) == len(seqs) + 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_clean_stop_commits_pending_and_exits_0(daemon: DaemonProcess, signum: int) -> None:
    with daemon.connect() as conn:
        for i in range(20):
            assert conn.request([{"type": "t", "id": f"e{i}-{j}"} for j in range(10)])["ok"] == 10
    signal_daemon(daemon, signum)
    assert exit_code(daemon) == 0
    assert len(stored_ids(daemon)) == 200
    assert_refuses_connections(daemon)


# -- shutting_down ---------------------------------------------------------------------


def test_frame_on_an_open_connection_during_shutdown_is_answered_shutting_down(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon(FAST_RETRY)
    first = daemon.connect()
    second = daemon.connect()
    try:
        with write_lock(daemon):
            # Acknowledged (journaled) but not committed: the writer is stalled.
            assert first.request([{"type": "early", "id": f"early-{i}"} for i in range(5)]) == {
                "ok": 5, "first": 1, "last": 5}
            signal_daemon(daemon, signal.SIGTERM)
            wait_stopping(daemon)
            assert first.request({"type": "late", "id": "late-1"}) == SHUTTING_DOWN
            assert second.request([{"type": "late", "id": "late-2"}]) == SHUTTING_DOWN
            assert first.request({"type": "late", "id": "late-3"}) == SHUTTING_DOWN
            # No new connections while draining.
            assert_refuses_connections(daemon)
            # It drains on: the writer keeps retrying after the signal, and no exit.
            failures = daemon.stats()["commit_failures"]
            wait_for(lambda: daemon.stats()["commit_failures"] >= failures + 3,
                     what="the writer to retry while draining")
            assert daemon.running, "the daemon gave up draining while the lock was held"
        assert exit_code(daemon) == 0
    finally:
        first.close()
        second.close()
    assert stored_ids(daemon) == {f"early-{i}": i + 1 for i in range(5)}


def test_senders_held_by_a_full_buffer_are_answered_shutting_down(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon({"buffer": {"capacity": 16}, **FAST_RETRY})
    replies: list[dict[str, Any]] = []
    with daemon.connect() as conn, write_lock(daemon):
        conn.send_raw(b"".join(encode_frame(encode({"type": "t", "id": f"b{i}"}))
                               for i in range(40)))
        for _ in range(16):
            replies.append(conn.recv())
        wait_held(daemon, 1)  # the other 24 frames wait for room when the signal comes
        signal_daemon(daemon, signal.SIGTERM)
        wait_stopping(daemon)
        for _ in range(24):
            replies.append(conn.recv())
    assert exit_code(daemon) == 0
    assert replies[:16] == [{"ok": 1, "first": i, "last": i} for i in range(1, 17)]
    assert replies[16:] == [SHUTTING_DOWN] * 24
    assert stored_ids(daemon) == {f"b{i}": i + 1 for i in range(16)}


# -- a second signal -------------------------------------------------------------------


def test_second_signal_exits_at_once_and_the_journal_keeps_the_acknowledged(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon(FAST_RETRY)
    with write_lock(daemon):
        with daemon.connect() as conn:
            assert conn.request([{"type": "t", "id": f"j{i}"} for i in range(30)]) == {
                "ok": 30, "first": 1, "last": 30}
        signal_daemon(daemon, signal.SIGTERM)
        wait_stopping(daemon)
        signal_daemon(daemon, signal.SIGTERM)
        # Under the lock a drain would go on (and end in exit 0): 1 means it stopped at once.
        code = exit_code(daemon)
    assert code == 1
    assert '"forced_exit"' in daemon.log_text()
    assert stored_ids(daemon) == {}  # nothing was committed while the lock was held
    daemon.start()  # replays the journal
    wait_for(lambda: len(stored_ids(daemon)) == 30, what="journal replay")
    assert stored_ids(daemon) == {f"j{i}": i + 1 for i in range(30)}
    with daemon.connect() as conn:
        assert conn.request([{"type": "t", "id": "j3"}, {"type": "t", "id": "new"}]) == {
            "ok": 1, "first": 31, "last": 31, "duplicates": [[0, 4]]}


def test_sigterm_with_a_client_that_never_reads_still_exits(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        assert conn.request({"type": "seed", "id": "seen"})["ok"] == 1
    # A client that fills its socket with frames and never reads a reply: it sends until
    # the daemon holds it for not reading and the socket takes no more (for good, then).
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        hog.connect(daemon.ingest_socket)
        hog.setblocking(False)
        chunk = encode_frame(encode([{"type": "seed", "id": "seen"}] * 20)) * 200
        unsent = memoryview(b"")

        def stuck() -> bool:
            nonlocal unsent
            unsent = unsent or memoryview(chunk)
            try:  # a short send leaves the rest of a frame to send first
                unsent = unsent[hog.send(unsent):]
            except BlockingIOError:
                return daemon.stats()["held_connections"]["writing"] >= 1
            return False

        wait_for(stuck, 60, "the daemon to hold the connection that does not read",
                 interval=0.01)
        with daemon.connect() as conn:  # others are still served meanwhile
            assert conn.request({"type": "other"}) == {"ok": 1, "first": 2, "last": 2}
        signal_daemon(daemon, signal.SIGTERM)
        try:
            code = exit_code(daemon, timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("shutdown hangs on a connection whose client does not read")
        assert code == 0
    finally:
        hog.close()
    assert stored_ids(daemon)["seen"] == 1
    assert len(stored_ids(daemon)) == 2
