"""The daemon's side of an import: writing where imported events came from.

`auditd import` sends the events through ingest, then their origins here (`POST
/import/origins`); the daemon writes them on its writer connection between batches,
a bounded chunk per transaction so a large body never holds the write lock long.
`INSERT OR IGNORE`: the same origin posted again (a re-run) changes nothing.
"""

from __future__ import annotations

import sqlite3
from typing import Annotated

import msgspec

from auditd.store.statements import transaction

CHUNK = 2000
MAX_BODY = 16 * 1024 * 1024  # 20,000 origins are ~0.7 MB of JSON
_INSERT = "INSERT OR IGNORE INTO event_origins VALUES (?, ?, ?, ?)"


Seq = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
Nanoseconds = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class OriginsRequest(msgspec.Struct, forbid_unknown_fields=True):
    host: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    # [seq here, seq in the origin store, received_at there (ns)]
    origins: list[tuple[Seq, Seq, Nanoseconds]]


def insert_origins(db: sqlite3.Connection, host: str, rows: list[tuple[int, int, int]]) -> int:
    """Write one chunk of origins; the rows that were new."""
    with transaction(db):
        before = db.total_changes
        db.executemany(_INSERT, [(seq, host, origin_seq, received)
                                 for seq, origin_seq, received in rows])
        return db.total_changes - before
