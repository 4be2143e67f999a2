"""Schema 8: forwarding to NATS JetStream (step 8; docs/design/forward.md).

`forward_cursor` holds, per stream forwarded to, the acknowledged contiguous prefix:
every seq at or below `seq` is in the stream, and every checkpoint of size at or below
`checkpoint_size` too. It is the one table of the store that is updated in place: a
cursor is a position, not a record. `meta.store_epoch` is a UUID made with the store
(or by this migration on an older one), so the message ids of a store rebuilt on the
same host never collide with the old store's in JetStream's dedupe.

Down drops the table and the epoch: the next forward resends everything still stored
(JetStream's dedupe keeps the ids of its window only, so a stream may see repeats).
"""

from __future__ import annotations

import sqlite3
import uuid


def _set_store_epoch(db: sqlite3.Connection) -> None:
    db.execute("INSERT OR IGNORE INTO meta VALUES ('store_epoch', ?)", (str(uuid.uuid4()),))


UP = (
    """CREATE TABLE forward_cursor (
        stream TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        checkpoint_size INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    )""",
    _set_store_epoch,
)

DOWN: tuple[str, ...] = (
    "DROP TABLE forward_cursor",
    "DELETE FROM meta WHERE key = 'store_epoch'",
)
