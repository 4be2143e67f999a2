"""The forwarding cursor in the store (schema 8, `forward_cursor`): per stream, the
acknowledged contiguous prefix of seqs and of checkpoint sizes. Written on the store's
writer thread (between batches), read from any snapshot."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from auditd.store.statements import transaction


@dataclass(frozen=True, slots=True)
class Cursor:
    seq: int  # every seq at or below is in the stream
    checkpoint_size: int  # every checkpoint of this size or smaller is in the stream


def load_cursor(db: sqlite3.Connection, stream: str) -> Cursor:
    row = db.execute("SELECT seq, checkpoint_size FROM forward_cursor WHERE stream = ?",
                     (stream,)).fetchone()
    return Cursor(0, 0) if row is None else Cursor(int(row[0]), int(row[1]))


def save_cursor(db: sqlite3.Connection, stream: str, cursor: Cursor) -> None:
    """Never moves a cursor back: a late write of an older position is a no-op."""
    with transaction(db):
        db.execute(
            "INSERT INTO forward_cursor VALUES (?, ?, ?, ?) ON CONFLICT (stream) DO UPDATE"
            " SET seq = max(seq, excluded.seq), checkpoint_size = max(checkpoint_size,"
            " excluded.checkpoint_size), updated_at = excluded.updated_at",
            (stream, cursor.seq, cursor.checkpoint_size, time.time_ns()))
