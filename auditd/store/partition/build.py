"""Sealing: one pass over a seq range's records into an immutable partition file.

The records stream through: a record is decoded once, its terms join the current
run's postings and its bytes the current block; only the dictionary sample (the first
DICTIONARY_SAMPLE records, before any block can be compressed) and one run's postings
are held. The file is built as `.p<first>-<last>.tmp` with journaling off (a crash
leaves a temp file that the next seal replaces, nothing else), checked with
`quick_check`, fsynced, renamed to `p<first>-<last>.db` and the directory fsynced: a
`p*.db` name exists only for a complete, durable file.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sqlite3
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zstandard

from auditd.errors import AuditdError
from auditd.store.durable import fsync_directory, fsync_path
from auditd.store.partition.assemble import Assembler, bucket_bits
from auditd.store.partition.bytestream import StreamWriter
from auditd.store.partition.collect import RunCollector, StripeFiles
from auditd.store.partition.fields import decode_build_fields
from auditd.store.partition.layout import (
    BLOCK_RECORDS,
    DICTIONARY_BYTES,
    DICTIONARY_SAMPLE,
    FORMAT_VERSION,
    MAX_RECORDS,
    MIN_DICTIONARY_RECORDS,
    PAGE_SIZE,
    RUN_RECORDS,
    SCHEMA,
    ZONE_RECORDS,
    ZSTD_LEVEL,
    array_bytes,
    encode_block,
)
from auditd.store.partition.term_filter import FILTER_META, TermFilter


class PartitionInputError(AuditdError):
    """The records given to seal do not cover the range exactly, in seq order."""


@dataclass(frozen=True)
class SealedInfo:
    path: Path
    first_seq: int
    last_seq: int
    count: int
    bytes: int
    dictionary_id: int  # zstd's id of the partition's dictionary, 0 for none
    format_version: int
    seconds: float  # wall clock
    cpu_seconds: float
    bytes_by_field: dict[str, int] = field(default_factory=dict)  # index payload per field
    filter_bytes: int = 0  # the term filter's bits (what a reader holds in memory)


def partition_name(first_seq: int, last_seq: int) -> str:
    return f"p{first_seq:012d}-{last_seq:012d}.db"


def temp_name(first_seq: int, last_seq: int) -> str:
    return f".p{first_seq:012d}-{last_seq:012d}.tmp"


class _BlockWriter:
    """Records into compressed blocks; blocks wait in memory until the dictionary is
    trained on the first DICTIONARY_SAMPLE records."""

    def __init__(self, conn: sqlite3.Connection, count: int, block_records: int) -> None:
        self.conn, self.block_records = conn, block_records
        self.sample_size = min(count, DICTIONARY_SAMPLE) if count >= MIN_DICTIONARY_RECORDS else 0
        self.waiting: list[list[bytes]] = []
        self.stream = StreamWriter(conn, "record_stream")
        self.starts: list[tuple[int, int]] = []
        self.block = 0
        self.dictionary: zstandard.ZstdCompressionDict | None = None
        self.compress: Callable[[bytes], bytes] | None = None
        if not self.sample_size:
            self.compress = self._compressor(None)

    @staticmethod
    def _compressor(dictionary: zstandard.ZstdCompressionDict | None) -> Callable[[bytes], bytes]:
        return zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, dict_data=dictionary, write_checksum=True,
            write_dict_id=False).compress

    def full(self, block: list[bytes]) -> None:
        """A block of block_records records (the caller fills it: one call per block)."""
        self._full(block)

    def _full(self, block: list[bytes]) -> None:
        if self.compress is None:
            self.waiting.append(block)
            if len(self.waiting) * self.block_records >= self.sample_size:
                self._train([])
            return
        self.starts.append((self.block, self.stream.append(self.compress(encode_block(block)))))
        self.block += 1
        if len(self.starts) >= 1024:
            self.conn.executemany("INSERT INTO blocks VALUES (?, ?)", self.starts)
            self.starts = []

    def _train(self, unfinished: list[bytes]) -> None:
        sample: list[bytes | bytearray | memoryview] = [
            record for block in self.waiting for record in block]
        sample += unfinished
        try:
            self.dictionary = zstandard.train_dictionary(
                DICTIONARY_BYTES, sample[:self.sample_size], k=200, d=8, level=ZSTD_LEVEL)
        except zstandard.ZstdError:  # too few distinct bytes to learn from: go without
            self.dictionary = None
        self.compress = self._compressor(self.dictionary)
        waiting, self.waiting = self.waiting, []
        for block in waiting:
            self._full(block)

    def finish(self, unfinished: list[bytes]) -> None:
        if self.compress is None:
            self._train(unfinished)
        if unfinished:
            self._full(unfinished)
        self.starts.append((self.block, self.stream.position))  # where the last one ends
        self.conn.executemany("INSERT INTO blocks VALUES (?, ?)", self.starts)
        self.starts = []
        self.stream.close()


def seal_partition(records: Iterable[tuple[int, bytes]], directory: Path, first_seq: int,
                   last_seq: int, *, progress: Callable[[int], None] | None = None,
                   block_records: int = BLOCK_RECORDS,
                   run_records: int = RUN_RECORDS) -> SealedInfo:
    """Seal the records (seq, E) of every seq of [first_seq, last_seq], in seq order.

    Raises PartitionInputError on a gap, a record out of order or past the range, or a
    record whose own seq differs; the temp file is then removed. `progress` is called
    with the number of records consumed, every run and at the end. `run_records`
    (a multiple of ZONE_RECORDS, at most RUN_RECORDS) is for tests: small runs make a
    small partition take the paths of a large one.
    """
    if not 0 < run_records <= RUN_RECORDS or run_records % ZONE_RECORDS:
        raise ValueError(f"run_records: a multiple of {ZONE_RECORDS} up to {RUN_RECORDS}")
    if not 1 <= first_seq <= last_seq or last_seq - first_seq >= MAX_RECORDS:
        raise ValueError(f"not a seq range of at most {MAX_RECORDS} seqs: {first_seq}-{last_seq}")
    started, cpu_started = time.perf_counter(), time.process_time()
    # The builder makes no reference cycles, and the collector's millions of live
    # arrays and tuples would make every full collection walk them all.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _seal(records, directory, first_seq, last_seq, progress, block_records,
                     run_records, started, cpu_started)
    finally:
        if collecting:
            gc.enable()


def _seal(records: Iterable[tuple[int, bytes]], directory: Path, first_seq: int,
          last_seq: int, progress: Callable[[int], None] | None, block_records: int,
          run_records: int, started: float, cpu_started: float) -> SealedInfo:
    directory = Path(directory)
    final, temp = directory / partition_name(first_seq, last_seq), directory / temp_name(
        first_seq, last_seq)
    if final.exists():
        raise FileExistsError(f"{final} is sealed already")
    temp.unlink(missing_ok=True)  # an earlier sealer's, killed before its rename
    conn = sqlite3.connect(temp, isolation_level=None)
    stripes = StripeFiles(directory)
    try:
        for pragma in (f"page_size={PAGE_SIZE}", "journal_mode=OFF", "synchronous=OFF",
                       "locking_mode=EXCLUSIVE", "cache_size=-8192"):
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("BEGIN")
        for statement in SCHEMA:
            conn.execute(statement)
        count = last_seq - first_seq + 1
        blocks = _BlockWriter(conn, count, block_records)
        zone_min, zone_max = array("q"), array("q")
        collector, run, expected = RunCollector(), 0, first_seq
        block: list[bytes] = []
        for seq, record in records:
            if seq != expected or seq > last_seq:
                raise PartitionInputError(_out_of_order(seq, expected, first_seq, last_seq))
            try:
                fields = decode_build_fields(record)
            except msgspec.MsgspecError as exc:
                raise PartitionInputError(f"seq {seq}: not a record: {exc}") from None
            if fields.seq != seq:
                raise PartitionInputError(f"the record given as seq {seq} holds seq {fields.seq}")
            offset = seq - first_seq - run * run_records
            collector.add(offset, fields)
            block.append(record)
            if len(block) == block_records:
                blocks.full(block)
                block = []
            expected += 1
            if offset == run_records - 1:
                _end_run(collector, run, stripes, zone_min, zone_max)
                run += 1
                collector.start_run(run * run_records)
                if progress is not None:
                    progress(expected - first_seq)
        if expected != last_seq + 1:
            raise PartitionInputError(
                f"the records ended at seq {expected - 1}, before the range's last {last_seq}")
        if collector.ts:
            _end_run(collector, run, stripes, zone_min, zone_max)
        singles_by_field, filter_keys = collector.singles_by_field, collector.filter_keys
        del collector  # first: the filter's build reuses the memory of its dicts
        term_filter = TermFilter.build(filter_keys)
        del filter_keys
        blocks.finish(block)
        bits = bucket_bits(stripes.entries)
        assembler = Assembler(conn, run_records, bits)
        assembler.write(stripes)
        dictionary = blocks.dictionary
        dictionary_id = 0 if dictionary is None else dictionary.dict_id()
        meta: dict[str, object] = {
            "format_version": FORMAT_VERSION, "first_seq": first_seq, "last_seq": last_seq,
            "count": count, "block_records": block_records, "bucket_bits": bits,
            "zone_records": ZONE_RECORDS, "zone_min_ts": array_bytes(zone_min),
            "zone_max_ts": array_bytes(zone_max), "sealed_at": time.time_ns(),
            "dictionary": None if dictionary is None else dictionary.as_bytes(),
            "dictionary_id": dictionary_id, FILTER_META: term_filter.to_bytes(),
        }
        conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        conn.execute("COMMIT")
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"quick_check of {temp}: {'; '.join(problems)}")
        conn.close()
        fsync_path(temp)
        os.rename(temp, final)
        fsync_directory(directory)
    except BaseException:
        conn.close()
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    finally:
        stripes.close()
    if progress is not None and count % run_records:
        progress(count)  # (a count that ends a run was reported with the run)
    return SealedInfo(
        final, first_seq, last_seq, count, final.stat().st_size, dictionary_id,
        FORMAT_VERSION, time.perf_counter() - started, time.process_time() - cpu_started,
        dict(assembler.bytes_by_field + Counter(
            {letter: 4 * n for letter, n in singles_by_field.items()})),
        term_filter.nbytes)


def _end_run(collector: RunCollector, run: int, stripes: StripeFiles, zone_min: array[int],
             zone_max: array[int]) -> None:
    stripes.write(collector.spill(run))
    ts = collector.ts
    for at in range(0, len(ts), ZONE_RECORDS):
        zone = ts[at:at + ZONE_RECORDS]
        zone_min.append(min(zone))
        zone_max.append(max(zone))


def _out_of_order(seq: int, expected: int, first_seq: int, last_seq: int) -> str:
    if seq > last_seq:
        return f"seq {seq} is past the range {first_seq}-{last_seq}"
    if seq > expected:
        return f"gap: seq {seq} follows seq {expected - 1}; {expected} is missing"
    return f"disorder: seq {seq} after seq {expected - 1}"
