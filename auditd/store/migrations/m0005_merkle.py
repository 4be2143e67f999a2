"""Schema 5: the Merkle log (proofs.md; auditd/proofs/tree.py has the layout).

`merkle_nodes` holds the tree's stored subtree roots, `merkle_edge` its right edge,
`checkpoints` every signed checkpoint the daemon issued, and `meta.host_id` the store's
stable host id (the checkpoints' origin is `auditd/<host_id>`). Stored hashes and
checkpoints are append-only, like events.

Up on a populated store leaves the tree empty: the daemon builds it from the stored
records at its next start (auditd.proofs.ledger, with progress), a chunk per
transaction, so this migration rewrites nothing. Down drops the tables and the host id:
the tree can be built again from the records, but the signed checkpoints are gone from
the file (`auditd migrate` takes its backup first, which keeps them; not counted as a
loss of events: nothing recorded is lost).
"""

from __future__ import annotations

import re
import socket
import sqlite3
from collections.abc import Callable


def host_id() -> str:
    """The host name, reduced to what a note's key name may hold."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "localhost"
    return name[:64]


def _set_host_id(db: sqlite3.Connection) -> None:
    db.execute("INSERT OR IGNORE INTO meta VALUES ('host_id', ?)", (host_id(),))


def no_change(table: str) -> tuple[str, str]:
    return (f"""CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table}
       BEGIN SELECT RAISE(ABORT, '{table} are append-only'); END""",
            f"""CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table}
       WHEN (SELECT value FROM meta WHERE key = 'retention_gate') IS NOT 1
       BEGIN SELECT RAISE(ABORT, '{table} are append-only'); END""")


UP: tuple[str | Callable[[sqlite3.Connection], None], ...] = (
    """CREATE TABLE merkle_nodes (
        height INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        hash BLOB NOT NULL,
        leaves BLOB,
        groups BLOB,
        PRIMARY KEY (height, idx)
    ) WITHOUT ROWID""",
    """CREATE TABLE merkle_edge (
        size INTEGER NOT NULL,
        compact BLOB NOT NULL,
        fingerprints BLOB NOT NULL,
        groups BLOB NOT NULL
    )""",
    "INSERT INTO merkle_edge VALUES (0, x'', x'', x'')",
    """CREATE TABLE checkpoints (
        id INTEGER PRIMARY KEY,
        size INTEGER NOT NULL,
        root BLOB NOT NULL,
        time INTEGER NOT NULL,
        text TEXT NOT NULL
    )""",
    "CREATE INDEX checkpoints_size ON checkpoints (size)",
    *no_change("merkle_nodes"),
    *no_change("checkpoints"),
    _set_host_id,
)

DOWN: tuple[str, ...] = (
    "DROP TABLE checkpoints",
    "DROP TABLE merkle_edge",
    "DROP TABLE merkle_nodes",
    "DELETE FROM meta WHERE key = 'host_id'",
)
