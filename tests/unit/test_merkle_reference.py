"""The tree, its roots and its proofs against an RFC 6962 reference written here.

The reference is the RFC's recursive definitions, a few lines each, sharing no code with
auditd.proofs. The product side is the real thing: the ingest tree (auditd.proofs.tree)
appending leaves in transactions of a migrated SQLite file, and proofs built from what
it stored (auditd.proofs.prove.StoredTree reads the stored nodes and the records).
Records are dead letters' (a store may hold nothing else), so no daemon is needed.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
from pathlib import Path

import pytest
from partition_events import varied_items

from auditd.proofs import merkle
from auditd.proofs.prove import StoredTree
from auditd.proofs.tree import Edge, Node, Tree, append, append_many
from auditd.store.migrations import migrate
from auditd.store.records import dead_letter_record, event_leaf_hashes, record_bytes
from auditd.store.statements import transaction

VECTORS = Path("/work/shared/spec/rfc6962-vectors.json")
_SPEC_VECTORS = Path(__file__).resolve().parents[2] / "docs" / "rfc6962-vectors.json"


# -- the reference (RFC 6962 section 2.1, RFC 9162 section 2.1) ------------------------

def ref_leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def ref_mth(leaves: list[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaves[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + ref_mth(leaves[:k]) + ref_mth(leaves[k:])).digest()


def ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    n = len(leaves)
    if n <= 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*ref_path(m, leaves[:k]), ref_mth(leaves[k:])]
    return [*ref_path(m - k, leaves[k:]), ref_mth(leaves[:k])]


def ref_proof(m: int, leaves: list[bytes]) -> list[bytes]:
    def sub(m: int, d: list[bytes], whole: bool) -> list[bytes]:
        n = len(d)
        if m == n:
            return [] if whole else [ref_mth(d)]
        k = 1
        while k * 2 < n:
            k *= 2
        if m <= k:
            return [*sub(m, d[:k], whole), ref_mth(d[k:])]
        return [*sub(m - k, d[k:], False), ref_mth(d[:k])]
    return sub(m, leaves, True)


# -- the product, on a real SQLite file -------------------------------------------------

def _record(seq: int) -> bytes:
    return dead_letter_record(seq, "test", f"reason {seq}", f"raw {seq}".encode())


class Built:
    def __init__(self, tmp: Path, size: int, one_by_one: int) -> None:
        self.db = sqlite3.connect(tmp / "auditd.db", isolation_level=None)
        migrate(self.db)
        self.tree = Tree()
        self.tree.load(self.db)
        self.roots: dict[int, bytes] = {}
        self.leaves: list[bytes] = []
        rng = random.Random(7)
        seq = 0
        while seq < size:
            step = 1 if seq < one_by_one else rng.randint(1, 700)
            batch = list(range(seq + 1, min(size, seq + step) + 1))
            with transaction(self.db):
                self.db.executemany(
                    "INSERT INTO dead_letters (seq, source, code, reason, raw, size, uid,"
                    " attempts, first_failed_at, last_failed_at)"
                    " VALUES (?, 'writer', 'test', ?, ?, 1, NULL, 1, 0, 0)",
                    [(s, f"reason {s}", f"raw {s}".encode()) for s in batch])
                self.tree.extend(self.db, [(s, _record(s)) for s in batch])
            self.tree.committed()
            seq = batch[-1]
            self.roots[seq] = self.tree.edge.root()
            self.leaves += [ref_leaf(_record(s)) for s in batch]
        self.db.execute("BEGIN")
        self.stored = StoredTree(self.db, tmp / "partitions")

    def close(self) -> None:
        self.stored.close()
        self.db.execute("COMMIT")
        self.db.close()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Built:
    built = Built(tmp_path_factory.mktemp("small"), 1100, 300)
    yield built  # type: ignore[misc]
    built.close()


def test_vectors_from_the_spec() -> None:
    path = VECTORS if VECTORS.exists() else _SPEC_VECTORS
    vectors = json.loads(path.read_text())
    leaves = [merkle.leaf_hash(bytes.fromhex(x)) for x in vectors["leaves_hex"]]
    for i, root_hex in enumerate(vectors["roots_hex"]):
        assert merkle.root_of(leaves[:i + 1]).hex() == root_hex
        assert ref_mth(leaves[:i + 1]).hex() == root_hex


def test_roots_for_every_size_1_to_300(small: Built) -> None:
    for n in range(1, 301):
        assert small.roots[n] == ref_mth(small.leaves[:n]), n
        assert small.stored.subtree(0, n) == small.roots[n], n


def test_inclusion_proofs_for_every_size_1_to_300(small: Built) -> None:
    rng = random.Random(1)
    for n in range(1, 301):
        indices = range(n) if n <= 48 else [*rng.sample(range(n), 8), 0, n - 1]
        for i in indices:
            path = merkle.inclusion_path(i, n, small.stored.subtree)
            assert path == ref_path(i, small.leaves[:n]), (i, n)
            root = merkle.root_from_inclusion(i, n, small.leaves[i], path)
            assert root == small.roots[n]


def test_consistency_proofs_for_every_size_1_to_300(small: Built) -> None:
    rng = random.Random(2)
    for n in range(1, 301):
        olds = range(1, n + 1) if n <= 40 else [*rng.sample(range(1, n + 1), 6), 1, n]
        for m in olds:
            path = merkle.consistency_path(m, n, small.stored.subtree)
            assert path == ref_proof(m, small.leaves[:n]), (m, n)
            assert merkle.consistent(m, n, small.roots[m], small.roots[n], path)
            if path:
                bad = [bytes([path[0][0] ^ 1]) + path[0][1:], *path[1:]]
                assert not merkle.consistent(m, n, small.roots[m], small.roots[n], bad)


def test_random_larger_sizes(tmp_path: Path) -> None:
    built = Built(tmp_path, 70_000, 0)
    try:
        rng = random.Random(3)
        sizes = [*sorted(rng.sample(sorted(built.roots), 3)), max(built.roots)]
        for n in sizes:
            reference_root = ref_mth(built.leaves[:n])
            assert built.roots[n] == reference_root
            for i in rng.sample(range(n), 3):
                path = merkle.inclusion_path(i, n, built.stored.subtree)
                assert path == ref_path(i, built.leaves[:n])
                assert len(path) <= n.bit_length()
            m = rng.randint(1, n)
            assert merkle.consistency_path(m, n, built.stored.subtree) == \
                ref_proof(m, built.leaves[:n])
    finally:
        built.close()


@pytest.mark.parametrize("seed", range(4))
def test_batched_appends_write_what_one_leaf_at_a_time_writes(seed: int) -> None:
    """append_many (a level at a time) gives the edge and the node rows that `append`
    gives leaf by leaf, whatever the batches."""
    rng = random.Random(seed)
    leaves = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(3000)]
    one, one_nodes = Edge(0, [], bytearray(), bytearray()), list[Node]()
    for leaf in leaves:
        append(one, leaf, one_nodes)
    many, many_nodes, at = Edge(0, [], bytearray(), bytearray()), list[Node](), 0
    while at < len(leaves):
        size = rng.choice([1, 2, 7, 15, 16, 17, 255, 256, 257, 512, 1000,
                           rng.randrange(1, 1500)])
        append_many(many, leaves[at:at + size], many_nodes)
        at += size
    assert sorted(many_nodes) == sorted(one_nodes)
    assert (many.size, many.compact, many.fingerprints, many.groups) == (
        one.size, one.compact, one.fingerprints, one.groups)


def test_the_writers_leaf_hashes_are_the_leaves_of_the_records() -> None:
    """The writer hashes each event's record encoded into one buffer after its 0x00
    (records.event_leaf_hashes): the same leaves as hashing each record E as a whole,
    for events with every field, absent fields and payloads of every size."""
    events = [event for _, _, event in varied_items(400) if event is not None]
    assert len(events) > 300
    assert event_leaf_hashes(events) == [ref_leaf(record_bytes(e)) for e in events]
    assert event_leaf_hashes([]) == []
