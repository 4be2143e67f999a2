"""The journal's fsyncs through a real child process: files handed over, failures, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from auditd.errors import JournalError
from auditd.journal import fsync_process
from auditd.journal import sync as journal_sync
from auditd.journal.fsync_process import REPLY, REQUEST
from auditd.journal.journal import Journal, encode_record
from auditd.journal.sync import ProcessFsync


def open_files(pid: int) -> set[str]:
    """What the process holds open, as paths (sockets and pipes by their kind)."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    return held


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def segment(directory: Path, name: str) -> int:
    fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.write(fd, b"record")
    return fd


def test_the_child_keeps_the_current_segment_and_closes_finished_ones(tmp_path: Path) -> None:
    async def scenario() -> int:
        fsync = ProcessFsync(tmp_path)
        first = segment(tmp_path, "1.journal")
        await fsync.sync(first, [], True)
        assert fsync.pid is not None
        assert str(tmp_path / "1.journal") in open_files(fsync.pid)

        second = segment(tmp_path, "2.journal")
        await fsync.sync(second, [first], True)
        assert is_closed(first)  # the journal's own fd, closed once synced
        held = open_files(fsync.pid)
        assert str(tmp_path / "2.journal") in held
        assert str(tmp_path / "1.journal") not in held

        os.write(second, b"more")
        await fsync.sync(second, [], False)  # the child syncs what it holds
        pid = fsync.pid
        fsync.close()
        os.close(second)
        return pid

    pid = asyncio.run(scenario())
    assert not os.path.exists(f"/proc/{pid}")  # exited and reaped


def test_a_failed_fdatasync_is_raised_and_the_child_serves_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        fsync = ProcessFsync(tmp_path)
        read_end, write_end = os.pipe()  # fdatasync(2) on a pipe fails with EINVAL
        with pytest.raises(OSError, match="fsync process") as raised:
            await fsync.sync(write_end, [], True)
        assert raised.value.errno == errno.EINVAL
        pid = fsync.pid
        current = segment(tmp_path, "1.journal")
        await fsync.sync(current, [], True)
        assert fsync.pid == pid
        fsync.close()
        for fd in (read_end, write_end, current):
            os.close(fd)

    asyncio.run(scenario())


def test_a_killed_child_fails_the_sync_in_flight_and_a_new_one_takes_over(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        fsync = ProcessFsync(tmp_path)
        current = segment(tmp_path, "1.journal")
        finished = segment(tmp_path, "0.journal")
        await fsync.sync(current, [], True)
        first_pid = fsync.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        with capture_logs() as logs:
            with pytest.raises(OSError, match=f"fsync process {first_pid} exited"):
                await fsync.sync(current, [finished], False)
            assert not is_closed(finished)  # kept for the retry
            await fsync.sync(current, [finished], False)
        assert is_closed(finished)
        assert fsync.pid not in (None, first_pid)
        assert str(tmp_path / "1.journal") in open_files(fsync.pid)  # handed over again
        assert [e["event"] for e in logs] == ["fsync_process_exited", "fsync_process_started"]
        assert logs[0]["returncode"] == -signal.SIGKILL
        fsync.close()
        os.close(current)

    asyncio.run(scenario())


def test_without_a_child_process_the_syncs_run_in_a_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_sync.sys, "executable", str(tmp_path / "no-python"))

    async def scenario() -> None:
        fsync = ProcessFsync(tmp_path)
        current, finished = segment(tmp_path, "1.journal"), segment(tmp_path, "0.journal")
        with capture_logs() as logs:
            await fsync.sync(current, [finished], True)
            await fsync.sync(current, [], False)
        assert fsync.pid is None
        assert is_closed(finished)
        assert [e["event"] for e in logs] == ["fsync_process_unavailable"]
        assert "no-python" in logs[0]["error"]
        fsync.close()
        os.close(current)

    asyncio.run(scenario())


