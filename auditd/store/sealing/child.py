"""The sealing process: `python -m auditd.store.sealing.child DB DIR FIRST LAST [PARENT]`.

Reads seqs FIRST..LAST of the hot table (events, names resolved, and the dead letters
that hold seqs of the range) from a read snapshot of DB, builds each seq's record E
(store.records), and seals them into DIR (store.partition.build: temp file, fsync,
rename, directory fsync). Prints the SealedInfo as one JSON line on stdout; a failure
is one line on stderr and exit code 1.

A process of its own, at lower priority: sealing costs several times what the writer
spends on the same events, and must not take the event loop's GIL or the writer's
core away from ingest.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import sys
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from auditd.schema import StoredEvent
from auditd.store.child_process import die_with_parent
from auditd.store.partition.build import seal_partition
from auditd.store.records import merged_records, record_bytes
from auditd.store.sealing.catalog import pack_keys

_EVENTS = """SELECT e.seq, e.id, e.ts, e.received_at, t.value, a.value, g.value, s.value,
    e.stream_seq, e.correlation_id, e.causation_id, e.tags, e.data, e.pid, e.uid, e.gid,
    c.value, e.id_hash
    FROM events e JOIN names t ON t.id = e.type
    LEFT JOIN names a ON a.id = e.actor LEFT JOIN names g ON g.id = e.target
    LEFT JOIN names s ON s.id = e.stream JOIN names c ON c.id = e.comm
    WHERE e.seq BETWEEN ? AND ? ORDER BY e.seq"""
_DEAD = """SELECT seq, code, reason, raw FROM dead_letters
    WHERE seq BETWEEN ? AND ? ORDER BY seq, dlq_id"""
# Seqs read per read transaction. Not one transaction for the whole range: a reader's
# snapshot stops WAL checkpoints at its mark, and a seal lasting seconds under a flood
# let the WAL (and the journal, released only behind complete checkpoints) grow by
# hundreds of MB. The range's rows do not change meanwhile: only the release deletes
# them, after the catalog commit, and the daemon refuses a dead-letter restore into a
# range being sealed.
_CHUNK = 4096


def records(db: sqlite3.Connection, first: int, last: int,
            id_keys: array[int]) -> Iterator[tuple[int, bytes]]:
    """(seq, E) for every stored seq of the range, events and dead letters merged in
    seq order, and each event's id key appended to `id_keys`."""
    for start in range(first, last + 1, _CHUNK):
        yield from _chunk(db, start, min(last, start + _CHUNK - 1), id_keys)


def _chunk(db: sqlite3.Connection, first: int, last: int,
           id_keys: array[int]) -> Iterator[tuple[int, bytes]]:
    """One read transaction's worth: events and dead letters of one snapshot."""
    db.execute("BEGIN")
    events = db.execute(_EVENTS, (first, last)).fetchall()
    dead = db.execute(_DEAD, (first, last)).fetchall()
    db.execute("COMMIT")
    def record_of(row: Sequence[Any]) -> bytes:
        event = StoredEvent(*row)
        id_keys.append(event.id_hash)
        return record_bytes(event)

    yield from merged_records(events, dead, record_of)


def main(argv: list[str]) -> int:
    db_path, directory, first, last = Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3])
    if len(argv) > 4:
        # A SIGKILLed daemon's seal must not go on beside the next daemon's, which
        # removes leftovers and seals the same range again.
        die_with_parent(int(argv[4]), 1)
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
        try:
            id_keys: array[int] = array("q")
            info = seal_partition(records(db, first, last, id_keys), directory, first, last)
        finally:
            db.close()
    except Exception as exc:  # reported to the daemon, which logs it and retries
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"path": str(info.path), "first_seq": info.first_seq,
                      "last_seq": info.last_seq, "count": info.count, "bytes": info.bytes,
                      "format_version": info.format_version,
                      "dictionary_id": info.dictionary_id, "seconds": info.seconds,
                      "cpu_seconds": info.cpu_seconds,
                      "id_keys": base64.b64encode(pack_keys(id_keys)).decode()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
