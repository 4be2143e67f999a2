"""The journal's record format, and reading segments back (replay at start).

A record is a header `magic u16 | length u32 | seq u64 | crc32 u32` and `length` bytes of
payload (the encoded StoredEvent); the CRC covers length, seq and payload.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("auditd.journal.journal")

MAGIC = 0xA7E1
HEADER = struct.Struct(">HIQI")
_MAGIC_BYTES = MAGIC.to_bytes(2, "big")
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


def read_segments(segments: list[tuple[int, Path]], after_seq: int,
                  seen: Callable[[int], None]) -> Iterator[Record | CorruptRange]:
    """Records of `segments` (first seq, path; in order) with seq > after_seq, in order;
    damage is reported, never skipped. `seen` is told every seq the segments account
    for, those at or below after_seq too.

    A damaged tail (no valid record after it) is cut from the file and logged. A
    damaged stretch followed by valid records is yielded as a CorruptRange naming
    the seqs it stood for, so the caller can dead-letter them.
    """
    for number, (first_seq, path) in enumerate(segments):
        buffer = path.read_bytes()
        previous = first_seq - 1
        offset = 0
        while offset < len(buffer):
            record = _record_at(buffer, offset)
            if record is not None:
                offset += HEADER.size + len(record.payload)
                previous = record.seq
                seen(record.seq)
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
        seen(first_seq - 1)


def last_seq_in_segment(path: Path, first_seq: int) -> int:
    """The highest seq a segment holds, read from its end: the record whose CRC holds and
    which ends the file; for a torn tail, the last header reached walking from the start
    (an underestimate when damage stops it early). Reads the whole file at worst."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size < HEADER.size:
            return first_seq - 1
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            last = _final_record_seq(buffer)
            return _last_header_seq(buffer, first_seq - 1) if last is None else last


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
