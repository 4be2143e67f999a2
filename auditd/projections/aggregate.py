"""A chunk of events aggregated in Python, and the UPSERTs that add it to the tables.

The writer calls this once per batch inside its transaction, so it is on the hot path:
columns are pulled out with `map(itemgetter)` and counted with `Counter(zip(...))`, both
in C; only the actor summary walks the events one by one. Each projection then gets one
multi-row UPSERT per batch (statements.RowsInsert: a few power-of-two chunks), adding
the counts to what its rows already hold.

Keys are names ids when the rows come from the writer or the hot table, and the strings
themselves when they come from a sealed partition (the rebuild resolves those to ids in
its own transaction). An absent actor counts under 0 (names ids start at 1).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NamedTuple

from auditd.projections.definitions import HOUR_NS, Projection
from auditd.store.statements import RowsInsert, insert_rows

NO_ACTOR = 0
Key = Any  # a names id (int) or, from a sealed partition, the string itself


class Columns(NamedTuple):
    """Parallel lists, one entry per event, in seq order."""

    seqs: Sequence[int]
    ts: Sequence[int]
    types: Sequence[Key]
    actors: Sequence[Key | None]
    uids: Sequence[int]
    comms: Sequence[Key]

    @property
    def events(self) -> int:
        return len(self.seqs)

    def within(self, keep: Sequence[bool]) -> Columns:
        """Only the events whose `keep` is true."""
        kept: list[list[Any]] = [[v for v, k in zip(column, keep, strict=True) if k]
                                 for column in self]
        return Columns(*kept)




def columns_of_event_rows(rows: Sequence[tuple[Any, ...]]) -> Columns:
    """The columns of the events-table rows the writer is inserting."""
    if not rows:
        return Columns([], [], [], [], [], [])
    found: list[list[Any]] = [list(map(itemgetter(i), rows)) for i in (0, 3, 5, 6, 15, 17)]
    return Columns(*found)


def columns_of(rows: Iterable[tuple[Any, ...]]) -> Columns:
    """Columns of (seq, ts, type, actor, uid, comm) tuples."""
    found: list[list[Any]] = [[], [], [], [], [], []]
    for row in rows:
        for column, value in zip(found, row, strict=True):
            column.append(value)
    return Columns(*found)


@dataclass(slots=True)
class Aggregates:
    """What a chunk adds: per counts projection, key -> events; the actor summary,
    (actor, uid) -> [first ts, last ts, events, last seq]."""

    counts: dict[str, Counter[tuple[Any, ...]]] = field(default_factory=dict)
    actors: dict[tuple[Any, int], list[int]] | None = None

    @property
    def empty(self) -> bool:
        return not any(self.counts.values()) and not self.actors


def aggregate(columns: Columns, projections: Iterable[Projection]) -> Aggregates:
    """Sums of a chunk for `projections`.

    A batch nearly always falls within one hour and comes from a few uids: when it is
    one hour and one uid, each projection is one Counter over a list of values (no
    tuple per event); otherwise tuples of (hour, value, uid) are counted."""
    result = Aggregates()
    if not columns.events:
        return result
    low, high = min(columns.ts) // HOUR_NS, max(columns.ts) // HOUR_NS
    only_uid = columns.uids[0] if len(set(columns.uids)) == 1 else None
    one = low == high and only_uid is not None
    hours: list[int] | None = None
    for projection in projections:
        if projection.kind == "summary":
            result.actors = _actor_summary(columns, only_uid)
            continue
        values: Sequence[Key]
        if projection.field == "uid":
            if one:
                result.counts[projection.name] = Counter({(low, only_uid): columns.events})
                continue
            if hours is None:
                hours = [ts // HOUR_NS for ts in columns.ts]
            result.counts[projection.name] = Counter(zip(hours, columns.uids, strict=True))
            continue
        values = {"type": columns.types, "comm": columns.comms}.get(projection.field) \
            or [NO_ACTOR if a is None else a for a in columns.actors]
        if one:
            result.counts[projection.name] = Counter(
                {(low, value, only_uid): n for value, n in Counter(values).items()})
            continue
        if hours is None:
            hours = [ts // HOUR_NS for ts in columns.ts]
        result.counts[projection.name] = Counter(zip(hours, values, columns.uids,
                                                     strict=True))
    return result


def _actor_summary(columns: Columns,
                   only_uid: int | None = None) -> dict[tuple[Any, int], list[int]]:
    """(actor, uid) -> [first ts, last ts, events, last seq] of events with an actor.

    When ts never decreases along the batch (it is the receive time unless a client
    sets it), first and last ts are those of each key's first and last event, and
    dicts built from pairs (the last pair of a key wins) give them, and the last seq,
    without a Python loop per event; otherwise, one loop. With one uid, the keys are
    the actors themselves (no tuple per event)."""
    keys: Sequence[Any] = columns.actors if only_uid is not None else list(
        zip(columns.actors, columns.uids, strict=True))
    totals = Counter(keys)
    totals.pop(None if only_uid is not None else (None, 0), None)
    if not totals:
        return {}
    ts = columns.ts
    if ts == sorted(ts):
        last_ts = dict(zip(keys, ts, strict=True))
        last_seq = dict(zip(keys, columns.seqs, strict=True))
        first_ts = dict(zip(reversed(keys), reversed(ts), strict=True))
        found = {key: [first_ts[key], last_ts[key], n, last_seq[key]]
                 for key, n in totals.items()}
        if only_uid is not None:
            return {(actor, only_uid): entry for actor, entry in found.items()}
        return {key: entry for key, entry in found.items() if key[0] is not None}
    summary: dict[tuple[Any, int], list[int]] = {}
    for seq, moment, actor, uid in zip(columns.seqs, ts, columns.actors, columns.uids,
                                       strict=True):
        if actor is None:
            continue
        entry = summary.get((actor, uid))
        if entry is None:
            summary[(actor, uid)] = [moment, moment, 1, seq]
            continue
        if moment < entry[0]:
            entry[0] = moment
        elif moment > entry[1]:
            entry[1] = moment
        entry[2] += 1
        entry[3] = seq  # columns come in seq order
    return summary


def _counts_upsert(projection: Projection) -> RowsInsert:
    if projection.field == "uid":
        return RowsInsert(f"INSERT INTO {projection.table} (hour, uid, n)", 3,
                          "ON CONFLICT (hour, uid) DO UPDATE SET n = n + excluded.n")
    column = projection.field
    return RowsInsert(f"INSERT INTO {projection.table} (hour, {column}, uid, n)", 4,
                      f"ON CONFLICT (hour, {column}, uid) DO UPDATE SET n = n + excluded.n")


_SUMMARY_UPSERT = RowsInsert(
    "INSERT INTO actor_summary (actor, uid, first_ts, last_ts, total, last_seq)", 6,
    "ON CONFLICT (actor, uid) DO UPDATE SET first_ts = min(first_ts, excluded.first_ts),"
    " last_ts = max(last_ts, excluded.last_ts), total = total + excluded.total,"
    " last_seq = max(last_seq, excluded.last_seq)")
_UPSERTS: dict[str, RowsInsert] = {}


def upsert(db: sqlite3.Connection, projections: Iterable[Projection],
           aggregates: Aggregates) -> None:
    """Add `aggregates` (keyed by names ids) to the tables of `projections`."""
    for projection in projections:
        if projection.kind == "summary":
            if aggregates.actors:
                insert_rows(db, _SUMMARY_UPSERT, [(actor, uid, *entry) for (actor, uid), entry
                                                  in aggregates.actors.items()])
            continue
        counts = aggregates.counts.get(projection.name)
        if not counts:
            continue
        statement = _UPSERTS.get(projection.name)
        if statement is None:
            statement = _UPSERTS[projection.name] = _counts_upsert(projection)
        insert_rows(db, statement, [(*key, n) for key, n in counts.items()])


def named(aggregates: Aggregates, name_id: Any) -> Aggregates:
    """`aggregates` keyed by strings (a sealed partition's) re-keyed by names ids;
    `name_id(value)` gives the id of a string. uid and hour keys stay as they are."""
    counts: dict[str, Counter[tuple[Any, ...]]] = {}
    for name, counter in aggregates.counts.items():
        if name == "counts_by_uid":
            counts[name] = counter
            continue
        counts[name] = Counter({(hour, NO_ACTOR if value == NO_ACTOR else name_id(value), uid): n
                                for (hour, value, uid), n in counter.items()})
    actors = None if aggregates.actors is None else {
        (name_id(actor), uid): entry for (actor, uid), entry in aggregates.actors.items()}
    return Aggregates(counts, actors)


def strings_in(aggregates: Aggregates) -> set[str]:
    """Every string key of string-keyed aggregates (what needs a names id)."""
    found: set[str] = set()
    for name, counter in aggregates.counts.items():
        if name != "counts_by_uid":
            found.update(value for _, value, _ in counter if isinstance(value, str))
    if aggregates.actors:
        found.update(actor for actor, _ in aggregates.actors if isinstance(actor, str))
    return found