def test_the_child_protocol_served_in_process(tmp_path: Path) -> None:
    """fsync_process.serve on a real socket pair: kinds in order, one reply a request."""
    daemon_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = threading.Thread(target=fsync_process.serve, args=(child_end,))
    server.start()
    current, finished = segment(tmp_path, "1.journal"), segment(tmp_path, "0.journal")
    read_end, write_end = os.pipe()
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        socket.send_fds(daemon_end, [REQUEST.pack(7) + b"ocd"], [finished, current, directory])
        assert REPLY.unpack(daemon_end.recv(64)) == (7, 0)
        socket.send_fds(daemon_end, [REQUEST.pack(8) + b"o"], [write_end])
        assert REPLY.unpack(daemon_end.recv(64)) == (8, errno.EINVAL)  # a pipe: named
        daemon_end.send(REQUEST.pack(9))  # the kept segment only
        assert REPLY.unpack(daemon_end.recv(64)) == (9, 0)
    finally:
        daemon_end.close()  # the child's end sees EOF: serve returns
        server.join(5)
        child_end.close()
    assert not server.is_alive()
    for fd in (finished, current, read_end, write_end):
        os.close(fd)  # the daemon's own copies; serve closed the ones it was given


def test_a_group_commit_cancelled_in_flight_leaves_its_files_to_close(tmp_path: Path) -> None:
    """Shutdown cancels the sync task: the files it carried are synced and closed by
    Journal.close(), not leaked."""
    def journal_fds() -> list[str]:
        return [path for path in open_files(os.getpid()) if path.startswith(str(tmp_path))]

    async def scenario() -> None:
        journal = Journal(tmp_path, 1 << 20, fsync=True)
        journal.open_segment(1)
        journal.append(encode_record(1, b"first"), 1, 1)
        journal.open_segment(2)  # the first segment is finished, its fd waits for a sync
        journal.append(encode_record(2, b"second"), 2, 2)
        task = asyncio.ensure_future(journal.sync_forever())
        for _ in range(100):  # until the request is out
            await asyncio.sleep(0)
            if journal._fsync.pid is not None:
                break
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert len(journal_fds()) == 2
        journal.close()
        assert journal_fds() == []

    asyncio.run(scenario())


def test_more_finished_segments_than_one_message_carries_take_several_requests(
        tmp_path: Path) -> None:
    async def scenario() -> None:
        fsync = ProcessFsync(tmp_path)
        finished = [segment(tmp_path, f"{n}.journal") for n in range(150)]
        current = segment(tmp_path, "150.journal")
        await fsync.sync(current, finished, True)
        assert all(is_closed(fd) for fd in finished)
        assert fsync.pid is not None
        held = open_files(fsync.pid)
        assert str(tmp_path / "150.journal") in held
        assert not any(str(tmp_path / f"{n}.journal") in held for n in range(150))
        fsync.close()
        os.close(current)

    asyncio.run(scenario())


