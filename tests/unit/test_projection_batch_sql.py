"""The writer's counts, summed by SQLite (batch_sql), equal a per-event Python count:
hours floored before 1970 too, events without an actor, several uids, batches with
dead letters among their seqs, and a rebuild window skipped."""

from __future__ import annotations

import random
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from auditd.projections.batch_sql import add_batch
from auditd.projections.definitions import HOUR_NS, PROJECTIONS
from auditd.store.connection import connect_sync
from auditd.store.migrations import migrate
from auditd.store.statements import EVENTS, insert_rows, transaction


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = connect_sync(tmp_path / "auditd.db")
    migrate(conn)
    yield conn
    conn.close()


def rows_of(rng: random.Random, seqs: list[int]) -> list[tuple[Any, ...]]:
    return [(seq, f"id-{seq}", seq, rng.randint(-3 * HOUR_NS, 3 * HOUR_NS), 0,
             rng.randint(1, 3), rng.choice([None, 4, 5]), None, None, None, None, None,
             None, None, 1, rng.choice([0, 1000]), 0, rng.randint(6, 7)) for seq in seqs]


def expected(rows: list[tuple[Any, ...]], window: tuple[int, int] | None) -> dict[str, Any]:
    kept = [r for r in rows if window is None or not window[0] < r[0] <= window[1]]
    found: dict[str, Any] = {
        "counts_by_type": Counter((r[3] // HOUR_NS, r[5], r[15]) for r in kept),
        "counts_by_actor": Counter((r[3] // HOUR_NS, r[6] or 0, r[15]) for r in kept),
        "counts_by_comm": Counter((r[3] // HOUR_NS, r[17], r[15]) for r in kept),
        "counts_by_uid": Counter((r[3] // HOUR_NS, r[15]) for r in kept)}
    summary: dict[tuple[int, int], list[int]] = {}
    for r in kept:
        if r[6] is None:
            continue
        entry = summary.setdefault((r[6], r[15]), [r[3], r[3], 0, r[0]])
        entry[0], entry[1] = min(entry[0], r[3]), max(entry[1], r[3])
        entry[2], entry[3] = entry[2] + 1, max(entry[3], r[0])
    found["actor_summary"] = {k: tuple(v) for k, v in summary.items()}
    return found


def stored(db: sqlite3.Connection) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in ("counts_by_type", "counts_by_actor", "counts_by_comm"):
        found[name] = Counter({tuple(r[:3]): r[3] for r in db.execute(f"SELECT * FROM {name}")})
    found["counts_by_uid"] = Counter({(h, u): n for h, u, n in
                                      db.execute("SELECT * FROM counts_by_uid")})
    found["actor_summary"] = {(a, u): (f, la, t, s) for a, u, f, la, t, s in
                              db.execute("SELECT * FROM actor_summary")}
    return found


@pytest.mark.parametrize("seed", range(6))
def test_sqlite_sums_equal_a_count_per_event(db: sqlite3.Connection, seed: int) -> None:
    rng = random.Random(seed)
    seqs = [s for s in range(1, 400) if rng.random() > (0.1 if seed % 2 else 0.0)]
    window = (100, 250) if seed >= 3 else None
    rows = rows_of(rng, seqs)
    with transaction(db):
        insert_rows(db, EVENTS, rows)
        add_batch(db, PROJECTIONS, seqs, window)
    assert stored(db) == expected(rows, window)
