"""Damaged databases: detect at open, move aside, and salvage readable rows later.

A damaged file is never overwritten or deleted: it is renamed next to the live one,
a fresh database is started (the journal replays into it) and `auditd recover OLD.db`
copies every row that can still be read into the live store, idempotently.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from auditd.schema import id_hash
from auditd.store.statements import EVENTS, STREAMS, transaction
from auditd.store.store import Progress, connect_sync, watched

log = structlog.get_logger("auditd.store.recovery")

_CHUNK = 1000


def integrity_problem(path: Path, progress: Progress | None = None) -> str | None:
    """None when `PRAGMA quick_check` passes, else what is wrong. `progress` is called
    while the check runs (start-up's proof that it is not stuck)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            with watched(conn, progress):
                rows = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return None if rows == ["ok"] else "; ".join(rows[:5])


def set_aside_if_damaged(path: Path,
                         progress: Progress | None = None) -> tuple[Path, str] | None:
    """Check the database; when damaged, move it aside and say where and why."""
    if not path.exists():
        return None
    problem = integrity_problem(path, progress)
    if problem is None:
        return None
    moved = move_aside(path)
    log.critical("database_damaged", moved_to=str(moved), problem=problem,
                 action="started a fresh database; the journal replays into it; "
                        f"run `auditd recover {moved}` to salvage the rest")
    return moved, problem


def move_aside(path: Path) -> Path:
    """Rename the database (and its WAL and shm) to `NAME.damaged-<time>`."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    number = 1
    while any(Path(f"{target}{suffix}").exists() for suffix in ("", "-wal", "-shm")):
        # never overwrite an earlier damaged file, nor its WAL
        number += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{number}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            source.rename(Path(f"{target}{suffix}"))
    return target


@dataclass
class Remnant:
    """What a damaged file still tells about the sequence: seqs and stream versions
    must continue past it, never restart."""

    max_seq: int = 0
    streams: dict[str, int] | None = None


def read_remnant(damaged: Path) -> Remnant:
    """Best effort: the highest seq and each stream's version, from what is readable."""
    remnant = Remnant(streams={})
    try:
        source = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
    except sqlite3.DatabaseError:
        return remnant
    try:
        remnant.max_seq = _max_seq(source)
        names = _readable_names(source)
        try:
            rows = source.execute("SELECT stream, version FROM streams").fetchall()
        except sqlite3.DatabaseError:
            rows = []
        assert remnant.streams is not None
        for stream_id, version in rows:
            if stream_id in names:
                remnant.streams[names[stream_id]] = int(version)
    finally:
        source.close()
    return remnant


@dataclass
class Salvage:
    copied: int = 0
    already_present: int = 0
    unreadable: int = 0
    copied_hashes: list[int] = field(default_factory=list)  # id hashes of copied rows
    stream_versions: dict[str, int] = field(default_factory=dict)  # highest copied

    def document(self, into: str) -> dict[str, Any]:
        return {"copied": self.copied, "already_present": self.already_present,
                "unreadable": self.unreadable, "into": into}


def salvage(damaged: Path, live: Path,
            progress: Callable[[int, int], None] | None = None) -> Salvage:
    """Copy every readable event row of `damaged` into `live`; re-running copies nothing new.

    Rows are read in seq ranges; a range that fails is split down to single rows, so
    one damaged page costs only the rows on it.
    """
    source = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
    target = connect_sync(live)
    result = Salvage()
    try:
        names = _readable_names(source)
        top = _max_seq(source)
        live_names: dict[str, int] = {}
        for start in range(1, top + 1, _CHUNK):
            rows = _read_rows(source, start, min(top, start + _CHUNK - 1), result)
            _copy(target, rows, names, live_names, result)
            if progress is not None:
                progress(min(top, start + _CHUNK - 1), top)
    finally:
        source.close()
        target.close()
    return result


def _max_seq(source: sqlite3.Connection) -> int:
    for sql in ("SELECT max(seq) FROM events", "SELECT value FROM meta WHERE key='committed_seq'"):
        try:
            value = source.execute(sql).fetchone()[0]
            if value:
                return int(value)
        except sqlite3.DatabaseError:
            continue
    return 0


def _readable_names(source: sqlite3.Connection) -> dict[int, str]:
    names: dict[int, str] = {}
    try:
        top = source.execute("SELECT max(id) FROM names").fetchone()[0] or 0
    except sqlite3.DatabaseError:
        return names
    for start in range(1, top + 1, _CHUNK):
        try:
            names.update(source.execute(
                "SELECT id, value FROM names WHERE id BETWEEN ? AND ?",
                (start, start + _CHUNK - 1)).fetchall())
        except sqlite3.DatabaseError:
            for name_id in range(start, start + _CHUNK):
                try:
                    names.update(source.execute(
                        "SELECT id, value FROM names WHERE id = ?", (name_id,)).fetchall())
                except sqlite3.DatabaseError:
                    continue
    return names


def _read_rows(source: sqlite3.Connection, first: int, last: int,
               result: Salvage) -> list[tuple[object, ...]]:
    try:
        if first == last:  # a direct seek reads no neighbouring leaf page
            return source.execute("SELECT * FROM events WHERE seq = ?", (first,)).fetchall()
        return source.execute("SELECT * FROM events WHERE seq BETWEEN ? AND ?",
                              (first, last)).fetchall()
    except sqlite3.DatabaseError:
        if first == last:
            result.unreadable += 1
            return []
        middle = (first + last) // 2
        return (_read_rows(source, first, middle, result)
                + _read_rows(source, middle + 1, last, result))


def _copy(target: sqlite3.Connection, rows: list[tuple[object, ...]], names: dict[int, str],
          live_names: dict[str, int], result: Salvage) -> None:
    with transaction(target):
        for row in rows:
            seq, event_id = row[0], str(row[1])
            present = target.execute(
                "SELECT 1 FROM events WHERE seq = ? OR (id_hash = ? AND id = ?)",
                (seq, id_hash(event_id), event_id)).fetchone()
            if present:
                result.already_present += 1
                continue
            mapped = list(row)
            mapped[2] = id_hash(event_id)  # the source may predate the current key
            for column in (5, 6, 7, 8, 17):  # type, actor, target, stream, comm
                if mapped[column] is not None:
                    value = names.get(int(str(mapped[column])))
                    if value is None:
                        result.unreadable += 1
                        break
                    mapped[column] = _name_id(target, live_names, value)
            else:
                target.execute(EVENTS.one(), mapped)
                result.copied += 1
                result.copied_hashes.append(int(str(mapped[2])))
                if mapped[8] is not None and row[9] is not None:
                    stream, version = names[int(str(row[8]))], int(str(row[9]))
                    target.execute(STREAMS.one(), (mapped[8], version, seq))
                    result.stream_versions[stream] = max(
                        version, result.stream_versions.get(stream, 0))


def _name_id(target: sqlite3.Connection, cache: dict[str, int], value: str) -> int:
    if value not in cache:
        target.execute("INSERT INTO names (value) VALUES (?) ON CONFLICT DO NOTHING", (value,))
        cache[value] = int(target.execute(
            "SELECT id FROM names WHERE value = ?", (value,)).fetchone()[0])
    return cache[value]
