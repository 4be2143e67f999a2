"""Append-only, segmented journal: every accepted event is written here before its reply.

A segment is named by the first seq it may hold (`00000000000000000042.journal`) and
holds records (journal.records: their format, and replay). Segments are only appended
to; a new one starts at each daemon start and when the current one exceeds its size,
and a segment is deleted once every event in it is durably committed.

Appends are synchronous write(2) calls on the event loop (page-cache writes); fsyncs
run in a child process (a thread if none can start), one covering every record written
before it (group commit): see journal.sync.

A failed fsync is never retried on the same file (PostgreSQL's "fsyncgate": after an
fdatasync reported EIO, the kernel may have dropped the dirty pages, and a later
fdatasync of that file that succeeds proves nothing). The records it covered are then
durable only once the database has them on disk: their waiters are held until
`database_durable` passes their seq. The journal is faulted (`fault`) and takes no
appends until a sync of a segment created after the failure succeeds: Linux reports
writeback errors per file (errseq_t), so a new file that was never part of the failed
writeback, synced with its directory entry, is a proof the old one cannot give.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from auditd.errors import JournalError
from auditd.journal.records import (
    CorruptRange,
    Record,
    encode_record,
    last_seq_in_segment,
    read_segments,
)
from auditd.journal.sync import ProcessFsync, SyncNotAttempted

__all__ = ["CorruptRange", "Journal", "Record", "encode_record"]

log = structlog.get_logger("auditd.journal.journal")

_SUFFIX = ".journal"
# After a failed sync, a fresh segment is synced to prove the journal again: first after
# this long, then twice as long each time it fails, up to the cap.
_VERIFY_FIRST_S = 0.1
_VERIFY_MAX_S = 2.0


class Journal:
    def __init__(self, directory: Path, segment_bytes: int, *, fsync: bool) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._fd = -1
        self._segment: Path | None = None
        self._segment_size = 0
        self.written = 0  # bytes appended since start, across segments
        self.synced = 0  # of those, bytes covered by a completed fsync
        self._unsynced_fds: list[int] = []
        self._new_entry = False
        self._dirty = asyncio.Event()
        # (position, seq, future): resolved once a sync covers `position`
        self._sync_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        # (seq, future): covered by a failed sync; resolved once the database has `seq`
        # on disk (database_durable)
        self._held: list[tuple[int, asyncio.Future[None]]] = []
        self._durable_seq = 0  # the database holds every seq through this on disk
        self._synced_seq = 0  # the last seq covered by a completed sync
        self.last_seq = 0
        self.fault: str | None = None  # why the journal's syncs cannot be trusted now
        self.on_fault: Callable[[str | None], None] | None = None  # told when `fault` changes
        self._fsync = ProcessFsync(directory)

    # -- reading ---------------------------------------------------------------

    def segments(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.directory.glob(f"*{_SUFFIX}"):
            try:
                found.append((int(path.name[: -len(_SUFFIX)]), path))
            except ValueError:
                continue
        return sorted(found)

    def replay(self, after_seq: int) -> Iterator[Record | CorruptRange]:
        """Records with seq > after_seq, in order; damage is reported, never skipped.

        A damaged tail (no valid record after it) is cut from the file and logged. A
        damaged stretch followed by valid records is yielded as a CorruptRange naming
        the seqs it stood for, so the caller can dead-letter them.
        """
        def seen(seq: int) -> None:
            self.last_seq = max(self.last_seq, seq)

        return read_segments(self.segments(), after_seq, seen)

    def last_seq_on_disk(self) -> int:
        """The highest seq the segments hold, to size a replay before it starts.

        Earlier segments end where the next one begins, so only the last segment is
        read, from its end: the record whose CRC holds and which ends the file. A torn
        tail has none; then its headers are walked from the start, up to the first one
        that does not parse (an underestimate when damage stops it early). Reads a whole
        segment at worst: call it from a thread.
        """
        segments = self.segments()
        if not segments:
            return 0
        first_seq, path = segments[-1]
        return last_seq_in_segment(path, first_seq)

    # -- writing ---------------------------------------------------------------

    def open_segment(self, first_seq: int) -> None:
        """Start a new segment for records from first_seq on."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{first_seq:020d}{_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        if self._fd >= 0:
            if self.fsync:
                self._unsynced_fds.append(self._fd)
            else:
                os.close(self._fd)
        self._fd, self._segment, self._segment_size = fd, path, os.fstat(fd).st_size
        if self.fsync:
            self._new_entry = True  # the directory entry needs its own fsync, once
            self._dirty.set()

    def append(self, data: bytes, first_seq: int, last_seq: int) -> int:
        """Write records; return the journal position a sync must reach to cover them.

        On failure (disk full, I/O error) the segment is cut back to where it was, so
        no partial record is left behind, and JournalError is raised; while the journal
        is faulted by a failed sync, JournalError at once.
        """
        if self.fault is not None:
            raise JournalError(self.fault)
        if self._segment_size >= self.segment_bytes:
            self.open_segment(first_seq)
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            try:
                os.ftruncate(self._fd, self._segment_size)
            except OSError:
                log.critical("journal_truncate_failed", segment=str(self._segment))
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise JournalError(f"journal write to {self._segment} failed: {reason}") from exc
        self._segment_size += written
        self.written += written
        self.last_seq = last_seq
        if self.fsync:
            self._dirty.set()
        return self.written

    def wait_synced(self, position: int, seq: int | None = None) -> asyncio.Future[None]:
        """Resolved once a sync covers `position`, or, when the sync covering it failed,
        once the database holds `seq` (default: the last seq appended) on disk."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        seq = self.last_seq if seq is None else seq
        if position <= self.synced:
            future.set_result(None)
        elif self.fault is not None:
            self._hold(seq, future)
        else:
            self._sync_waiters.append((position, seq, future))
        return future

    def database_durable(self, seq: int) -> None:
        """The database holds every seq through `seq` on disk (a WAL checkpoint that
        began after their commit completed): release the replies held for them."""
        if seq <= self._durable_seq:
            return
        self._durable_seq = seq
        if self._held:
            held, self._held = self._held, []
            for waited, future in held:
                if waited <= seq:
                    if not future.done():
                        future.set_result(None)
                else:
                    self._held.append((waited, future))

    def _hold(self, seq: int, future: asyncio.Future[None]) -> None:
        if seq <= self._durable_seq:
            future.set_result(None)
        else:
            self._held.append((seq, future))

    async def sync_forever(self) -> None:
        """Group commit: one fdatasync covers every record written before it started.

        A failed sync is not retried: see the module docstring and _sync_failed.
        Cancellation: the files of a sync in flight stay listed for close().
        """
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            target, target_seq, segment = self.written, self.last_seq, self._segment
            fd, finished = self._fd, self._unsynced_fds
            new_entry, self._unsynced_fds, self._new_entry = self._new_entry, [], False
            try:
                await self._fsync.sync(fd, finished, new_entry)
            except BaseException as exc:
                # Not durable, or not known to be: kept for close(), or for the retry.
                self._unsynced_fds[:0] = finished
                self._new_entry = self._new_entry or new_entry
                if not isinstance(exc, OSError):
                    raise
                if isinstance(exc, SyncNotAttempted):  # nothing was synced: a real retry
                    self._dirty.set()
                    await asyncio.sleep(0.01)
                    continue
                self._sync_failed(exc, segment)
                await self._verify_fresh_segment()
                continue
            self._synced(target, target_seq)

    def _synced(self, target: int, target_seq: int) -> None:
        self.synced, self._synced_seq = target, target_seq
        waiters, self._sync_waiters = self._sync_waiters, []
        for position, seq, future in waiters:
            if position <= target:
                if not future.done():
                    future.set_result(None)
            else:
                self._sync_waiters.append((position, seq, future))

    def _sync_failed(self, exc: OSError, segment: Path | None) -> None:
        """Every record past the last good sync is suspect: hold its replies for the
        database, drop the files (never synced again), fault the journal."""
        first, last = self._synced_seq + 1, self.last_seq
        for _, seq, future in self._sync_waiters:
            self._hold(seq, future)
        self._sync_waiters = []
        for stale in self._unsynced_fds:
            _close_quietly(stale)
        self._unsynced_fds, self._new_entry = [], False
        self._abandon_segment()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        name = segment.name if segment is not None else "?"
        log.error("journal_sync_failed", errno=exc.errno, error=str(exc), segment=name,
                  first_seq=first, last_seq=last, held_replies=len(self._held),
                  action="replies wait for the database; no appends until a new "
                         "segment syncs")
        self._set_fault(
            f"journal fdatasync of {name} failed ({reason}); seqs {first}..{last} are "
            f"acknowledged only once the database has them on disk, and ingest refuses "
            f"until a new journal segment syncs")

    def _abandon_segment(self) -> None:
        """Close the segment being written; unlink it when it holds no record (its name is
        the next one's, and a new file must be a new inode)."""
        if self._fd >= 0:
            _close_quietly(self._fd)
        if self._segment is not None and self._segment_size == 0:
            self._segment.unlink(missing_ok=True)
        self._fd, self._segment, self._segment_size = -1, None, 0

    async def _verify_fresh_segment(self) -> None:
        """Until one succeeds: create a new segment and sync it with its directory entry.

        Failed attempts are not logged (the fault is, once); the recovery is.
        """
        delay, attempts = _VERIFY_FIRST_S, 0
        while True:
            await asyncio.sleep(delay)
            attempts += 1
            try:
                self._abandon_segment()
                self.open_segment(self.last_seq + 1)
                self._new_entry = False
                await self._fsync.sync(self._fd, [], True)
            except SyncNotAttempted:
                continue
            except OSError:
                delay = min(delay * 2, _VERIFY_MAX_S)
                continue
            break
        self._synced(self.written, self.last_seq)
        log.info("journal_sync_recovered", segment=self._segment.name if self._segment
                 else None, attempts=attempts, held_replies=len(self._held))
        self._set_fault(None)

    def _set_fault(self, reason: str | None) -> None:
        self.fault = reason
        if self.on_fault is not None:
            self.on_fault(reason)

    def release_through(self, seq: int) -> int:
        """Delete segments whose every record has seq <= `seq`; never the open one."""
        removed = 0
        segments = self.segments()
        for (_, path), (next_first, _) in itertools.pairwise(segments):
            if next_first - 1 <= seq and path != self._segment:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for _, path in self.segments())

    def close(self) -> None:
        """Sync (fsync mode) and close every file; a failure is logged, and the rest are
        still closed."""
        for fd in [*self._unsynced_fds, self._fd]:
            if fd < 0:
                continue
            try:
                if self.fsync and self.fault is None:
                    os.fdatasync(fd)
            except OSError as exc:
                log.error("journal_close_sync_failed", errno=exc.errno, error=str(exc))
            finally:
                _close_quietly(fd)
        self._fd, self._unsynced_fds = -1, []
        self._fsync.close()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:  # a failed close is one more unsynced write: say so
        log.error("journal_close_failed", errno=exc.errno, error=str(exc))
