"""Reading a sealed partition: records by seq, the id lookup, streams, filter queries.

The file is opened read-only and `immutable=1`: SQLite takes no lock and never looks
for a journal, which is right for a file nobody writes after its rename, and makes an
open cost one small read of `meta`. The dictionary and the zone map are read on first
use. Not thread-safe: one SealedPartition per thread (they are cheap).
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import zstandard

from auditd.errors import AuditdError
from auditd.store.partition import query as queries
from auditd.store.partition.bytestream import read_stream
from auditd.store.partition.fields import IndexedFields, decode_fields
from auditd.store.partition.layout import (
    DEAD_LETTER,
    FORMAT_VERSION,
    ID,
    STREAM,
    array_from,
    decode_block,
)
from auditd.store.partition.lookup import Run, TermPostings, connection_runner, resolve
from auditd.store.partition.term_filter import FILTER_META, TermFilter

SELECT_RECORD_ROWS = "SELECT data FROM record_stream WHERE row BETWEEN ? AND ? ORDER BY row"
SELECT_BLOCK_STARTS = "SELECT start FROM blocks WHERE block BETWEEN ? AND ? ORDER BY block"
_CACHED_BLOCKS = 16
_MMAP_BYTES = 1 << 30


class PartitionFormatError(AuditdError):
    """The file is not a sealed partition this version can read."""


class SealedPartition:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no sealed partition at {self.path}")
        self.conn = sqlite3.connect(f"file:{quote(str(self.path.resolve()))}?mode=ro&immutable=1",
                                    uri=True)
        try:
            self.conn.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
            meta = dict(self.conn.execute(
                "SELECT key, value FROM meta WHERE key NOT IN "
                "('dictionary', 'zone_min_ts', 'zone_max_ts', ?)", (FILTER_META,)).fetchall())
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise PartitionFormatError(f"{path}: not a sealed partition: {exc}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            self.conn.close()
            raise PartitionFormatError(
                f"{path}: format version {meta.get('format_version')!r}, this reader knows "
                f"{FORMAT_VERSION}")
        self.meta: dict[str, Any] = meta
        self.first_seq: int = meta["first_seq"]
        self.last_seq: int = meta["last_seq"]
        self.count: int = meta["count"]
        self.block_records: int = meta["block_records"]
        self.bits: int = meta["bucket_bits"]
        self.dictionary_id: int = meta["dictionary_id"]
        self.run: Run = connection_runner(self.conn)
        self._decompressor: zstandard.ZstdDecompressor | None = None
        self._blocks: OrderedDict[int, list[bytes]] = OrderedDict()
        self.cached_blocks = _CACHED_BLOCKS  # decoded blocks kept (a reader may keep more)
        self._zones: queries.Zones | None = None
        self._dead: set[int] | None = None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> SealedPartition:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    # --- records ---------------------------------------------------------------------

    def _meta_blob(self, key: str) -> bytes | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def _decompress(self, frame: bytes) -> bytes:
        if self._decompressor is None:
            dictionary = self._meta_blob("dictionary")
            self._decompressor = zstandard.ZstdDecompressor(
                dict_data=None if dictionary is None else zstandard.ZstdCompressionDict(
                    dictionary))
        return self._decompressor.decompress(frame)

    def block(self, block: int) -> list[bytes]:
        """The records of one block (the last few decoded are kept)."""
        cached = self._blocks.get(block)
        if cached is not None:
            self._blocks.move_to_end(block)
            return cached
        starts = self.run(SELECT_BLOCK_STARTS, (block, block + 1))
        if len(starts) != 2:
            raise ValueError(f"block {block} is not in {self.path.name}")
        raw = self._decompress(read_stream(self.run, SELECT_RECORD_ROWS, starts[0][0],
                                           starts[1][0]))
        first = block * self.block_records
        records = decode_block(raw, min(self.block_records, self.count - first))
        self._blocks[block] = records
        if len(self._blocks) > self.cached_blocks:
            self._blocks.popitem(last=False)
        return records

    def drop_blocks(self, keep: int) -> None:
        """Keep only the `keep` blocks decoded last."""
        while len(self._blocks) > keep:
            self._blocks.popitem(last=False)

    def record(self, seq: int) -> bytes | None:
        """The record E of a seq, None when the seq is not in this partition."""
        if not self.first_seq <= seq <= self.last_seq:
            return None
        offset = seq - self.first_seq
        return self.block(offset // self.block_records)[offset % self.block_records]

    def records(self, seqs: Sequence[int]) -> list[bytes]:
        """The records of seqs in this partition, in the order given; each block is
        decompressed once. KeyError for a seq outside the partition."""
        out = []
        for seq in seqs:
            record = self.record(seq)
            if record is None:
                raise KeyError(f"seq {seq} is not in {self.path.name}")
            out.append(record)
        return out

    def fields_at(self, offset: int) -> IndexedFields:
        return decode_fields(self.block(offset // self.block_records)[
            offset % self.block_records])

    # --- lookups ---------------------------------------------------------------------

    def lookup_id(self, event_id: str) -> int | None:
        """The seq of the event with this id, None when it is not in this partition."""
        postings = resolve(self.run, self.bits, ID + event_id)
        for offset in postings.candidates:
            if self.fields_at(offset).id == event_id:
                return self.first_seq + offset
        return None

    def _stream(self, stream: str) -> list[tuple[int, int]]:
        """(stream_seq, offset) of every event of a stream here, by stream_seq."""
        postings = resolve(self.run, self.bits, STREAM + stream)
        pairs: list[tuple[int, int]] = []
        for long in postings.exact:
            offsets = long.all(self.run)
            explicit = long.stream_seqs()
            first = long.first_ss or 0
            pairs.extend(zip(explicit or range(first, first + len(offsets)), offsets,
                             strict=True))
        for offset in postings.candidates:
            fields = self.fields_at(offset)
            if fields.stream == stream and fields.stream_seq is not None:
                pairs.append((fields.stream_seq, offset))
        return sorted(pairs)

    def stream_last(self, stream: str) -> tuple[int, int] | None:
        """(highest stream_seq, its seq) of a stream in this partition."""
        if not (postings := resolve(self.run, self.bits, STREAM + stream)).exact:
            pairs = self._stream(stream) if postings.candidates else []
            return (pairs[-1][0], self.first_seq + pairs[-1][1]) if pairs else None
        long = postings.exact[0]  # one value, one long term: the candidates are others'
        explicit = long.stream_seqs()
        last_ss = explicit[-1] if explicit else (long.first_ss or 0) + long.count - 1
        return last_ss, self.first_seq + long.lasts[-1]

    def stream_range(self, stream: str, from_stream_seq: int,
                     to_stream_seq: int) -> list[tuple[int, int]]:
        """(stream_seq, seq) of the stream's events with from <= stream_seq <= to."""
        return [(ss, self.first_seq + offset) for ss, offset in self._stream(stream)
                if from_stream_seq <= ss <= to_stream_seq]

    # --- queries ---------------------------------------------------------------------

    def zones(self) -> queries.Zones:
        """The ts zone map (read and prepared on first use)."""
        if self._zones is None:
            self._zones = queries.Zones(array_from("q", self._meta_blob("zone_min_ts") or b""),
                                        array_from("q", self._meta_blob("zone_max_ts") or b""))
        return self._zones

    def term_filter(self) -> TermFilter | None:
        """The filter of the terms here (read on each call: a reader keeps its own);
        None for a file sealed before partitions had one. ValueError when damaged."""
        blob = self._meta_blob(FILTER_META)
        return None if blob is None else TermFilter.from_bytes(blob)

    def dead_offsets(self) -> set[int]:
        if self._dead is None:
            postings = resolve(self.run, self.bits, DEAD_LETTER)
            self._dead = {x for long in postings.exact for x in long.all(self.run)}
        return self._dead

    def dead_letters(self) -> list[int]:
        """The seqs here that dead letters hold."""
        return sorted(self.first_seq + offset for offset in self.dead_offsets())

    def query(self, filters: Mapping[str, Sequence[str]], *, since_ns: int | None = None,
              until_ns: int | None = None, after_seq: int | None = None,
              before_seq: int | None = None, limit: int,
              descending: bool = True) -> list[int]:
        """Seqs of the events matching every filter (a filter's values: any of them; `q`:
        every word; `tag`: "KEY=VALUE"), with since_ns <= ts < until_ns and
        after_seq < seq < before_seq, newest first unless `descending` is False.
        Filters: type, actor, target, stream, correlation_id, causation_id, uid, comm,
        tag, q. Dead letters never match."""
        lo = 0 if after_seq is None else max(0, after_seq + 1 - self.first_seq)
        hi = self.count - 1 if before_seq is None else min(
            self.count - 1, before_seq - 1 - self.first_seq)
        offsets = queries.execute(self, filters, lo=lo, hi=hi, since_ns=since_ns,
                                  until_ns=until_ns, limit=limit, descending=descending)
        return [self.first_seq + offset for offset in offsets]

    def explain(self, filters: Mapping[str, Sequence[str]], **options: Any) -> list[str]:
        """EXPLAIN QUERY PLAN of each distinct SQL statement the query runs."""
        trace: list[tuple[str, tuple[int, ...]]] = []
        run, self.run = self.run, connection_runner(self.conn, trace)
        blocks, self._blocks = self._blocks, OrderedDict()
        dead, self._dead = self._dead, None
        try:
            self.query(filters, **options)
        finally:
            self.run, self._blocks, self._dead = run, blocks, dead
        plans = []
        for sql, params in dict(trace).items():
            rows = self.conn.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
            plans.append(sql + "\n" + "\n".join(f"  {row[-1]}" for row in rows))
        return plans

    def terms(self, term: str) -> TermPostings:
        """One term's postings (for check() and tests)."""
        return resolve(self.run, self.bits, term)

    def check(self) -> list[str]:
        """Problems found in the file (see checks.check_partition); empty when none."""
        from auditd.store.partition.checks import check_partition  # it imports this module

        return check_partition(self)
