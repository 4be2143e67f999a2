"""Schema 6: where an imported event came from (`auditd import`, docs/design/export.md).

`event_origins` holds, for each event that `auditd import` brought in, the seq it has
here and the host, seq and received_at it had in the store it was exported from. A
side table rather than columns of `events`: the hot table, the sealed partitions and
the record E keep one shape for every event, and a store that never imports pays
nothing. `(origin_host, origin_seq)` is unique: an origin is imported once, so the
import's own retry after a lost reply cannot attach it to two events.

Up creates the empty table on any store; down drops it (the events themselves stay:
down loses only where the imported ones came from, which a re-import restores).
"""

from __future__ import annotations

UP: tuple[str, ...] = (
    """CREATE TABLE event_origins (
        seq INTEGER PRIMARY KEY,
        origin_host TEXT NOT NULL,
        origin_seq INTEGER NOT NULL,
        origin_received_at INTEGER NOT NULL
    )""",
    "CREATE UNIQUE INDEX event_origins_origin ON event_origins (origin_host, origin_seq)",
    # GET /events?origin_host=H pages through one host's imports by seq here.
    "CREATE INDEX event_origins_host_seq ON event_origins (origin_host, seq)",
)

DOWN: tuple[str, ...] = ("DROP TABLE event_origins",)
