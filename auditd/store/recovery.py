"""Damaged databases: detect at open, move aside, and salvage readable rows later.

A damaged file is never overwritten or deleted: it is renamed next to the live one,
a fresh database is started (the journal replays into it) and `auditd recover OLD.db`
copies every row that can still be read into the live store, idempotently: its events
and its dead letters (poison events and journal gaps, each with its seq), so every
seq it held is again a stored event or a dead letter.
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
from auditd.store.connection import Progress, connect_sync, watched
from auditd.store.statements import DEAD_LETTERS, EVENTS, STREAMS, transaction

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
    dead_letters_copied: int = 0
    dead_letters_already_present: int = 0
    dead_letters_unreadable: int = 0
    problems: list[str] = field(default_factory=list)  # whole tables that could not be read
    copied_hashes: list[int] = field(default_factory=list)  # id hashes of copied rows
    stream_versions: dict[str, int] = field(default_factory=dict)  # highest copied

    def document(self, into: str) -> dict[str, Any]:
        document: dict[str, Any] = {
            "copied": self.copied, "already_present": self.already_present,
            "unreadable": self.unreadable, "dead_letters_copied": self.dead_letters_copied,
            "dead_letters_already_present": self.dead_letters_already_present,
            "dead_letters_unreadable": self.dead_letters_unreadable, "into": into}
        if self.problems:
            document["problems"] = self.problems
        return document


# meta key, set by the proofs' ledger: the damaged file whose seqs the Merkle tree waits
# for ({"path", "through_seq"}); a salvage of that file ends the wait.
TREE_WAIT_KEY = "tree_waits_for"


def salvage(damaged: Path, live: Path,
            progress: Callable[[int, int], None] | None = None) -> Salvage:
    """Copy every readable event row and dead letter of `damaged` into `live`;
    re-running copies nothing new.

    Rows are read in ranges of their key; a range that fails is split down to single
    rows, so one damaged page costs only the rows on it. Events go first: a seq that is
    both an event and a dead letter (a letter whose retry committed) stays an event.
    A dead letter with a seq is already present when the live store holds that seq as
    an event or a dead letter; one without (an ingest reject) when an identical entry
    (source, code, raw bytes, first failure time) is there.
    """
    source = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
    target = connect_sync(live)
    result = Salvage()
    try:
        names = _readable_names(source)
        top = _max_seq(source)
        live_names: dict[str, int] = {}
        for start in range(1, top + 1, _CHUNK):
            rows, lost = _read_rows(source, _EVENT_ROWS, start, min(top, start + _CHUNK - 1))
            result.unreadable += lost
            _copy(target, rows, names, live_names, result)
            if progress is not None:
                progress(min(top, start + _CHUNK - 1), top)
        _salvage_dead_letters(source, target, result)
        _end_tree_wait(target, damaged)
    finally:
        source.close()
        target.close()
    return result


def _end_tree_wait(target: sqlite3.Connection, damaged: Path) -> None:
    with transaction(target):
        target.execute("DELETE FROM meta WHERE key = ? AND json_extract(value, '$.path') = ?",
                       (TREE_WAIT_KEY, str(damaged)))


_EVENT_ROWS = "SELECT * FROM events WHERE seq"
_DEAD_LETTER_ROWS = ("SELECT seq, source, code, reason, raw, size, uid, attempts,"
                     " first_failed_at, last_failed_at FROM dead_letters WHERE dlq_id")


def _salvage_dead_letters(source: sqlite3.Connection, target: sqlite3.Connection,
                          result: Salvage) -> None:
    try:
        top = int(source.execute("SELECT max(dlq_id) FROM dead_letters").fetchone()[0] or 0)
    except sqlite3.DatabaseError as exc:
        result.problems.append(f"dead_letters: cannot be read: {exc}")
        log.warning("dead_letters_unreadable", error=str(exc))
        return
    for start in range(1, top + 1, _CHUNK):
        rows, lost = _read_rows(source, _DEAD_LETTER_ROWS, start,
                                min(top, start + _CHUNK - 1))
        result.dead_letters_unreadable += lost
        with transaction(target):
            for row in rows:
                if _dead_letter_present(target, row):
                    result.dead_letters_already_present += 1
                    continue
                target.execute(DEAD_LETTERS.one(), row)
                result.dead_letters_copied += 1


def _dead_letter_present(target: sqlite3.Connection, row: tuple[object, ...]) -> bool:
    seq, source, code, raw, first_failed_at = row[0], row[1], row[2], row[4], row[8]
    if seq is not None:
        return target.execute(
            "SELECT 1 FROM events WHERE seq = ? UNION ALL "
            "SELECT 1 FROM dead_letters WHERE seq = ? LIMIT 1", (seq, seq)).fetchone() is not None
    return target.execute(
        "SELECT 1 FROM dead_letters WHERE seq IS NULL AND source = ? AND code = ? "
        "AND first_failed_at = ? AND raw = ? LIMIT 1",
        (source, code, first_failed_at, raw)).fetchone() is not None


def _max_seq(source: sqlite3.Connection) -> int:
    """The highest seq the file tells of: its events, its dead letters (the last seq
    may have been dead-lettered) and its commit checkpoint, whichever are readable."""
    highest = 0
    for sql in ("SELECT max(seq) FROM events", "SELECT max(seq) FROM dead_letters",
                "SELECT value FROM meta WHERE key='committed_seq'"):
        try:
            value = source.execute(sql).fetchone()
        except sqlite3.DatabaseError:
            continue
        if value is not None and value[0] is not None:
            highest = max(highest, int(value[0]))
    return highest


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


def _read_rows(source: sqlite3.Connection, select: str, first: int,
               last: int) -> tuple[list[tuple[object, ...]], int]:
    """Rows whose key (`select` ends with it) is in first..last, and how many keys could
    not be read: a range that fails is halved down to single keys."""
    try:
        if first == last:  # a direct seek reads no neighbouring leaf page
            return source.execute(f"{select} = ?", (first,)).fetchall(), 0
        return source.execute(f"{select} BETWEEN ? AND ?", (first, last)).fetchall(), 0
    except sqlite3.DatabaseError:
        if first == last:
            return [], 1
        middle = (first + last) // 2
        low, low_lost = _read_rows(source, select, first, middle)
        high, high_lost = _read_rows(source, select, middle + 1, last)
        return low + high, low_lost + high_lost


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
