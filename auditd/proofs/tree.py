"""The Merkle tree kept at ingest, on the store's thread, in each batch's transaction.

Layout in auditd.db (schema 5):

- `merkle_nodes(height, idx, hash, leaves, groups)`: the root of every complete perfect
  subtree of height 8 or more (256 leaves or more: what C2SP tlog-tiles holds from tile
  level 1 up, one row a hash: about one row per 128 leaves), written once, so that any
  proof reads one row per level above its tile. Height-8 rows
  also keep `leaves`: the first 4 bytes of each of their 256 leaf hashes, so `verify`
  names the one seq that changed rather than its tile; and `groups`: the 16 roots of
  their 16-leaf subtrees, so a proof hashes 16 records, not 256. Leaf hashes themselves are not
  stored: a leaf is SHA-256(0x00 || E) of a stored record.
- `merkle_edge` (one row): the tree's size, its compact range (the right edge: at most
  64 hashes), and the fingerprints and complete 16-leaf groups of the unfinished tile.

Each batch appends its new seqs (events, and dead letters that hold a seq) in seq order,
writes the subtrees it completed and the new edge, all before the batch's COMMIT; the
in-memory state changes only after the COMMIT, so a rolled-back batch leaves nothing.
The roots after recent commits are kept for the checkpointer, which signs the newest
one that is durable.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from hashlib import sha256 as _sha256

import structlog

from auditd.proofs.merkle import HASH_BYTES, fold, leaf_hash
from auditd.store.records import dead_letter_record

log = structlog.get_logger("auditd.proofs.tree")
TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
FINGERPRINT_BYTES = 4
GROUP_HEIGHT = 4
GROUP_WIDTH = 1 << GROUP_HEIGHT
_RECENT_ROOTS = 8192


@dataclass(slots=True)
class Edge:
    """The right edge of the tree: enough to append and to compute the root."""

    size: int
    compact: list[bytes]
    fingerprints: bytearray  # of the leaves of the unfinished bottom tile
    groups: bytearray  # its complete 16-leaf subtrees' roots

    def copy(self) -> Edge:
        return Edge(self.size, list(self.compact), bytearray(self.fingerprints),
                    bytearray(self.groups))

    def root(self) -> bytes:
        return fold(self.compact)


def load_edge(db: sqlite3.Connection) -> Edge:
    row = db.execute("SELECT size, compact, fingerprints, groups FROM merkle_edge").fetchone()
    if row is None:
        return Edge(0, [], bytearray(), bytearray())
    size, compact = int(row[0]), bytes(row[1])
    return Edge(size, [compact[i:i + HASH_BYTES] for i in range(0, len(compact), HASH_BYTES)],
                bytearray(row[2]), bytearray(row[3]))


Node = tuple[int, int, bytes, bytes | None, bytes | None]  # a merkle_nodes row


def append(edge: Edge, leaf: bytes, nodes: list[Node]) -> None:
    """Add one leaf hash to `edge`; completed tile roots go to `nodes` as
    (height, idx, hash, leaf fingerprints, groups) (the last two for height 8 only).
    Called once per leaf on the store's thread: half the leaves merge nothing, and
    they take the first return."""
    n = edge.size
    edge.fingerprints += leaf[:FINGERPRINT_BYTES]
    edge.size = n + 1
    compact = edge.compact
    if not n & 1:
        compact.append(leaf)
        return
    h, height = leaf, 0
    while n >> height & 1:
        h = _sha256(b"\x01" + compact.pop() + h).digest()
        height += 1
        if height == GROUP_HEIGHT:
            edge.groups += h
        elif height >= TILE_HEIGHT:
            fingerprints = groups = None
            if height == TILE_HEIGHT:
                fingerprints, groups = bytes(edge.fingerprints), bytes(edge.groups)
                edge.fingerprints.clear()
                edge.groups.clear()
            nodes.append((height, ((n + 1) >> height) - 1, h, fingerprints, groups))
    compact.append(h)


def append_many(edge: Edge, leaves: list[bytes], nodes: list[Node]) -> None:
    """`append` for each leaf, a level at a time: each level's new nodes are one
    comprehension over its pairs rather than a Python step a leaf (this runs in the
    writer's transaction), and a batch that completes tiles needs no case of its own.
    The edge and the node rows come out as `append` leaves them (rows in another
    order)."""
    n, base = edge.size, edge.size >> TILE_HEIGHT << TILE_HEIGHT
    # Fingerprints and 16-leaf roots from the unfinished tile's first leaf on: a
    # tile's row slices its own out of them.
    fingerprints = edge.fingerprints + b"".join([leaf[:FINGERPRINT_BYTES] for leaf in leaves])
    groups = bytes(edge.groups)
    compact, sha = edge.compact, _sha256
    left_over: list[bytes | None] = []  # per height: the new edge's subtree root, if any
    level, height = leaves, 0
    while level:
        first = n >> height  # index at this height of the level's first node
        if first & 1:  # its left sibling is the edge's last subtree
            level = [compact.pop(), *level]
            first -= 1
        left_over.append(level[-1] if len(level) & 1 else None)  # (zip leaves it out)
        level = [sha(b"\x01" + left + right).digest()
                 for left, right in zip(level[::2], level[1::2], strict=False)]
        height, first = height + 1, first >> 1
        if height == GROUP_HEIGHT:
            groups += b"".join(level)
        elif height == TILE_HEIGHT:
            for index, h in enumerate(level, first):
                at = (index << TILE_HEIGHT) - base
                nodes.append((height, index, h,
                              bytes(fingerprints[at * FINGERPRINT_BYTES:
                                                 (at + TILE_WIDTH) * FINGERPRINT_BYTES]),
                              groups[(at >> GROUP_HEIGHT) * HASH_BYTES:
                                     ((at + TILE_WIDTH) >> GROUP_HEIGHT) * HASH_BYTES]))
        elif height > TILE_HEIGHT:
            nodes.extend([(height, index, h, None, None) for index, h in enumerate(level, first)])
    compact.extend([h for h in reversed(left_over) if h is not None])
    edge.size = n + len(leaves)
    done = (edge.size >> TILE_HEIGHT << TILE_HEIGHT) - base  # leaves in tiles now complete
    edge.fingerprints = fingerprints[done * FINGERPRINT_BYTES:]
    edge.groups = bytearray(groups[(done >> GROUP_HEIGHT) * HASH_BYTES:])


def write(db: sqlite3.Connection, edge: Edge, nodes: list[Node]) -> None:
    if nodes:
        db.executemany("INSERT INTO merkle_nodes VALUES (?, ?, ?, ?, ?)", nodes)
    db.execute("UPDATE merkle_edge SET size = ?, compact = ?, fingerprints = ?, groups = ?",
               (edge.size, b"".join(edge.compact), bytes(edge.fingerprints),
                bytes(edge.groups)))


def fill_gap(db: sqlite3.Connection, seq: int) -> bytes:
    """A dead letter for a seq that holds no record; its record E."""
    code, reason = "missing", "no record held this seq when its leaf was added"
    now = time.time_ns()
    db.execute("INSERT INTO dead_letters (seq, source, code, reason, raw, size, uid,"
               " attempts, first_failed_at, last_failed_at)"
               " VALUES (?, 'writer', ?, ?, x'', 0, NULL, 1, ?, ?)", (seq, code, reason, now, now))
    return dead_letter_record(seq, code, reason, b"")


class Tree:
    """The store thread's tree: `extend` inside a batch's transaction, `committed`
    after its COMMIT. `roots_through(seq)` may be called from any thread."""

    def __init__(self) -> None:
        self.edge = Edge(0, [], bytearray(), bytearray())
        self._next: Edge | None = None
        self._lock = threading.Lock()
        self._roots: deque[tuple[int, bytes]] = deque(maxlen=_RECENT_ROOTS)
        self.enabled = True

    def load(self, db: sqlite3.Connection) -> None:
        self.edge = load_edge(db)
        with self._lock:
            self._roots.clear()
            self._roots.append((self.edge.size, self.edge.root()))

    @property
    def size(self) -> int:
        return self.edge.size

    def extend(self, db: sqlite3.Connection, records: Iterable[tuple[int, bytes]]) -> None:
        """Append the leaves of (seq, E) pairs, in seq order (the caller sorts), skipping
        seqs the tree holds, and write them; the state is swapped in by `committed`.

        A seq skipped (never seen: the writer commits every seq, so this is a bug's
        trace) gets a dead letter of its own, so that every seq stays one record."""
        edge = self.edge.copy()
        nodes: list[Node] = []
        pairs = list(records)
        if pairs and pairs[0][0] == edge.size + 1 and pairs[-1][0] == edge.size + len(pairs):
            # The seqs right after the tree's, gap-free.
            sha = _sha256
            append_many(edge, [sha(b"\x00" + record).digest() for _, record in pairs], nodes)
            pairs = []
        for seq, record in pairs:
            if seq != edge.size + 1:
                if seq <= edge.size:
                    continue  # a seq's second dead letter: its first is the leaf
                while seq > edge.size + 1:
                    log.error("tree_gap_filled", seq=edge.size + 1,
                              note="no record reached the tree for this seq: dead-lettered")
                    append(edge, leaf_hash(fill_gap(db, edge.size + 1)), nodes)
            append(edge, _sha256(b"\x00" + record).digest(), nodes)
        self._stage(db, edge, nodes)

    def append_leaves(self, db: sqlite3.Connection, leaves: list[bytes]) -> None:
        """`extend` for the leaf hashes of the seqs right after the tree's (the writer's
        case: a batch of events, gap-free)."""
        edge, nodes = self.edge.copy(), list[Node]()
        append_many(edge, leaves, nodes)
        self._stage(db, edge, nodes)

    def _stage(self, db: sqlite3.Connection, edge: Edge, nodes: list[Node]) -> None:
        if edge.size != self.edge.size:
            write(db, edge, nodes)
            self._next = edge
        else:
            self._next = None

    def rolled_back(self) -> None:
        self._next = None

    def committed(self) -> None:
        edge, self._next = self._next, None
        if edge is None:
            return
        self.edge = edge
        root = edge.root()
        with self._lock:
            self._roots.append((edge.size, root))

    def roots_through(self, seq: int) -> tuple[int, bytes] | None:
        """The newest committed (size, root) with size <= seq."""
        with self._lock:
            for size, root in reversed(self._roots):
                if size <= seq:
                    return size, root
        return None
