"""The prune point: what the tree keeps of the seqs retention deleted (proofs.md,
"After retention").

When retention deletes the seqs 1..m (leaves 0..m-1: whole partitions, the oldest
first), it records m, the compact range of those m leaves (at most log2(m) hashes,
largest subtree first) and a checkpoint of size m signed then. Every perfect subtree a
proof or a root at a size >= m needs from below m is one of those hashes (a subtree
that lies below m and whose parent does not is a left child cut by m: the binary
digits of m name exactly those), so proofs and `verify` go on working above m. A
record missing at or below m is retention; above it, tampering.

proofs.md says "deleting events below seq m"; auditd reads m as a tree size (the
leaves below index m, seqs 1..m), so that "the checkpoint of size m" covers exactly
what was deleted.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from auditd.proofs.merkle import HASH_BYTES, compact_heights, fold


@dataclass(frozen=True, slots=True)
class PrunePoint:
    size: int  # seqs 1..size are deleted
    compact: tuple[bytes, ...]
    checkpoint: str  # signed, of this size

    @property
    def root(self) -> bytes:
        return fold(self.compact)

    def nodes(self) -> dict[tuple[int, int], bytes]:
        """Each compact hash by the leaf range [lo, hi) it covers."""
        found, lo = {}, 0
        for height, digest in zip(compact_heights(self.size), self.compact, strict=True):
            found[(lo, lo + (1 << height))] = digest
            lo += 1 << height
        return found

    @property
    def compact_blob(self) -> bytes:
        return b"".join(self.compact)


def from_row(size: int, compact: bytes, checkpoint: str) -> PrunePoint:
    hashes = tuple(compact[i:i + HASH_BYTES] for i in range(0, len(compact), HASH_BYTES))
    if len(hashes) != len(compact_heights(size)) or len(compact) % HASH_BYTES:
        raise ValueError(f"the prune point at size {size} holds {len(compact)} bytes of "
                         f"hashes, not {len(compact_heights(size))} hashes")
    return PrunePoint(size, hashes, checkpoint)


def load(db: sqlite3.Connection) -> PrunePoint | None:
    """The newest prune point (None: nothing was ever pruned, or a schema before 7)."""
    try:
        row = db.execute("SELECT size, compact, checkpoint FROM prune_points"
                         " ORDER BY size DESC LIMIT 1").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    return None if row is None else from_row(int(row[0]), bytes(row[1]), str(row[2]))


def pruned_through(db: sqlite3.Connection) -> int:
    point = load(db)
    return 0 if point is None else point.size
