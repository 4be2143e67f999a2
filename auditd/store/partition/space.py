"""Where a partition file's bytes go, per table and index, from SQLite's `dbstat`
virtual table (compiled into this build: ENABLE_DBSTAT_VTAB)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TableSpace:
    name: str
    pages: int
    bytes: int  # pages * page size: what the table costs in the file
    payload: int  # bytes of cell content (keys and values) in those pages
    unused: int  # free bytes inside its pages


def table_space(path: Path) -> list[TableSpace]:
    """Every table and index of the file, largest first; free pages as `(freelist)`."""
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        rows = conn.execute(
            "SELECT name, count(*), sum(pgsize), sum(payload), sum(unused) FROM dbstat "
            "GROUP BY name ORDER BY sum(pgsize) DESC").fetchall()
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    finally:
        conn.close()
    spaces = [TableSpace(name, pages, size, payload, unused)
              for name, pages, size, payload, unused in rows]
    if free:
        spaces.append(TableSpace("(freelist)", free, free * page_size, 0, free * page_size))
    return spaces
