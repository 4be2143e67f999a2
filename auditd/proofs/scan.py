"""The worker side of `verify`: one seq range's leaves, from a snapshot of its own.

A worker reads seqs [first, last] (hot rows or sealed partitions: every seq is
immutable once committed, so any snapshot that holds it gives the same record), hashes
each record into its leaf, checks it against the leaf fingerprints the tree stored, and
returns the range's tile hashes (256 leaves each), the leaves of the tiles that hold a
checkpoint's edge, and the problems it found, first seq first. Ranges start on a tile
(the first one after a prune point may start inside one).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from hashlib import sha256 as _sha256
from itertools import groupby
from pathlib import Path

from auditd.proofs.merkle import leaf_hash, root_of
from auditd.proofs.records import RecordSource
from auditd.proofs.reseq import with_seq
from auditd.proofs.tree import FINGERPRINT_BYTES as FP
from auditd.proofs.tree import TILE_HEIGHT, TILE_WIDTH

_MAX_PROBLEMS = 20


@dataclass(slots=True)
class Problem:
    seq: int
    kind: str  # modified, missing, reordered, inserted, truncated
    detail: str


@dataclass(slots=True)
class RangeResult:
    first: int
    last: int
    tiles: list[bytes]  # hashes of the complete tiles of the range, in order
    edge_leaves: dict[int, list[bytes]] = field(default_factory=dict)  # tile -> leaves
    problems: list[Problem] = field(default_factory=list)
    records: int = 0


@dataclass(frozen=True, slots=True)
class RangeTask:
    db_path: str
    partitions_dir: str
    first: int  # seq; first - 1 is a multiple of TILE_WIDTH, or the prune point
    last: int
    wanted_tiles: frozenset[int]  # tiles whose leaves the caller needs
    edge_tile: int  # the tree's unfinished tile
    edge_fingerprints: bytes


def scan_range(task: RangeTask) -> RangeResult:
    db = sqlite3.connect(f"file:{task.db_path}?mode=ro", uri=True, isolation_level=None)
    try:
        db.execute("BEGIN")
        return _scan(db, task)
    finally:
        db.close()


def _fingerprints(db: sqlite3.Connection, task: RangeTask) -> dict[int, bytes]:
    lo, hi = (task.first - 1) >> TILE_HEIGHT, (task.last - 1) >> TILE_HEIGHT
    found = {int(i): bytes(b) for i, b in db.execute(
        "SELECT idx, leaves FROM merkle_nodes WHERE height = ? AND idx BETWEEN ? AND ?",
        (TILE_HEIGHT, lo, hi))}
    if lo <= task.edge_tile <= hi:
        found.setdefault(task.edge_tile, task.edge_fingerprints)
    return found


def _scan(db: sqlite3.Connection, task: RangeTask) -> RangeResult:
    """Tile by tile: a whole tile's leaves are hashed and their fingerprints compared in
    one step each; only a tile with a gap or a mismatch is looked at seq by seq."""
    source = RecordSource(db, Path(task.partitions_dir))
    try:
        fingerprints = _fingerprints(db, task)
        result = RangeResult(task.first, task.last, [])
        held: dict[int, bytes] = {}  # records of seqs whose leaf differs, for classify
        bad: list[int] = []
        sha = _sha256
        tiles = groupby(source.records(task.first, task.last), key=_tile_of)
        expected_tile = (task.first - 1) >> TILE_HEIGHT
        last_tile = (task.last - 1) >> TILE_HEIGHT
        for tile, group in tiles:
            while expected_tile < tile:  # a tile with no record at all
                _gap_tile(result, task, source, expected_tile, [])
                expected_tile += 1
            expected_tile = tile + 1
            pairs = list(group)
            first = max(task.first, tile * TILE_WIDTH + 1)
            last = min(task.last, tile * TILE_WIDTH + TILE_WIDTH)
            if len(pairs) != last - first + 1:
                _gap_tile(result, task, source, tile, pairs)
                continue
            leaves = [sha(b"\x00" + record).digest() for _, record in pairs]
            result.records += len(leaves)
            stored = fingerprints.get(tile)
            if stored is not None:
                at = (first - 1) % TILE_WIDTH * FP
                if b"".join([leaf[:FP] for leaf in leaves]) != stored[at:at + len(leaves) * FP]:
                    for (seq, record), leaf in zip(pairs, leaves, strict=True):
                        offset = (seq - 1) % TILE_WIDTH * FP
                        if stored[offset:offset + FP] != leaf[:FP]:
                            bad.append(seq)
                            if len(held) < 4 * _MAX_PROBLEMS:
                                held[seq] = record
            _leaves_done(result, task, tile, leaves)
        while expected_tile <= last_tile:
            _gap_tile(result, task, source, expected_tile, [])
            expected_tile += 1
        for seq in bad[:_MAX_PROBLEMS]:
            if seq in held:
                result.problems.append(_classify(seq, held, fingerprints, source))
        result.problems.sort(key=lambda p: p.seq)
        del result.problems[_MAX_PROBLEMS:]
        return result
    finally:
        source.close()


def _tile_of(pair: tuple[int, bytes]) -> int:
    return (pair[0] - 1) >> TILE_HEIGHT


def _leaves_done(result: RangeResult, task: RangeTask, tile: int, leaves: list[bytes]) -> None:
    if len(leaves) == TILE_WIDTH:
        result.tiles.append(root_of(leaves))
        if tile in task.wanted_tiles:
            result.edge_leaves[tile] = leaves
    else:  # the range's last, unfinished tile
        result.edge_leaves[tile] = leaves


def _gap_tile(result: RangeResult, task: RangeTask, source: RecordSource, tile: int,
              pairs: list[tuple[int, bytes]]) -> None:
    """A tile some of whose seqs hold no record: each named, placeholders hashed in so
    the tiles after it stay aligned (the range is bad either way)."""
    first = max(task.first, tile * TILE_WIDTH + 1)
    last = min(task.last, tile * TILE_WIDTH + TILE_WIDTH)
    got = dict(pairs)
    leaves = []
    for seq in range(first, last + 1):
        record = got.get(seq)
        if record is None:
            leaves.append(b"\x00" * 32)
            if len(result.problems) < _MAX_PROBLEMS:
                damage = source.unreadable.get(seq)
                result.problems.append(
                    Problem(seq, "modified", damage) if damage is not None
                    else Problem(seq, "missing", f"no record holds seq {seq}"))
        else:
            leaves.append(leaf_hash(record))
            result.records += 1
    _leaves_done(result, task, tile, leaves)


def _matches(record: bytes, seq: int, fingerprints: dict[int, bytes]) -> bool:
    moved = with_seq(record, seq)
    if moved is None or seq < 1:
        return False
    stored = fingerprints.get((seq - 1) >> TILE_HEIGHT)
    offset = ((seq - 1) % TILE_WIDTH) * FP
    return stored is not None and stored[offset:offset + FP] == leaf_hash(moved)[:FP]


def _classify(seq: int, held: dict[int, bytes], fingerprints: dict[int, bytes],
              source: RecordSource) -> Problem:
    """Why seq's leaf differs: its record came from another seq (reordered), the next
    seq holds this one's record renumbered (inserted), this seq holds the next one's
    (a row deleted and the rest renumbered: missing), or its content changed."""
    record = held[seq]
    for other, other_record in held.items():
        if other != seq and _matches(other_record, seq, fingerprints) \
                and _matches(record, other, fingerprints):
            return Problem(seq, "reordered",
                           f"seq {seq} holds the record of seq {other}, and {other} this one's")
    following = held.get(seq + 1)
    if following is None:
        following = dict(source.records(seq + 1, seq + 1)).get(seq + 1)
    if following is not None and _matches(following, seq, fingerprints):
        return Problem(seq, "inserted", f"a record was inserted at seq {seq}, and the "
                       "records after it renumbered")
    if _matches(record, seq + 1, fingerprints):
        return Problem(seq, "missing", f"the record of seq {seq} was deleted and the "
                       "records after it renumbered")
    return Problem(seq, "modified", f"the record of seq {seq} is not the one its leaf holds")
