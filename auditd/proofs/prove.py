"""Inclusion and consistency proofs from the stored tree (proofs.md, "Proofs").

A subtree hash [lo, hi) comes from stored nodes when the subtree is perfect, aligned
and of height 8 or more (merkle_nodes) or 4 (a tile's 16-leaf groups),
from its two halves otherwise, and from the leaves of its 16-leaf group below height
4: those are hashed from the group's records (at most 16, read once per proof).

Sizes must be those of stored checkpoints: the daemon keeps every one it issued, until
retention deletes those smaller than its prune point (prune_point.py); the prune point's
own checkpoint stands for its size, and a subtree below it comes from its compact range.
"""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path
from typing import Any

from auditd.errors import AuditdError
from auditd.proofs import prune_point
from auditd.proofs.merkle import (
    HASH_BYTES,
    compact_heights,
    consistency_path,
    inclusion_path,
    leaf_hash,
    node_hash,
    root_of,
    split_point,
)
from auditd.proofs.records import RecordSource
from auditd.proofs.tree import GROUP_HEIGHT, GROUP_WIDTH, TILE_HEIGHT, TILE_WIDTH, load_edge


class ProofError(AuditdError):
    """A proof that cannot be given: `status` is the HTTP answer (404, 400)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class StoredTree:
    """The tree as stored in one read snapshot of `db` (the caller holds BEGIN)."""

    def __init__(self, db: sqlite3.Connection, partitions_dir: Path) -> None:
        self.db = db
        self.edge = load_edge(db)
        self.size = self.edge.size
        self.source = RecordSource(db, partitions_dir)
        self._leaves: dict[int, list[bytes]] = {}  # group -> leaf hashes
        self._groups: dict[int, bytes] = {}  # tile -> its groups' roots
        self.pruned = prune_point.load(db)
        self.pruned_size = 0 if self.pruned is None else self.pruned.size
        self._pruned_nodes = {} if self.pruned is None else self.pruned.nodes()

    def close(self) -> None:
        self.source.close()

    def record(self, seq: int) -> bytes | None:
        return dict(self.source.records(seq, seq)).get(seq)

    def group_leaves(self, group: int) -> list[bytes]:
        leaves = self._leaves.get(group)
        if leaves is None:
            start = group * GROUP_WIDTH + 1
            # Seqs at or below the prune point are gone: placeholders nobody reads
            # (a subtree reaching below it is _across_prune's).
            first = max(start, self.pruned_size + 1)
            last = min(self.size, start + GROUP_WIDTH - 1)
            got = dict(self.source.records(first, last))
            if len(got) != last - first + 1:
                gone = next(s for s in range(first, last + 1) if s not in got)
                raise ProofError(500, "record_missing", f"seq {gone} holds no record: "
                                 "run `auditd verify`")
            leaves = self._leaves[group] = [b""] * (first - start) + [
                leaf_hash(got[s]) for s in range(first, last + 1)]
        return leaves

    def group_root(self, group: int) -> bytes:
        tile = group >> (TILE_HEIGHT - GROUP_HEIGHT)
        groups = self._groups.get(tile)
        if groups is None:
            if tile < self.size >> TILE_HEIGHT:
                row = self.db.execute("SELECT groups FROM merkle_nodes WHERE height = ?"
                                      " AND idx = ?", (TILE_HEIGHT, tile)).fetchone()
                groups = b"" if row is None or row[0] is None else bytes(row[0])
            else:
                groups = bytes(self.edge.groups)
            self._groups[tile] = groups
        at = (group % (TILE_WIDTH // GROUP_WIDTH)) * HASH_BYTES
        if len(groups) >= at + HASH_BYTES:
            return groups[at:at + HASH_BYTES]
        return root_of(self.group_leaves(group))

    def subtree(self, lo: int, hi: int) -> bytes:
        """The hash of leaves [lo, hi) (leaf index = seq - 1)."""
        n = hi - lo
        if lo < self.pruned_size:
            return self._across_prune(lo, hi)
        if n & (n - 1) == 0 and lo % n == 0:
            height = n.bit_length() - 1
            if height < GROUP_HEIGHT:
                group = lo >> GROUP_HEIGHT
                start = lo - group * GROUP_WIDTH
                return root_of(self.group_leaves(group)[start:start + n])
            if height == GROUP_HEIGHT:
                return self.group_root(lo >> GROUP_HEIGHT)
            if height >= TILE_HEIGHT:
                row = self.db.execute(
                    "SELECT hash FROM merkle_nodes WHERE height = ? AND idx = ?",
                    (height, lo >> height)).fetchone()
                if row is not None:
                    return bytes(row[0])
        k = split_point(n) if n & (n - 1) else n // 2
        return node_hash(self.subtree(lo, lo + k), self.subtree(lo + k, hi))

    def _across_prune(self, lo: int, hi: int) -> bytes:
        """A subtree that starts below the prune point: a compact hash of it when it
        lies wholly below, else a stored node (retention keeps those that reach past
        the prune point) or its two halves; never a record or a group below it."""
        if hi <= self.pruned_size:
            found = self._pruned_nodes.get((lo, hi))
            if found is None:
                raise ProofError(404, "pruned", f"seqs {lo + 1}..{hi} were deleted by "
                                 f"retention (prune point {self.pruned_size})")
            return found
        n = hi - lo
        if n & (n - 1) == 0 and lo % n == 0 and n >= TILE_WIDTH:
            row = self.db.execute("SELECT hash FROM merkle_nodes WHERE height = ? AND idx = ?",
                                  (n.bit_length() - 1, lo // n)).fetchone()
            if row is not None:
                return bytes(row[0])
        k = split_point(n) if n & (n - 1) else n // 2
        return node_hash(self.subtree(lo, lo + k), self.subtree(lo + k, hi))


def compact_range(tree: StoredTree, size: int) -> tuple[bytes, ...]:
    """The compact range of the tree's first `size` leaves, from what is stored."""
    hashes, lo = [], 0
    for height in compact_heights(size):
        hashes.append(tree.subtree(lo, lo + (1 << height)))
        lo += 1 << height
    return tuple(hashes)


