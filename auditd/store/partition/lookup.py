"""Reading one term's postings from a sealed partition: the bucket, then either the
long term's chunks (exact) or the singles and short entries (candidates to recheck)."""

from __future__ import annotations

import sqlite3
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zstandard

from auditd.store.partition.bytestream import read_stream
from auditd.store.partition.layout import array_from, decode_chunk, get_varint, term_key

_bucket_decoder = msgspec.msgpack.Decoder(tuple[bytes, bytes, list[bytes]])
_ss_decompressor = zstandard.ZstdDecompressor()
SELECT_BUCKET = "SELECT data FROM terms WHERE bucket = ?"
SELECT_LONG = ("SELECT text, count, start, chunks, first_ss, ss FROM long_terms "
               "WHERE term = ?")
SELECT_POSTING_ROWS = "SELECT data FROM posting_stream WHERE row BETWEEN ? AND ? ORDER BY row"
Run = Callable[[str, tuple[int, ...]], list[tuple[Any, ...]]]  # SQL, params -> rows


@dataclass
class LongTerm:
    """A term with its value stored: its postings are exact."""

    term_id: int
    count: int
    start: int
    lasts: array[int]  # last offset of each chunk
    ends: array[int]  # end byte of each chunk, from `start`
    first_ss: int | None
    ss: bytes | None
    decoded: dict[int, list[int]] = field(default_factory=dict)

    def _chunk(self, run: Run, index: int) -> list[int]:
        found = self.decoded.get(index)
        if found is None:
            begin = self.start + (self.ends[index - 1] if index else 0)
            found = self.decoded[index] = decode_chunk(
                read_stream(run, SELECT_POSTING_ROWS, begin, self.start + self.ends[index]))
        return found

    def between(self, run: Run, lo: int, hi: int) -> list[int]:
        """Postings in [lo, hi], ascending (a word may repeat an offset)."""
        lasts, out = self.lasts, []
        index = bisect_left(lasts, lo)
        while index < len(lasts) and (index == 0 or lasts[index - 1] < hi):
            postings = self._chunk(run, index)
            out.extend(postings[bisect_left(postings, lo):bisect_right(postings, hi)])
            index += 1
        return out

    def holds(self, run: Run, offsets: list[int]) -> set[int]:
        """Which of the ascending `offsets` are postings: only the chunks they fall in
        are read, so a rare driver costs a dense term a few chunks, not all of them."""
        lasts, found = self.lasts, set()
        index = -1
        postings: list[int] = []
        for offset in offsets:
            if index < 0 or offset > lasts[index]:
                index = bisect_left(lasts, offset)
                if index == len(lasts):
                    break
                postings = self._chunk(run, index)
            at = bisect_left(postings, offset)
            if at < len(postings) and postings[at] == offset:
                found.add(offset)
        return found

    def all(self, run: Run) -> list[int]:
        return self.between(run, 0, self.lasts[-1]) if len(self.lasts) else []

    def stream_seqs(self) -> list[int] | None:
        """The stream_seq of each posting, when they are not consecutive."""
        if self.ss is None:
            return None
        return array_from("q", _ss_decompressor.decompress(self.ss)).tolist()


@dataclass
class TermPostings:
    """One term's postings: `exact` long terms, and `candidates` (sorted offsets of
    singles and short entries sharing the term's bucket and key bits) to recheck."""

    term: str
    exact: list[LongTerm]
    candidates: list[int]

    def estimate(self) -> int:
        return sum(long.count for long in self.exact) + len(self.candidates)


def resolve(run: Run, bits: int, term: str) -> TermPostings:
    key = term_key(term)
    rows = run(SELECT_BUCKET, (key >> (32 - bits),))
    if not rows:
        return TermPostings(term, [], [])
    singles_raw, rems, bodies = _bucket_decoder.decode(rows[0][0])
    rem = key & 0xFF
    candidates = [value & 0xFFFFFF for value in array_from("I", singles_raw)
                  if value >> 24 == rem]
    exact: list[LongTerm] = []
    at = rems.find(rem)
    while at >= 0:
        body = bodies[at]
        if body[0]:
            candidates.extend(decode_chunk(body))
        else:
            term_id = get_varint(body, 1)[0]
            long_rows = run(SELECT_LONG, (term_id,))
            text, count, start, chunks, first_ss, ss = long_rows[0]
            if text == term:
                pairs = array_from("I", chunks)
                exact.append(LongTerm(term_id, count, start, pairs[0::2], pairs[1::2],
                                      first_ss, ss))
        at = rems.find(rem, at + 1)
    return TermPostings(term, exact, sorted(set(candidates)))


def connection_runner(conn: sqlite3.Connection,
                      trace: list[tuple[str, tuple[int, ...]]] | None = None) -> Run:
    """A Run over a connection; with `trace`, every statement is recorded."""
    def run(sql: str, params: tuple[int, ...]) -> list[tuple[Any, ...]]:
        if trace is not None:
            trace.append((sql, params))
        return conn.execute(sql, params).fetchall()
    return run
