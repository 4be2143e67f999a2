"""Each seq's record E as stored, from one read snapshot: sealed partitions (E held
verbatim) for seqs at or below `sealed_through`, the hot table (E rebuilt from the row,
store.records) above it. A dead letter's seq gives its first letter's record, as the
sealer does (sealing.child).

The caller owns the transaction: open a read (BEGIN) on `db` before building a
RecordSource so the catalog, the hot rows and the dead letters are one snapshot.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from auditd.schema import StoredEvent
from auditd.store.partition.read import SealedPartition
from auditd.store.records import merged_records, record_bytes

# Names are ids here, resolved through RecordSource's cache: the five joins on `names`
# cost more than the rest of a row's record together.
_EVENTS = """SELECT seq, id, ts, received_at, type, actor, target, stream, stream_seq,
    correlation_id, causation_id, tags, data, pid, uid, gid, comm, id_hash
    FROM events WHERE seq BETWEEN ? AND ? ORDER BY seq"""
_NAMES = "SELECT id, value FROM names WHERE id IN (SELECT value FROM json_each(?))"
_DEAD = """SELECT seq, code, reason, raw FROM dead_letters
    WHERE seq BETWEEN ? AND ? ORDER BY seq, dlq_id"""
_CHUNK = 4096


class RecordSource:
    """Records by seq from the hot table and the catalogued partitions of `db`."""

    def __init__(self, db: sqlite3.Connection, partitions_dir: Path) -> None:
        self.db = db
        self.partitions_dir = partitions_dir
        row = db.execute("SELECT value FROM meta WHERE key = 'sealed_through'").fetchone()
        self.sealed_through = 0 if row is None else int(row[0])
        self.catalog: list[tuple[int, int, str]] = [
            (int(a), int(b), str(f)) for a, b, f in db.execute(
                "SELECT first_seq, last_seq, file FROM partitions ORDER BY first_seq")]
        self._open: dict[str, SealedPartition] = {}
        # Seqs of a partition that could not be read (a damaged file), and why: they
        # are left out of records(), so the caller sees them as gaps it can name.
        self.unreadable: dict[int, str] = {}
        self.names: dict[int, str] = {}

    def close(self) -> None:
        for part in self._open.values():
            part.close()
        self._open.clear()

    def partition(self, file: str) -> SealedPartition:
        part = self._open.get(file)
        if part is None:
            part = self._open[file] = SealedPartition(self.partitions_dir / file)
        return part

    def records(self, first: int, last: int) -> Iterator[tuple[int, bytes]]:
        """(seq, E) for each stored seq in [first, last], in seq order; seqs with no
        record are absent (the caller sees the gap)."""
        for lo, hi, file in self.catalog:
            if hi < first or lo > last:
                continue
            try:
                part = self.partition(file)
            except Exception as exc:  # any failure to open is the file's damage
                for seq in range(max(lo, first), min(hi, last) + 1):
                    self.unreadable[seq] = f"partition {file}: {exc}"
                continue
            yield from self._sealed(part, file, max(lo, first), min(hi, last))
        start = max(first, self.sealed_through + 1)
        # (hot rows at or below sealed_through wait for their release: not read)
        for lo in range(start, last + 1, _CHUNK):
            yield from hot_records(self.db, lo, min(last, lo + _CHUNK - 1), self.names)


    def _sealed(self, part: SealedPartition, file: str, first: int,
                last: int) -> Iterator[tuple[int, bytes]]:
        """A partition's records block by block (one decompression each)."""
        width = part.block_records
        seq = first
        while seq <= last:
            offset = seq - part.first_seq
            block, at = divmod(offset, width)
            stop = min(last, seq + width - at - 1)
            try:
                records = part.block(block)
            except Exception as exc:  # a damaged block: zstd, SQLite or format
                for gone in range(seq, stop + 1):
                    self.unreadable[gone] = f"partition {file}: {type(exc).__name__}: {exc}"
                seq = stop + 1
                continue
            for index in range(at, at + stop - seq + 1):
                if index < len(records):
                    yield seq + index - at, records[index]
            seq = stop + 1


def hot_records(db: sqlite3.Connection, first: int, last: int,
                names: dict[int, str] | None = None) -> Iterator[tuple[int, bytes]]:
    """(seq, E) of the hot table's events and the seqs' dead letters, merged by seq;
    `names` caches the names table's ids across calls."""
    names = {} if names is None else names
    events = db.execute(_EVENTS, (first, last)).fetchall()
    wanted = {i for row in events for i in (row[4], row[5], row[6], row[7], row[16])
              if i is not None and i not in names}
    if wanted:
        names.update(db.execute(_NAMES, (json.dumps(list(wanted)),)).fetchall())
    dead = db.execute(_DEAD, (first, last)).fetchall()
    get = names.get

    def record_of(row: Sequence[Any]) -> bytes:
        actor, target, stream = row[5], row[6], row[7]
        return record_bytes(StoredEvent(
            row[0], row[1], row[2], row[3], names[row[4]],
            None if actor is None else get(actor), None if target is None else get(target),
            None if stream is None else get(stream), row[8], row[9], row[10], row[11],
            row[12], row[13], row[14], row[15], names[row[16]], row[17]))

    yield from merged_records(events, dead, record_of)
