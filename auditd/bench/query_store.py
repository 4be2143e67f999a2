"""A store of N soak-shaped events for `auditd bench --query`, made without a daemon:
sealed partitions written with seal_partition and catalogued, the rest in the hot table,
as a daemon leaves them once its sealer has caught up.

Feeding a million events through ingest and waiting for the seals takes several times
longer on this machine and measures nothing the query bench is about. The events are
bench_events': sealed_events.StoredSoakEvents with a 100-event correlation every
100,000 events and the word RARE_WORD in 0.1 % of them.
"""

from __future__ import annotations

import sqlite3
import time
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

from auditd.bench.sealed_events import StoredSoakEvents
from auditd.schema import StoredEvent, encoder
from auditd.store.connection import open_writer
from auditd.store.partition.build import seal_partition
from auditd.store.records import record_bytes
from auditd.store.sealing import catalog
from auditd.store.statements import EVENTS, NAMES, STREAMS, event_row, insert_rows, transaction
from auditd.store.store import DB_NAME

RARE_WORD = "quokka"
RARE_EVERY = 1000  # 0.1 %
LONG_CORRELATION_EVERY = 100_000
_BATCH = 4096
_decode_data = msgspec.msgpack.Decoder()


class BenchEvents(StoredSoakEvents):
    def events(self, start: int, stop: int) -> list[StoredEvent]:
        out = super().events(start, stop)
        for at, event in enumerate(out):
            if (start + at) % RARE_EVERY == RARE_EVERY // 2 and event.data is not None:
                data = _decode_data.decode(event.data)
                data["note"] = f"a {RARE_WORD} was seen"
                out[at] = msgspec.structs.replace(event, data=encoder.encode(data))
        return out


def split(count: int, partition_events: int) -> int:
    """How many of `count` events are sealed: whole partitions, leaving between half a
    partition and one and a half hot (where a running daemon's hot table stays)."""
    return max(0, (count - partition_events // 2) // partition_events) * partition_events


def build_store(directory: Path, count: int, partition_events: int,
                say: Callable[[str], None] = print) -> dict[str, float]:
    """Fill `directory` (a storage.path) with `count` events; timings in seconds."""
    directory.mkdir(parents=True, exist_ok=True)
    db = open_writer(directory / DB_NAME)
    source = BenchEvents(long_correlation_every=LONG_CORRELATION_EVERY)
    sealed = split(count, partition_events)
    parts = directory / catalog.PARTITIONS_DIR
    parts.mkdir(exist_ok=True)
    started = time.perf_counter()
    try:
        for first in range(1, sealed + 1, partition_events):
            last = first + partition_events - 1
            keys: array[int] = array("q")
            info = seal_partition(_records(source, first, last, keys), parts, first, last)
            catalog.add(db, catalog.CatalogEntry(
                first, last, info.path.name, info.count, info.bytes, info.format_version,
                time.time_ns(), info.seconds, catalog.pack_keys(keys)))
            say(f"sealed {first}-{last} in {info.seconds:.1f} s")
        seal_s = time.perf_counter() - started
        _insert_hot(db, source, sealed, count)
        _finish(db, source, count)
    finally:
        db.close()
    return {"seal_s": round(seal_s, 1), "hot_insert_s": round(
        time.perf_counter() - started - seal_s, 1)}


def _records(source: BenchEvents, first: int, last: int,
             keys: array[int]) -> Iterator[tuple[int, bytes]]:
    for start in range(first - 1, last, _BATCH):
        for event in source.events(start, min(last, start + _BATCH)):
            keys.append(event.id_hash)
            yield event.seq, record_bytes(event)


def _name_ids(db: sqlite3.Connection, names: dict[str, int], values: set[str]) -> None:
    missing = [v for v in values if v not in names]
    if missing:
        insert_rows(db, NAMES, [(v,) for v in missing])
        for chunk in range(0, len(missing), 30_000):
            part = missing[chunk:chunk + 30_000]
            marks = ",".join("?" * len(part))
            names.update(db.execute(f"SELECT value, id FROM names WHERE value IN ({marks})",
                                    part).fetchall())


def _insert_hot(db: sqlite3.Connection, source: BenchEvents, first: int, count: int) -> None:
    names: dict[str, int] = {}
    for start in range(first, count, _BATCH):
        events = source.events(start, min(count, start + _BATCH))
        with transaction(db):
            _name_ids(db, names, {v for e in events for v in (e.type, e.actor, e.target,
                                                                e.stream, e.comm) if v})
            insert_rows(db, EVENTS, [event_row(e, names.__getitem__) for e in events])


def _finish(db: sqlite3.Connection, source: BenchEvents, count: int) -> None:
    """Stream versions (the sequencer's state at start) and the commit checkpoint."""
    names: dict[str, int] = {}
    with transaction(db):
        _name_ids(db, names, set(source.versions))
        insert_rows(db, STREAMS, [(names[s], v, 0) for s, v in source.versions.items()])
        db.execute("UPDATE meta SET value = ? WHERE key = 'committed_seq'", (count,))
