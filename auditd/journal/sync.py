"""The journal's group-commit fsyncs, off the event loop: in a child process, or a thread.

One contract for both: `sync(fd, finished, new_segment)` returns once `fd` (the segment
being written), every fd in `finished` (segments closed since the last sync) and, when
`new_segment`, the journal directory's entry for `fd` are durable. It raises OSError
otherwise, and closes `finished` only on success. SyncNotAttempted (an OSError) says no
fdatasync was started, so a retry with the same arguments is a real sync; any other
OSError means one may have failed, and the journal never trusts those files again (a
retry that succeeds after EIO proves nothing: see journal.py).

ProcessFsync hands each sync to a child process (`fsync_process.py`) over a socket the
event loop watches. Why not the executor: a sync's fdatasync was the smaller part of its
round trip. The executor thread waited for the GIL before the call and again after it,
while the event loop and the store's thread ran Python, and one group commit took 0.8 ms
at the median and 3.7 ms at p99 for an fdatasync of 0.35 ms. The child has a GIL of its
own: 0.55 and 2.4 ms (`auditd bench --batch 1 --rate 5000 --durability fsync`). When no
child can be started (a sandbox forbidding exec, no memory to fork), ThreadFsync runs
the same syncs in the executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import structlog

from auditd.journal.fsync_process import MAX_FDS, REPLY, REQUEST
from auditd.store.durable import fsync_directory

log = structlog.get_logger("auditd.journal.journal")

_PROGRAM = Path(__file__).with_name("fsync_process.py")
_FINISHED_PER_REQUEST = MAX_FDS - 2  # room for the current segment and the directory
_DEATHS_BEFORE_FALLBACK = 3


class SyncNotAttempted(OSError):
    """The fsync process was gone before it received the request: nothing was synced,
    and the kernel reported no error to anyone, so retrying is a real sync."""


class ThreadFsync:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def sync(self, fd: int, finished: list[int], new_segment: bool) -> None:
        await asyncio.get_running_loop().run_in_executor(
            None, self._sync_files, fd, finished, new_segment)
        for stale in finished:
            os.close(stale)

    def _sync_files(self, fd: int, finished: list[int], new_segment: bool) -> None:
        for stale in finished:
            os.fdatasync(stale)
        os.fdatasync(fd)
        if new_segment:
            fsync_directory(self.directory)


class ProcessFsync:
    """Syncs through a child process, started at the first sync and again after it dies.

    One request is in flight at a time (the journal's group commit waits for each). The
    child keeps the segment being written open, so a request names it only when it is
    new to the child. If a child cannot be started, or dies `_DEATHS_BEFORE_FALLBACK`
    times in a row without a reply (its program missing, a sandbox killing it), every
    later sync runs in a thread: replies must not wait on a child that never serves.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pid: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._channel: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: asyncio.Future[int] | None = None
        self._token = 0
        self._child_has_segment = False
        self._fallback: ThreadFsync | None = None
        self._deaths = 0  # children that died since the last reply

    def _start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", str(_PROGRAM), str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        parent.setblocking(False)
        self._channel, self._child_has_segment = parent, False
        self.pid = self._process.pid
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(parent.fileno(), self._on_reply)
        log.info("fsync_process_started", pid=self.pid)

    async def sync(self, fd: int, finished: list[int], new_segment: bool) -> None:
        if self._channel is None and self._fallback is None:
            try:
                if self._deaths >= _DEATHS_BEFORE_FALLBACK:
                    raise OSError(errno.ECHILD, f"{self._deaths} fsync processes in a row "
                                  "exited without a reply")
                self._start()
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("fsync_process_unavailable", error=str(exc),
                            fallback="executor thread")
                self._fallback = ThreadFsync(self.directory)
        if self._fallback is not None:
            await self._fallback.sync(fd, finished, new_segment)
            return
        step = _FINISHED_PER_REQUEST  # more than a message can carry: several requests
        for start in range(0, max(len(finished), 1), step):
            last = start + step >= len(finished)
            failed = await self._request(fd, finished[start:start + step], new_segment and last)
            if failed:
                raise OSError(failed, f"fdatasync in the fsync process: {os.strerror(failed)}")
        for stale in finished:
            os.close(stale)

    async def _request(self, fd: int, finished: list[int], new_segment: bool) -> int:
        """One request and its reply: the errno of the first failed sync, or 0."""
        assert self._channel is not None and self._loop is not None
        kinds, fds = bytearray(b"o" * len(finished)), list(finished)
        if new_segment or not self._child_has_segment:
            kinds += b"c"
            fds.append(fd)
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY) if new_segment else -1
        if directory >= 0:
            kinds += b"d"
            fds.append(directory)
        self._token += 1
        pending: asyncio.Future[int] = self._loop.create_future()
        self._pending = pending
        try:
            socket.send_fds(self._channel, [REQUEST.pack(self._token) + kinds], fds)
        except OSError:  # the child is gone: said by the reply handler, or now
            self._lost(attempted=False)
        finally:
            if directory >= 0:
                os.close(directory)
        failed = await pending
        self._child_has_segment = True  # the child keeps a `c` even when a sync fails
        return failed

    def _on_reply(self) -> None:
        assert self._channel is not None
        try:
            reply = self._channel.recv(REPLY.size)
        except BlockingIOError:
            return
        except OSError:
            reply = b""
        if len(reply) != REPLY.size:
            self._lost()
            return
        token, failed = REPLY.unpack(reply)
        pending = self._pending
        self._deaths = 0
        if pending is not None and not pending.done() and token == self._token:
            pending.set_result(failed)

    def _lost(self, *, attempted: bool = True) -> None:
        """The child's end closed: reap it, fail the sync in flight; the next one restarts it.

        A child that died with a request in hand may have been inside an fdatasync that
        failed: it shares our open file descriptions (SCM_RIGHTS), so the kernel would
        not report that error to us again. Such a sync counts as failed, not as never
        attempted.
        """
        returncode = self._stop(kill=True)
        self._deaths += 1
        log.error("fsync_process_exited", pid=self.pid, returncode=returncode)
        pending = self._pending
        if pending is not None and not pending.done():
            kind = OSError if attempted else SyncNotAttempted
            pending.set_exception(kind(
                errno.EIO, f"the fsync process {self.pid} exited (returncode {returncode})"))

    def _stop(self, *, kill: bool) -> int | None:
        if self._channel is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._channel.fileno())
            self._channel.close()
            self._channel = None
        process, self._process = self._process, None
        if process is None:
            return None
        if kill:
            process.kill()
        try:
            return process.wait(timeout=5)  # without `kill`: it exits on the closed socket
        except subprocess.TimeoutExpired:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                return process.wait(timeout=5)
            return None

    def close(self) -> None:
        self._stop(kill=False)
