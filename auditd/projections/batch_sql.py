"""A batch's counts added by SQLite itself, in the writer's transaction.

The batch's rows were just inserted into `events` (seq first..last, in the page cache):
one grouped INSERT ... SELECT per projection sums them there. Summing them in Python
(aggregate.py) cost the store's thread ~30 ms a 4,096-event batch holding the GIL,
which the event loop felt as reply latency; SQLite's C code releases the GIL while it
works. aggregate.py stays for what is not in `events` (sealed partitions' records).

Hours are floored (`ts // HOUR_NS`, as aggregate.py), also for times before 1970:
SQLite's `/` truncates toward zero, so one is taken off where the remainder is negative.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

from auditd.projections.aggregate import NO_ACTOR
from auditd.projections.definitions import HOUR_NS, Projection
from auditd.store.statements import json_list

_HOUR = f"(ts / {HOUR_NS} - (ts % {HOUR_NS} < 0))"
# The batch: seqs ?1..?2 when it holds every one of them (the usual batch), else the
# JSON list ?5 of its seqs (a batch with dead letters among them); ?3..?4, when given,
# a rebuild window the batch must skip.
_RANGE = "seq BETWEEN ?1 AND ?2"
_LISTED = _RANGE + " AND seq IN (SELECT value FROM json_each(?5))"
_OUTSIDE = " AND NOT (seq > ?3 AND seq <= ?4)"


def _statement(projection: Projection, windowed: bool, listed: bool) -> str:
    where = (_LISTED if listed else _RANGE) + (_OUTSIDE if windowed else "")
    table = projection.table
    if projection.kind == "summary":
        return (f"INSERT INTO {table} (actor, uid, first_ts, last_ts, total, last_seq)"
                f" SELECT actor, uid, min(ts), max(ts), count(*), max(seq) FROM events"
                f" WHERE {where} AND actor IS NOT NULL GROUP BY actor, uid"
                " ON CONFLICT (actor, uid) DO UPDATE SET"
                " first_ts = min(first_ts, excluded.first_ts),"
                " last_ts = max(last_ts, excluded.last_ts),"
                " total = total + excluded.total, last_seq = max(last_seq, excluded.last_seq)")
    if projection.field == "uid":
        return (f"INSERT INTO {table} (hour, uid, n) SELECT {_HOUR}, uid, count(*)"
                f" FROM events WHERE {where} GROUP BY 1, 2"
                " ON CONFLICT (hour, uid) DO UPDATE SET n = n + excluded.n")
    field = projection.field
    value = f"coalesce(actor, {NO_ACTOR})" if field == "actor" else field
    return (f"INSERT INTO {table} (hour, {field}, uid, n)"
            f" SELECT {_HOUR}, {value}, uid, count(*) FROM events WHERE {where}"
            f" GROUP BY 1, 2, 3"
            f" ON CONFLICT (hour, {field}, uid) DO UPDATE SET n = n + excluded.n")


_STATEMENTS: dict[tuple[str, bool, bool], str] = {}


def add_batch(db: sqlite3.Connection, projections: Iterable[Projection],
              seqs: Sequence[int], window: tuple[int, int] | None = None) -> None:
    """Add the events of `seqs` (this batch's, ascending, just inserted) to
    `projections`, skipping the seqs of `window` (position, rebuild_through] if given."""
    first, last = seqs[0], seqs[-1]
    listed = last - first + 1 != len(seqs)
    low, high = window if window is not None else (0, 0)
    # As many parameters as the statement's highest ?N.
    given = 5 if listed else 4 if window is not None else 2
    params = (first, last, low, high, json_list(seqs) if listed else None)[:given]
    for projection in projections:
        key = (projection.name, window is not None, listed)
        statement = _STATEMENTS.get(key)
        if statement is None:
            statement = _STATEMENTS[key] = _statement(projection, *key[1:])
        db.execute(statement, params)
