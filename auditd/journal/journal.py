"""Append-only, segmented journal: every accepted event is written here before its reply.

A segment is named by the first seq it may hold (`00000000000000000042.journal`). A
record is a header `magic u16 | length u32 | seq u64 | crc32 u32` and `length` bytes of
payload (the encoded StoredEvent); the CRC covers length, seq and payload. Segments
are only appended to; a new one starts at each daemon start and when the current one
exceeds its size, and a segment is deleted once every event in it is durably committed.

Appends are synchronous write(2) calls on the event loop (page-cache writes); fsyncs
run in a child process (a thread if none can start), one covering every record written
before it (group commit): see journal_sync.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from auditd.errors import JournalError
from auditd.journal.sync import ProcessFsync

log = structlog.get_logger("auditd.journal.journal")

MAGIC = 0xA7E1
HEADER = struct.Struct(">HIQI")
_MAGIC_BYTES = MAGIC.to_bytes(2, "big")
_SUFFIX = ".journal"
MAX_RECORD = 64 * 1024 * 1024


def encode_record(seq: int, payload: bytes) -> bytes:
    length = len(payload)
    crc = zlib.crc32(payload, zlib.crc32(struct.pack(">IQ", length, seq)))
    return HEADER.pack(MAGIC, length, seq, crc) + payload


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class CorruptRange:
    """Bytes that hold no valid record, standing where seqs first..last were written."""

    segment: str
    offset: int
    first_seq: int
    last_seq: int
    raw: bytes


def _record_at(buffer: bytes | mmap.mmap, offset: int) -> Record | None:
    if len(buffer) - offset < HEADER.size:
        return None
    magic, length, seq, crc = HEADER.unpack_from(buffer, offset)
    start = offset + HEADER.size
    if magic != MAGIC or length > MAX_RECORD or start + length > len(buffer):
        return None
    payload = buffer[start : start + length]
    if zlib.crc32(payload, zlib.crc32(buffer[offset + 2 : offset + 14])) != crc:
        return None
    return Record(seq, payload)


def _next_record(buffer: bytes, offset: int) -> int | None:
    """Offset of the next valid record after a damaged one, found by its magic."""
    position = buffer.find(_MAGIC_BYTES, offset + 1)
    while position != -1:
        if _record_at(buffer, position) is not None:
            return position
        position = buffer.find(_MAGIC_BYTES, position + 1)
    return None


def _final_record_seq(buffer: mmap.mmap) -> int | None:
    """Seq of the valid record that ends `buffer`, or None (a torn tail).

    Payloads may hold the magic bytes, even a whole record a client put in `data`, but
    an encoded event ends with fields the daemon sets, so no record inside a payload
    ends where the file does.
    """
    position = len(buffer)
    while position > 0 and len(buffer) - position <= HEADER.size + MAX_RECORD:
        position = buffer.rfind(_MAGIC_BYTES, 0, position)
        if position < 0:
            return None
        record = _record_at(buffer, position)
        if record is not None and position + HEADER.size + len(record.payload) == len(buffer):
            return record.seq
    return None


def _last_header_seq(buffer: mmap.mmap, last: int) -> int:
    """Seq of the last record reached by walking headers from the start (no CRCs)."""
    offset, end, unpack = 0, len(buffer) - HEADER.size, HEADER.unpack_from
    while offset <= end:
        magic, length, seq, _ = unpack(buffer, offset)
        offset += HEADER.size + length
        if magic != MAGIC or length > MAX_RECORD or offset > len(buffer):
            break
        last = seq
    return last


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
        self._sync_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.last_seq = 0
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
        segments = self.segments()
        for number, (first_seq, path) in enumerate(segments):
            buffer = path.read_bytes()
            previous = first_seq - 1
            offset = 0
            while offset < len(buffer):
                record = _record_at(buffer, offset)
                if record is not None:
                    offset += HEADER.size + len(record.payload)
                    previous = record.seq
                    self.last_seq = max(self.last_seq, record.seq)
                    if record.seq > after_seq:
                        yield record
                    continue
                resume = _next_record(buffer, offset)
                following = segments[number + 1][0] if number + 1 < len(segments) else None
                if resume is None and following is not None and following - 1 > previous:
                    # Not a torn tail: the next segment starts later, so these bytes
                    # stood for seqs that were written here.
                    damaged = CorruptRange(path.name, offset, previous + 1, following - 1,
                                           buffer[offset:])
                    log.error("journal_record_corrupt", segment=path.name, offset=offset,
                              bytes=len(buffer) - offset, first_seq=damaged.first_seq,
                              last_seq=damaged.last_seq)
                    if damaged.last_seq > after_seq:
                        yield damaged
                    break
                if resume is None:
                    cut = len(buffer) - offset
                    with path.open("r+b") as handle:
                        handle.truncate(offset)
                        os.fsync(handle.fileno())
                    log.warning("journal_tail_cut", segment=path.name, offset=offset,
                                bytes_cut=cut, last_segment=number == len(segments) - 1)
                    break
                next_seq = HEADER.unpack_from(buffer, resume)[2]
                damaged = CorruptRange(path.name, offset, previous + 1, next_seq - 1,
                                       buffer[offset:resume])
                log.error("journal_record_corrupt", segment=path.name, offset=offset,
                          bytes=resume - offset, first_seq=damaged.first_seq,
                          last_seq=damaged.last_seq)
                if damaged.last_seq > after_seq and damaged.last_seq >= damaged.first_seq:
                    yield damaged
                offset = resume
            self.last_seq = max(self.last_seq, first_seq - 1)

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
        with path.open("rb") as handle:
            if os.fstat(handle.fileno()).st_size < HEADER.size:
                return first_seq - 1
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                last = _final_record_seq(buffer)
                return _last_header_seq(buffer, first_seq - 1) if last is None else last

    # -- writing ---------------------------------------------------------------
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
        no partial record is left behind, and JournalError is raised.
        """
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

    def wait_synced(self, position: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if position <= self.synced:
            future.set_result(None)
        else:
            self._sync_waiters.append((position, future))
        return future

    async def sync_forever(self) -> None:
        """Group commit: one fdatasync covers every record written before it started."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            target, fd, finished = self.written, self._fd, self._unsynced_fds
            new_entry, self._unsynced_fds, self._new_entry = self._new_entry, [], False
            try:
                await self._fsync.sync(fd, finished, new_entry)
            except BaseException as exc:
                # Not durable, or not known to be: kept for the retry, or for close().
                self._unsynced_fds[:0] = finished
                self._new_entry = self._new_entry or new_entry
                if not isinstance(exc, OSError):
                    raise
                log.error("journal_fsync_failed", error=str(exc))
                self._dirty.set()
                await asyncio.sleep(0.1)
                continue
            self.synced = target
            waiters, self._sync_waiters = self._sync_waiters, []
            for position, future in waiters:
                if position <= target:
                    if not future.done():
                        future.set_result(None)
                else:
                    self._sync_waiters.append((position, future))

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
        for fd in [*self._unsynced_fds, self._fd]:
            if fd >= 0:
                if self.fsync:
                    os.fdatasync(fd)
                os.close(fd)
        self._fd, self._unsynced_fds = -1, []
        self._fsync.close()
