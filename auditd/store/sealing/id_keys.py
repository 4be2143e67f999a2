"""The id keys of the sealed partitions, which start-up feeds to the id filter (Bloom)
so that a duplicate of a sealed event is found.

They come from the catalog, where the sealer packs them (catalog.pack_keys). A row whose
packed keys cannot be read (a store put together outside the daemon, or damaged) would
otherwise stop every start; its keys are read from the partition file itself instead,
written back to the catalog, and the repair logged once.
"""

from __future__ import annotations

import sqlite3
from array import array
from collections.abc import Iterator
from pathlib import Path

import structlog
import zstandard

from auditd.errors import StoreError
from auditd.store.partition.read import SealedPartition
from auditd.store.records import event_from_record, is_dead_letter
from auditd.store.sealing.catalog import pack_keys, unpack_keys
from auditd.store.statements import transaction

log = structlog.get_logger("auditd.store.sealing.id_keys")


def stored_id_keys(db: sqlite3.Connection, directory: Path) -> Iterator[array[int]]:
    """Each catalogued partition's id keys, oldest partition first."""
    rows = db.execute(
        "SELECT first_seq, file, id_keys FROM partitions ORDER BY first_seq").fetchall()
    for first_seq, file, blob in rows:
        try:
            yield unpack_keys(blob)
            continue
        except (zstandard.ZstdError, TypeError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        try:
            keys = keys_of_partition(directory / file)
        except Exception as exc:  # any failure to read the file is its damage
            raise StoreError(f"partition {file}: its id keys are unreadable in the catalog "
                             f"({problem}) and in the file ({type(exc).__name__}: {exc})"
                             ) from exc
        with transaction(db):
            db.execute("UPDATE partitions SET id_keys = ? WHERE first_seq = ?",
                       (pack_keys(keys), first_seq))
        log.warning("partition_id_keys_rebuilt", file=file, events=len(keys),
                    reason=problem)
        yield keys


def keys_of_partition(path: Path) -> array[int]:
    """The id keys of a sealed partition's events (dead letters have none), in seq order."""
    keys: array[int] = array("q")
    with SealedPartition(path) as part:
        for record in part.records(range(part.first_seq, part.last_seq + 1)):
            if not is_dead_letter(record):
                keys.append(event_from_record(record).id_hash)
    return keys
