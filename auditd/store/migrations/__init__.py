"""Versioned schema migrations: each has up and down; applied versions are recorded.

A migration and its bookkeeping row commit in one transaction, so a crash leaves the
schema at a version that is recorded. Re-running is a no-op.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from auditd.store.migrations import deferred, m0001_initial, m0002_id_key
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


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial", m0001_initial.UP, m0001_initial.DOWN),
    Migration(2, "id_key", m0002_id_key.UP, m0002_id_key.DOWN),
)
LATEST = MIGRATIONS[-1].version

_BOOKKEEPING = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"""


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


def migrate(conn: sqlite3.Connection, to: int | None = None) -> list[str]:
    """Apply (or roll back) migrations until the schema is at `to` (default: latest).

    The connection must be in autocommit mode (isolation_level=None).
    """
    target = LATEST if to is None else to
    if target < 0 or target > LATEST:
        raise ValueError(f"no schema version {target}; versions are 0..{LATEST}")
    conn.execute(_BOOKKEEPING)
    deferred.restore(conn)  # a migration must find the schema whole
    done = set(applied(conn))
    actions: list[str] = []
    for migration in MIGRATIONS:
        if migration.version <= target and migration.version not in done:
            _run(conn, migration.up,
                 ("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                  (migration.version, migration.name, time.time_ns())))
            actions.append(f"applied {migration.version} {migration.name}")
    for migration in reversed(MIGRATIONS):
        if migration.version > target and migration.version in done:
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
