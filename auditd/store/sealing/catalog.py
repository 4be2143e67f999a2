"""The partition catalog: which sealed files are part of the store, and the hot table's
release behind them.

A sealed file is part of the store once, and only once, its catalog row is committed
in `auditd.db` together with `meta.sealed_through` (one writer transaction). Before
that it is a leftover: a SIGKILL between the sealer's rename and the catalog commit
leaves a file nobody reads, removed at the next start and sealed again from the hot
rows, which are still there. Hot rows at or below `sealed_through` are deleted in
small chunks after the commit, each its own transaction, so the writer is never held
long; a restart resumes the deletion.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import re
import sqlite3
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

import zstandard

from auditd.store.durable import fsync_directory
from auditd.store.statements import transaction

PARTITIONS_DIR = "partitions"
_NAME = re.compile(r"p(\d{12})-(\d{12})\.db")
_RELEASE_CHUNK = 4096
_LOWEST_STORED_HEIGHT = 8  # merkle_nodes start at 256-leaf tiles (proofs.tree.TILE_HEIGHT)


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    first_seq: int
    last_seq: int
    file: str  # name inside the partitions directory
    events: int
    file_bytes: int
    format_version: int
    sealed_at: int  # ns since the epoch
    seconds: float
    id_keys: bytes = b""  # pack_keys of its events' id keys; not read by entries()


def entries(db: sqlite3.Connection) -> list[CatalogEntry]:
    """Catalogued partitions, oldest first."""
    return [CatalogEntry(*row) for row in db.execute(
        "SELECT first_seq, last_seq, file, events, bytes, format_version, sealed_at,"
        " seconds FROM partitions ORDER BY first_seq")]


def sealed_through(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM meta WHERE key = 'sealed_through'").fetchone()
    return 0 if row is None else int(row[0])


def add(db: sqlite3.Connection, entry: CatalogEntry) -> None:
    """Make a sealed file part of the store: its row and the new sealed_through, at once.

    Refuses a partition that does not begin right after sealed_through: partitions tile
    the seqs with no gap and no overlap."""
    with transaction(db):
        through = sealed_through(db)
        if entry.first_seq != through + 1:
            raise ValueError(f"partition {entry.file} starts at seq {entry.first_seq}, "
                             f"but the store is sealed through {through}")
        db.execute("INSERT INTO partitions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (entry.first_seq, entry.last_seq, entry.file, entry.events, entry.file_bytes,
                    entry.format_version, entry.sealed_at, entry.seconds, entry.id_keys))
        db.execute("UPDATE meta SET value = ? WHERE key = 'sealed_through'",
                   (entry.last_seq,))


def release_chunk(db: sqlite3.Connection, chunk: int = _RELEASE_CHUNK) -> int:
    """Delete up to `chunk` hot rows (events and their seqs' dead letters stay: the dead
    letter queue still serves them) at or below sealed_through; how many went.

    The append-only trigger lets deletes through only with `retention_gate` open, which
    this transaction opens and closes around its own DELETE."""
    with transaction(db):
        through = sealed_through(db)
        db.execute("UPDATE meta SET value = 1 WHERE key = 'retention_gate'")
        gone = db.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE seq <= ?"
            " ORDER BY seq LIMIT ?)", (through, chunk)).rowcount
        db.execute("UPDATE meta SET value = 0 WHERE key = 'retention_gate'")
    return int(gone)


def unreleased(db: sqlite3.Connection) -> bool:
    """Whether hot rows at or below sealed_through are left to delete."""
    row = db.execute("SELECT min(seq) FROM events").fetchone()
    return row[0] is not None and int(row[0]) <= sealed_through(db)


def remove_leftovers(db: sqlite3.Connection, directory: Path) -> list[str]:
    """Delete temp files and uncatalogued partition files (a seal that did not reach
    its catalog commit); their names. The hot rows they held are still in the table."""
    if not directory.is_dir():
        return []
    known = {entry.file for entry in entries(db)}
    removed = []
    for path in sorted(directory.iterdir()):
        leftover = path.name.startswith(".p") and path.name.endswith(".tmp")
        if leftover or (_NAME.fullmatch(path.name) and path.name not in known):
            path.unlink()
            removed.append(path.name)
    return removed


def entry_from_seal(info: dict[str, object]) -> CatalogEntry:
    """The catalog row of what the sealing process reported (its JSON line)."""
    path = Path(str(info["path"]))
    return CatalogEntry(
        int(str(info["first_seq"])), int(str(info["last_seq"])), path.name,
        int(str(info["count"])), int(str(info["bytes"])), int(str(info["format_version"])),
        time.time_ns(), float(str(info["seconds"])), base64.b64decode(str(info["id_keys"])))


def pack_keys(keys: array[int]) -> bytes:
    """The id keys, for the catalog (the Bloom filter is rebuilt from them at start):
    zstd of their differences, small for time-ordered keys."""
    deltas = array("q", [keys[0]] if keys else [])
    deltas.extend((b - a + 2**63) % 2**64 - 2**63 for a, b in itertools.pairwise(keys))
    return zstandard.ZstdCompressor(level=3).compress(deltas.tobytes())


def unpack_keys(blob: bytes) -> array[int]:
    deltas = array("q", zstandard.ZstdDecompressor().decompress(blob))
    keys, total = array("q"), 0
    for delta in deltas:
        total = (total + delta + 2**63) % 2**64 - 2**63
        keys.append(total)
    return keys


@dataclass(frozen=True, slots=True)
class PruneRecord:
    """What retention records when it drops the oldest partition (prune_points row)."""

    size: int  # the partition's last seq: seqs 1..size are gone after the drop
    compact: bytes  # the compact range of the first `size` leaves, 32 bytes a hash
    checkpoint: str  # signed, of that size
    events: int
    file_bytes: int


def drop_oldest(db: sqlite3.Connection, entry: CatalogEntry, prune: PruneRecord) -> None:
    """Retention's one deleting transaction: the oldest partition leaves the catalog,
    with every row at or below its last seq (hot rows not yet released, dead letters,
    origins), the tree's stored nodes wholly below it and the checkpoints smaller than
    it, and the prune point is recorded. The file itself is the caller's to unlink,
    after this commits (before, a crash would leave a catalogued file missing).

    Refuses anything but the oldest catalogued partition, or a prune point that is not
    its last seq: retention deletes from the front, a whole partition at a time."""
    with transaction(db):
        oldest = db.execute("SELECT first_seq, last_seq FROM partitions"
                            " ORDER BY first_seq LIMIT 1").fetchone()
        if oldest is None or (int(oldest[0]), int(oldest[1])) != (entry.first_seq,
                                                                 entry.last_seq):
            raise ValueError(f"partition {entry.file} is not the oldest catalogued one")
        if prune.size != entry.last_seq:
            raise ValueError(f"prune point {prune.size} is not partition {entry.file}'s "
                             f"last seq {entry.last_seq}")
        through = prune.size
        db.execute("UPDATE meta SET value = 1 WHERE key = 'retention_gate'")
        db.execute("DELETE FROM partitions WHERE first_seq = ?", (entry.first_seq,))
        db.execute("DELETE FROM events WHERE seq <= ?", (through,))
        db.execute("DELETE FROM dead_letters WHERE seq <= ?", (through,))
        db.execute("DELETE FROM event_origins WHERE seq <= ?", (through,))
        # The stored subtrees wholly below the prune point: (idx + 1) << height <= through.
        for height in range(_LOWEST_STORED_HEIGHT, through.bit_length()):
            db.execute("DELETE FROM merkle_nodes WHERE height = ? AND idx < ?",
                       (height, through >> height))
        db.execute("DELETE FROM checkpoints WHERE size < ?", (through,))
        db.execute("INSERT INTO prune_points VALUES (?, ?, ?, ?, ?, ?)",
                   (prune.size, prune.compact, prune.checkpoint, time.time_ns(),
                    prune.events, prune.file_bytes))
        db.execute("UPDATE meta SET value = 0 WHERE key = 'retention_gate'")


def unlink_durably(path: Path) -> None:
    """Remove a dropped partition's file and make the removal itself durable."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fsync_directory(path.parent)