def test_a_child_that_never_serves_gives_way_to_a_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that starts and dies at once (here: its program is missing) would leave
    every reply waiting forever on restarts; after three in a row, a thread syncs."""
    monkeypatch.setattr(journal_sync, "_PROGRAM", tmp_path / "gone.py")

    async def scenario() -> None:
        fsync = ProcessFsync(tmp_path)
        current, finished = segment(tmp_path, "1.journal"), segment(tmp_path, "0.journal")
        with capture_logs() as logs:
            for _ in range(3):
                with pytest.raises(OSError, match="exited"):
                    await fsync.sync(current, [finished], True)
                assert not is_closed(finished)
            await fsync.sync(current, [finished], True)
        assert is_closed(finished)
        events = [e["event"] for e in logs]
        assert events == ["fsync_process_started", "fsync_process_exited"] * 3 + [
            "fsync_process_unavailable"]
        assert logs[-1]["error"] == "[Errno 10] 3 fsync processes in a row exited without a reply"
        assert [e["returncode"] for e in logs if e["event"] == "fsync_process_exited"] == [2] * 3
        fsync.close()
        os.close(current)

    asyncio.run(scenario())


@pytest.mark.parametrize("syncer", ["process", "thread"])
def test_a_failed_sync_holds_its_replies_for_the_database_and_a_new_segment_proves_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncer: str) -> None:
    """fdatasync(2) on a FIFO fails (EINVAL): a real failure of the journal's own file,
    met by the fsync process or, when none can start, by the executor thread.

    The waiter it covered is not released by any later journal sync, only by the
    database; the journal refuses appends until a segment created after the failure
    synced; one line for the failure, one for the recovery.
    """
    if syncer == "thread":
        monkeypatch.setattr(journal_sync.sys, "executable", str(tmp_path / "no-python"))
    fifo = tmp_path / f"{1:020d}.journal"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so the journal's open returns
    seen_while_faulted: list[tuple[str | None, bool, bool]] = []

    async def scenario() -> list[dict[str, object]]:
        journal = Journal(tmp_path, 1 << 20, fsync=True)

        def on_fault(reason: str | None) -> None:
            refused = False
            try:
                journal.append(encode_record(9, b"x"), 9, 9)
            except JournalError:
                refused = True
            seen_while_faulted.append((reason, refused, held.done()))

        journal.on_fault = on_fault
        journal.open_segment(1)
        records = b"".join(encode_record(seq, b"event") for seq in (1, 2, 3))
        held = journal.wait_synced(journal.append(records, 1, 3), 3)
        with capture_logs() as logs:
            task = asyncio.ensure_future(journal.sync_forever())
            for _ in range(500):  # until the fault came and went
                if len(seen_while_faulted) == 2:
                    break
                await asyncio.sleep(0.01)
        assert not held.done()  # the new segment's sync does not cover the failed one
        journal.database_durable(2)
        assert not held.done()
        journal.database_durable(3)
        assert held.done()
        after = journal.wait_synced(journal.append(encode_record(4, b"next"), 4, 4), 4)
        await asyncio.wait_for(after, 10)  # the new segment's syncs acknowledge again
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        journal.close()
        return logs

    logs = asyncio.run(scenario())
    os.close(reader)
    (reason, refused, released), (cleared, _, _) = seen_while_faulted
    assert reason is not None and "fdatasync of 00000000000000000001.journal" in reason
    assert "seqs 1..3" in reason
    assert refused and not released and cleared is None
    events = [e for e in logs if e["event"].startswith("journal_")]
    assert [e["event"] for e in events] == ["journal_sync_failed", "journal_sync_recovered"]
    if syncer == "thread":
        assert "fsync_process_unavailable" in [e["event"] for e in logs]
    failed, recovered = events
    assert (failed["errno"], failed["segment"], failed["first_seq"], failed["last_seq"],
            failed["held_replies"]) == (errno.EINVAL, fifo.name, 1, 3, 1)
    assert recovered["segment"] == f"{4:020d}.journal"
    assert (tmp_path / f"{4:020d}.journal").stat().st_size > 0  # seq 4 went there


def wait_until_dead(pid: int) -> None:
    """Until the child is a zombie (dead, not yet reaped by its parent, this process)."""
    deadline = time.monotonic() + 10
    while "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text():
        assert time.monotonic() < deadline, f"process {pid} still alive"
        time.sleep(0.01)


def test_a_child_gone_before_the_request_is_a_retry_not_a_failure(tmp_path: Path) -> None:
    """No fdatasync was started, so the kernel reported no error to anyone: retrying is
    a real sync, and the journal is not faulted."""
    async def scenario() -> list[dict[str, object]]:
        journal = Journal(tmp_path, 1 << 20, fsync=True)
        journal.open_segment(1)
        task = asyncio.ensure_future(journal.sync_forever())
        await asyncio.wait_for(journal.wait_synced(
            journal.append(encode_record(1, b"a"), 1, 1)), 10)
        pid = journal._fsync.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until_dead(pid)  # blocking on purpose: the loop must not notice first
        with capture_logs() as logs:
            await asyncio.wait_for(journal.wait_synced(
                journal.append(encode_record(2, b"b"), 2, 2)), 10)
        assert journal.fault is None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        journal.close()
        return logs

    logs = asyncio.run(scenario())
    assert [e["event"] for e in logs] == ["fsync_process_exited", "fsync_process_started"]
