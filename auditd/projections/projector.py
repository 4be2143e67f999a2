"""The projections inside the writer's transaction, and the steps of a rebuild.

Every method here runs on the store's thread, with the writer's connection: between two
batches, never beside one, so a rebuild step and a batch never see each other half done.

The rule that keeps every count exact, whatever the order of batches and rebuild
steps: a projection being rebuilt has a window (position, rebuild_through]. The rebuild
counts the events inside it, a chunk per transaction, moving `position` up; the writer
counts every event outside it. Batches past the window (new events) are counted as they
commit; a dead letter re-committed inside the window (`auditd dlq retry`) is left to the
rebuild, which has not reached its seq yet, and one below `position` is counted by the
writer, since the rebuild has passed it. Sealed seqs are never re-committed (a sealed
partition is immutable), so a sealed chunk may be read on another thread.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from auditd.projections.aggregate import (
    Aggregates,
    aggregate,
    columns_of,
    columns_of_event_rows,
    named,
    strings_in,
    upsert,
)
from auditd.projections.definitions import BY_NAME, PROJECTIONS, Projection
from auditd.store.sealing import catalog
from auditd.store.statements import NAMES, insert_rows, json_list, transaction

_ADVANCE = ("UPDATE projections SET position = ?1, updated_at = ?2"
            " WHERE state = 'live' AND position < ?1")
SELECT_HOT_COLUMNS = ("SELECT seq, ts, type, actor, uid, comm FROM events"
                      " WHERE seq BETWEEN ? AND ? ORDER BY seq")


@dataclass(slots=True)
class ProjectionState:
    """One projection as the store's thread knows it (mirrors its `projections` row)."""

    version: int
    state: str  # "live" | "rebuilding"
    position: int  # live: the last seq counted; rebuilding: counted through here
    rebuild_through: int | None  # rebuilding: the window's top

    def counts(self, first_seq: int, last_seq: int) -> bool:
        """Whether the writer counts a batch of seqs first..last all alike (True: every
        one; a batch reaching into the rebuild window is split by seq)."""
        top = self.rebuild_through
        return top is None or first_seq > top or last_seq <= self.position

    def outside_window(self, seq: int) -> bool:
        top = self.rebuild_through
        return top is None or not self.position < seq <= top


