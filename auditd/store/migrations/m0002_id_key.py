"""Schema 2: `events.id_hash` holds the time-ordered id key of `schema.id_hash`.

For UUIDv7 ids the key now begins with the id's timestamp, so inserts append to the
index instead of landing on a random leaf; other ids keep their plain hash. Existing
rows are rekeyed in place. The append-only trigger is lifted for that one UPDATE,
inside the migration's transaction, and put back as it was.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from auditd.schema import hash64, id_hash
from auditd.store.migrations.m0001_initial import NO_UPDATE_TRIGGER


def _rekey(key: Callable[[str], int]) -> Callable[[sqlite3.Connection], None]:
    def rekey(conn: sqlite3.Connection) -> None:
        rows = conn.execute("SELECT seq, id FROM events").fetchall()
        conn.executemany("UPDATE events SET id_hash = ? WHERE seq = ?",
                         [(key(str(event_id)), seq) for seq, event_id in rows])
    return rekey


UP = ("DROP TRIGGER events_no_update", _rekey(id_hash), NO_UPDATE_TRIGGER)
DOWN = ("DROP TRIGGER events_no_update", _rekey(hash64), NO_UPDATE_TRIGGER)