def checkpoint_at(db: sqlite3.Connection, size: int | None) -> tuple[int, str]:
    """The newest stored checkpoint of `size` (default: the newest of all)."""
    if size is None:
        row = db.execute("SELECT size, text FROM checkpoints ORDER BY id DESC LIMIT 1"
                         ).fetchone()
        if row is None:
            raise ProofError(404, "no_checkpoint", "no checkpoint has been issued yet")
    else:
        row = db.execute("SELECT size, text FROM checkpoints WHERE size = ?"
                         " ORDER BY id DESC LIMIT 1", (size,)).fetchone()
        pruned = prune_point.load(db)
        if row is None and pruned is not None and size <= pruned.size:
            if size == pruned.size:
                return size, pruned.checkpoint
            raise ProofError(404, "pruned", f"size {size}: retention deleted the seqs "
                             f"through {pruned.size}, and the checkpoints below that")
        if row is None:
            raise ProofError(404, "no_checkpoint",
                             f"size {size}: no stored checkpoint has that size")
    return int(row[0]), str(row[1])


def inclusion(db: sqlite3.Connection, partitions_dir: Path, seq: int,
              size: int | None = None) -> dict[str, Any]:
    """The inclusion proof document of `seq` in the checkpoint of `size`."""
    db.execute("BEGIN")
    try:
        tree_size, text = checkpoint_at(db, size)
        if not 1 <= seq <= tree_size:
            raise ProofError(404, "not_found", f"seq {seq} is not in the checkpoint of "
                             f"size {tree_size}")
        tree = StoredTree(db, partitions_dir)
        try:
            if seq <= tree.pruned_size:
                raise ProofError(404, "pruned", f"seq {seq} was deleted by retention "
                                 f"(prune point {tree.pruned_size})")
            record = tree.record(seq)
            if record is None:
                raise ProofError(404, "not_found", f"seq {seq}: no record is stored")
            path = inclusion_path(seq - 1, tree_size, tree.subtree)
        finally:
            tree.close()
    finally:
        db.execute("COMMIT")
    return {"seq": seq, "index": seq - 1, "size": tree_size, "record": _b64(record),
            "path": [_b64(h) for h in path], "checkpoint": text}


def consistency(db: sqlite3.Connection, partitions_dir: Path, old: int,
                new: int) -> dict[str, Any]:
    if not 0 < old <= new:
        raise ProofError(400, "bad_request",
                         f"from={old}, to={new}: expected 0 < from <= to")
    db.execute("BEGIN")
    try:
        _, old_text = checkpoint_at(db, old)
        _, new_text = checkpoint_at(db, new)
        tree = StoredTree(db, partitions_dir)
        try:
            path = consistency_path(old, new, tree.subtree)
        finally:
            tree.close()
    finally:
        db.execute("COMMIT")
    return {"from": old, "to": new, "path": [_b64(h) for h in path],
            "from_checkpoint": old_text, "checkpoint": new_text}


def record_uid(record: bytes) -> int | None:
    """The uid of an event record (None for a dead letter's): for access checks."""
    from auditd.store.records import event_from_record, is_dead_letter

    if is_dead_letter(record):
        return None
    return event_from_record(record).uid
