"""Turning the spilled runs into the `terms`, `long_terms` and `posting_stream` tables.

Stripes are read in key order and each one's terms are grouped and sorted, so every
table is written in its key order, once: b-tree pages fill one after the other, as
CREATE INDEX fills an index, with no page split and no random write.
"""

from __future__ import annotations

import math
import sqlite3
from array import array
from bisect import bisect_left
from collections import Counter
from operator import itemgetter
from typing import Any

import msgspec
import zstandard

from auditd.store.partition.bytestream import StreamWriter
from auditd.store.partition.collect import GroupedTerm, StripeFiles
from auditd.store.partition.layout import (
    BUCKET_ENTRIES,
    CHUNK_POSTINGS,
    DEAD_LETTER,
    LONG_POSTINGS,
    STREAM,
    STRIPE_BITS,
    array_bytes,
    array_from,
    encode_chunk,
    encode_run_chunk,
    put_varint,
)

SMALL_PIECE = 256  # a run's postings of a term below this are merged with other runs'


_bucket_encoder = msgspec.msgpack.Encoder()
_ss_compressor = zstandard.ZstdCompressor(level=3)


def bucket_bits(entries: int) -> int:
    """Buckets of ~BUCKET_ENTRIES entries: the spilled count bounds the distinct one."""
    wanted = math.ceil(math.log2(max(1, entries) / BUCKET_ENTRIES + 1))
    return max(STRIPE_BITS, min(24, wanted))


class Assembler:
    """Writes the term tables. `bytes_by_field` is the payload each field's grouped
    terms take (singles are counted by the collector: 4 bytes each)."""

    def __init__(self, conn: sqlite3.Connection, run_records: int, bits: int) -> None:
        self.conn = conn
        self.run_records = run_records
        self.bits = bits
        self.next_term = 0
        self.postings = StreamWriter(conn, "posting_stream")
        self.bytes_by_field: Counter[str] = Counter()
        self.long_terms = 0

    def write(self, stripes: StripeFiles) -> None:
        for stripe in range(1 << STRIPE_BITS):
            singles, grouped = stripes.read(stripe)
            self._write_stripe(singles, grouped)
        self.postings.close()

    def _write_stripe(self, singles: list[int], grouped: list[GroupedTerm]) -> None:
        groups: dict[str, list[GroupedTerm]] = {}
        for entry in grouped:
            parts = groups.get(entry[1])
            if parts is None:
                groups[entry[1]] = [entry]
            else:
                parts.append(entry)
        del grouped
        long_rows: list[tuple[Any, ...]] = []
        entries = [(parts[0][0], self._term_body(term, parts, long_rows))
                   for term, parts in groups.items()]
        entries.sort(key=itemgetter(0))  # stable: equal keys stay in spill order
        del groups
        single_shift, entry_shift = 56 - self.bits, 32 - self.bits
        rows: list[tuple[int, bytes]] = []
        i = j = 0
        none = 1 << 32
        while i < len(singles) or j < len(entries):
            bucket = min(singles[i] >> single_shift if i < len(singles) else none,
                         entries[j][0] >> entry_shift if j < len(entries) else none)
            end = bisect_left(singles, (bucket + 1) << single_shift, i)
            # The low 32 bits of each single (rem << 24 | offset): the even 32-bit halves.
            values = array_from("I", array_bytes(array("Q", singles[i:end])))[0::2]
            rems, bodies = bytearray(), []
            while j < len(entries) and entries[j][0] >> entry_shift == bucket:
                rems.append(entries[j][0] & 0xFF)
                bodies.append(entries[j][1])
                j += 1
            rows.append((bucket, _bucket_encoder.encode(
                (array_bytes(values), bytes(rems), bodies))))
            i = end
        self.conn.executemany("INSERT INTO terms VALUES (?, ?)", rows)
        self.conn.executemany("INSERT INTO long_terms VALUES (?, ?, ?, ?, ?, ?, ?)", long_rows)

    def _term_body(self, term: str, parts: list[GroupedTerm],
                   long_rows: list[tuple[Any, ...]]) -> bytes:
        """A short term's postings as a chunk, or a long term's id (after a 0 byte)."""
        run_records = self.run_records
        count = (len(parts[0][3]) if len(parts) == 1 else sum(len(p[3]) for p in parts)) // 2
        if count <= LONG_POSTINGS and term != DEAD_LETTER:  # dead letters: always exact
            if len(parts) == 1:
                body = encode_run_chunk(parts[0][3], parts[0][2] * run_records)
            else:
                body = encode_chunk([part[2] * run_records + offset for part in parts
                                     for offset in array_from("H", part[3])])
            self.bytes_by_field[term[0]] += len(body) + 3
            return body
        start = self.postings.position
        chunks = array("I")
        pending: list[int] = []

        def emit(chunk: bytes, last: int) -> None:
            self.postings.append(chunk)
            chunks.append(last)
            chunks.append(self.postings.position - start)

        for _, _, run, raw, _ in parts:
            base = run * run_records
            if len(raw) >= 2 * SMALL_PIECE:  # a dense piece: deltas at C speed
                if pending:
                    emit(encode_chunk(pending), pending[-1])
                    pending = []
                for at in range(0, len(raw), 2 * CHUNK_POSTINGS):
                    piece = raw[at:at + 2 * CHUNK_POSTINGS]
                    emit(encode_run_chunk(piece, base),
                         base + int.from_bytes(piece[-2:], "little"))
            else:
                pending.extend([base + offset for offset in array_from("H", raw)])
                if len(pending) >= CHUNK_POSTINGS:
                    emit(encode_chunk(pending[:CHUNK_POSTINGS]), pending[CHUNK_POSTINGS - 1])
                    pending = pending[CHUNK_POSTINGS:]
        if pending:
            emit(encode_chunk(pending), pending[-1])
        first_ss, ss = _stream_seqs(term, parts, count)
        term_id = self.next_term
        self.next_term += 1
        long_rows.append((term_id, term, count, start, array_bytes(chunks), first_ss, ss))
        self.bytes_by_field[term[0]] += (self.postings.position - start + len(term)
                                         + 4 * len(chunks) + 16)
        pointer = bytearray(1)
        put_varint(pointer, term_id)
        return bytes(pointer)


def _stream_seqs(term: str, parts: list[GroupedTerm],
                 count: int) -> tuple[int | None, bytes | None]:
    """A long stream's first stream_seq, and all of them when not consecutive."""
    if term[0] != STREAM:
        return None, None
    stream_seqs = array("q")
    for part in parts:
        stream_seqs.extend(array_from("q", part[4] or b""))
    first = stream_seqs[0]
    if stream_seqs == array("q", range(first, first + count)):
        return first, None
    return first, _ss_compressor.compress(array_bytes(stream_seqs))
