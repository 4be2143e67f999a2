"""Versioned schema migrations: each has up and down; applied versions are recorded.

A migration and its bookkeeping row (version, name, time, and a checksum of its
definition) commit in one transaction, so a crash leaves the schema at a version that
is recorded. Re-running is a no-op. A database with a version this code does not know
(written by a newer auditd) is refused, never migrated (`refuse_unknown`). A migration whose down
drops stored rows says which tables (`down_deletes`), so a caller can count what a
roll-back would delete before it runs (`losses`).
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from auditd.errors import StoreError
from auditd.store.migrations import (
    deferred,
    m0001_initial,
    m0002_id_key,
    m0003_partitions,
    m0004_projections,
    m0005_merkle,
    m0006_origins,
    m0007_prune_points,
    m0008_forward,
)
from auditd.store.statements import transaction

# A step is SQL, or a function for what SQL cannot compute (it runs in the same
# transaction).
Step = str | Callable[[sqlite3.Connection], None]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up: tuple[Step, ...]
    down: tuple[Step, ...]
    down_deletes: tuple[str, ...] = ()  # tables whose rows the down step deletes


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial", m0001_initial.UP, m0001_initial.DOWN,
              down_deletes=("events", "dead_letters")),
    Migration(2, "id_key", m0002_id_key.UP, m0002_id_key.DOWN),
    Migration(3, "partitions", m0003_partitions.UP, m0003_partitions.DOWN),
    Migration(4, "projections", m0004_projections.UP, m0004_projections.DOWN),
    Migration(5, "merkle", m0005_merkle.UP, m0005_merkle.DOWN),
    Migration(6, "origins", m0006_origins.UP, m0006_origins.DOWN,
              down_deletes=("event_origins",)),
    Migration(7, "prune_points", m0007_prune_points.UP, m0007_prune_points.DOWN,
              down_deletes=("prune_points",)),
    Migration(8, "forward", m0008_forward.UP, m0008_forward.DOWN),
)
LATEST = MIGRATIONS[-1].version

_BOOKKEEPING = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL,
    checksum TEXT)"""


class SchemaTooNewError(StoreError):
    """The database was written by a newer auditd: its schema is not this one's."""


def checksum(migration: Migration) -> str:
    """What the migration's up steps are, hashed: SQL text, or a function's name."""
    parts = [step if isinstance(step, str) else f"{step.__module__}.{step.__qualname__}"
             for step in migration.up]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def recorded(conn: sqlite3.Connection) -> dict[int, tuple[int, str | None]]:
    """Applied version -> (applied_at ns, checksum or None for rows from before
    checksums were kept). Read-only."""
    if not applied(conn):
        return {}
    columns = {row[1] for row in conn.execute("PRAGMA table_info(schema_migrations)")}
    pick = "checksum" if "checksum" in columns else "NULL"
    return {int(v): (int(t), c) for v, t, c in conn.execute(
        f"SELECT version, applied_at, {pick} FROM schema_migrations")}


def refuse_unknown(conn: sqlite3.Connection, where: object) -> None:
    """SchemaTooNewError when `where` holds a schema version this code does not know."""
    unknown = [v for v in applied(conn) if v > LATEST]
    if unknown:
        raise SchemaTooNewError(
            f"{where}: the database is at schema version {max(unknown)}, newer than this "
            f"auditd knows (its newest is {LATEST}): run the auditd that wrote it, or "
            "restore a backup made by this version")


def applied(conn: sqlite3.Connection) -> list[int]:
    """Versions applied, ascending. Read-only."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_migrations'"
    ).fetchone()
    if not exists:
        return []
    return [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]


def pending(conn: sqlite3.Connection) -> list[Migration]:
    """Migrations not yet applied, in order. Read-only."""
    done = set(applied(conn))
    return [m for m in MIGRATIONS if m.version not in done]


def current(conn: sqlite3.Connection) -> int:
    """The schema version: the highest applied, 0 for none. Read-only."""
    return max(applied(conn), default=0)


def plan(conn: sqlite3.Connection, to: int | None = None) -> list[tuple[str, Migration]]:
    """What migrate(conn, to) would do, in order: ("up" | "down", migration). Read-only."""
    target = LATEST if to is None else to
    if target < 0 or target > LATEST:
        raise ValueError(f"no schema version {target}; versions are 0..{LATEST}")
    done = set(applied(conn))
    steps = [("up", m) for m in MIGRATIONS if m.version <= target and m.version not in done]
    steps += [("down", m) for m in reversed(MIGRATIONS)
              if m.version > target and m.version in done]
    return steps


def losses(conn: sqlite3.Connection,
           steps: list[tuple[str, Migration]]) -> list[tuple[Migration, dict[str, int]]]:
    """The roll-backs in `steps` that would delete rows, with the rows each would delete
    (table -> count; only tables that hold rows). Read-only."""
    found = []
    for direction, migration in steps:
        if direction != "down":
            continue
        counts = {table: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                  for table in migration.down_deletes}
        counts = {table: count for table, count in counts.items() if count}
        if counts:
            found.append((migration, counts))
    return found


def migrate(conn: sqlite3.Connection, to: int | None = None) -> list[str]:
    """Apply (or roll back) migrations until the schema is at `to` (default: latest).

    The connection must be in autocommit mode (isolation_level=None). Deleting rows is
    not this function's concern: callers check `losses` first.
    """
    refuse_unknown(conn, "migrate")
    steps = plan(conn, to)
    conn.execute(_BOOKKEEPING)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(schema_migrations)")}
    if "checksum" not in columns:  # a store from before checksums were recorded
        conn.execute("ALTER TABLE schema_migrations ADD COLUMN checksum TEXT")
    deferred.restore(conn)  # a migration must find the schema whole
    actions: list[str] = []
    for direction, migration in steps:
        if direction == "up":
            _run(conn, migration.up,
                 ("INSERT INTO schema_migrations VALUES (?, ?, ?, ?)",
                  (migration.version, migration.name, time.time_ns(), checksum(migration))))
            actions.append(f"applied {migration.version} {migration.name}")
        else:
            _run(conn, migration.down,
                 ("DELETE FROM schema_migrations WHERE version = ?", (migration.version,)))
            actions.append(f"rolled back {migration.version} {migration.name}")
    return actions


def _run(conn: sqlite3.Connection, statements: tuple[Step, ...],
         bookkeeping: tuple[str, tuple[object, ...]]) -> None:
    with transaction(conn):
        for statement in statements:
            if isinstance(statement, str):
                conn.execute(statement)
            else:
                statement(conn)
        conn.execute(*bookkeeping)