class Projector:
    """What Store calls in the batch's transaction (`project`) and after its commit
    (`committed`); the rebuild's steps; and the state the status pages read."""

    def __init__(self, projections: Sequence[Projection] = PROJECTIONS) -> None:
        self.projections = tuple(projections)
        self.states: dict[str, ProjectionState] = {}

    # -- the writer's batch --------------------------------------------------------

    def project(self, db: sqlite3.Connection, rows: Sequence[tuple[Any, ...]],
                checkpoint: int) -> None:
        """Add a batch's events (statements.event_row tuples, in seq order) to every
        projection and advance the live ones' position to `checkpoint`."""
        if rows:
            first, last = rows[0][0], rows[-1][0]
            columns = columns_of_event_rows(rows)
            alike = [p for p in self.projections if self.states[p.name].counts(first, last)]
            upsert(db, alike, aggregate(columns, alike))
            for projection in self.projections:
                if projection not in alike:  # reaches into its rebuild window
                    state = self.states[projection.name]
                    kept = columns.within([state.outside_window(s) for s in columns.seqs])
                    upsert(db, (projection,), aggregate(kept, (projection,)))
        if checkpoint:
            db.execute(_ADVANCE, (checkpoint, time.time_ns()))

    def committed(self, checkpoint: int) -> None:
        for state in self.states.values():
            if state.state == "live" and checkpoint > state.position:
                state.position = checkpoint

    # -- start -----------------------------------------------------------------------

    def load(self, db: sqlite3.Connection) -> list[str]:
        """Read the projections' rows; restart, as rebuilds, those whose stored version
        is not this code's (or that have no row). Returns the names being rebuilt."""
        stored = {name: ProjectionState(version, state, position, through)
                  for name, version, state, position, through in db.execute(
                      "SELECT name, version, state, position, rebuild_through"
                      " FROM projections")}
        self.states = {}
        for projection in self.projections:
            state = stored.get(projection.name)
            if state is None or state.version != projection.version:
                self.begin_rebuild(db, projection.name)
            else:
                self.states[projection.name] = state
        return [name for name, state in self.states.items() if state.state == "rebuilding"]

    # -- rebuild steps -----------------------------------------------------------------

    def begin_rebuild(self, db: sqlite3.Connection, name: str) -> int:
        """Drop a projection's rows and open its window through the checkpoint; returns
        the window's top (the seq the rebuild must count through)."""
        projection = BY_NAME[name]
        with transaction(db):
            # The hot table's top too: `auditd recover` copies a damaged store's rows
            # in outside the writer, under seqs the checkpoint may not have reached
            # (uncommitted seqs are above both: the sequencer starts past them).
            (committed, hot_top) = db.execute(
                "SELECT (SELECT value FROM meta WHERE key = 'committed_seq'),"
                " (SELECT max(seq) FROM events)").fetchone()
            through = max(int(committed or 0), int(hot_top or 0))
            db.execute(f"DELETE FROM {projection.table}")
            db.execute(
                "INSERT INTO projections VALUES (?1, ?2, 'rebuilding', 0, ?3, ?4)"
                " ON CONFLICT (name) DO UPDATE SET version = ?2, state = 'rebuilding',"
                " position = 0, rebuild_through = ?3, updated_at = ?4",
                (name, projection.version, through, time.time_ns()))
        self.states[name] = ProjectionState(projection.version, "rebuilding", 0, through)
        return through

    def sealed_through(self, db: sqlite3.Connection) -> int:
        return catalog.sealed_through(db)

    def count_hot(self, db: sqlite3.Connection, name: str, first: int, last: int) -> bool:
        """Count the hot rows first..last into `name` and move its position to `last`.
        False (and nothing done) when those seqs have been sealed meanwhile: the caller
        reads them from their partition instead."""
        if catalog.sealed_through(db) >= first:
            return False
        projection = BY_NAME[name]
        with transaction(db):
            columns = columns_of(db.execute(SELECT_HOT_COLUMNS, (first, last)))
            upsert(db, (projection,), aggregate(columns, (projection,)))
            self._move(db, name, last)
        self.states[name].position = last  # only once committed
        return True

    def count_sealed(self, db: sqlite3.Connection, name: str, last: int,
                     aggregates: Aggregates) -> None:
        """Add a sealed chunk's string-keyed aggregates and move the position to `last`."""
        projection = BY_NAME[name]
        with transaction(db):
            ids = _name_ids(db, strings_in(aggregates))
            upsert(db, (projection,), named(aggregates, ids.__getitem__))
            self._move(db, name, last)
        self.states[name].position = last  # only once committed

    def finish_rebuild(self, db: sqlite3.Connection, name: str) -> int:
        """Close the window: live again, at the checkpoint (batches past the window were
        counted as they committed). Returns the position."""
        with transaction(db):
            (committed,) = db.execute(
                "SELECT value FROM meta WHERE key = 'committed_seq'").fetchone()
            state = self.states[name]
            position = max(int(committed or 0), state.rebuild_through or 0)
            db.execute("UPDATE projections SET state = 'live', position = ?,"
                       " rebuild_through = NULL, updated_at = ? WHERE name = ?",
                       (position, time.time_ns(), name))
        state.state, state.position, state.rebuild_through = "live", position, None
        return position

    def _move(self, db: sqlite3.Connection, name: str, position: int) -> None:
        db.execute("UPDATE projections SET position = ?, updated_at = ? WHERE name = ?",
                   (position, time.time_ns(), name))

    def document(self, committed_seq: int) -> dict[str, Any]:
        """The /stats section: per projection, its state, position and lag."""
        out: dict[str, Any] = {}
        for name, state in self.states.items():
            entry: dict[str, Any] = {"version": state.version, "state": state.state,
                                     "position": state.position}
            if state.rebuild_through is not None:
                entry["rebuild_through"] = state.rebuild_through
                entry["lag"] = max(0, state.rebuild_through - state.position)
            else:
                entry["lag"] = max(0, committed_seq - state.position)
            out[name] = entry
        return out


def invalidate(db: sqlite3.Connection) -> int:
    """Have every projection rebuilt at the daemon's next start (its stored version no
    longer this code's): for rows written into the store beside a daemon's writer, as
    an offline `auditd recover` does. Returns the projections so marked."""
    exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                        " AND name = 'projections'").fetchone()
    if not exists:
        return 0
    with transaction(db):
        return db.execute("UPDATE projections SET version = 0, updated_at = ?",
                          (time.time_ns(),)).rowcount


def _name_ids(db: sqlite3.Connection, values: set[str]) -> dict[str, int]:
    """The names ids of `values`, inserting those the table does not hold yet."""
    if not values:
        return {}
    insert_rows(db, NAMES, [(v,) for v in values])
    (found,) = db.execute(
        "SELECT json_group_object(value, id) FROM names"
        " WHERE value IN (SELECT value FROM json_each(?))", (json_list(values),)).fetchone()
    return {str(value): int(name_id) for value, name_id in json.loads(found).items()}
