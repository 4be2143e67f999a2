"""RFC 6962 / RFC 9162 Merkle tree arithmetic, with no I/O.

Leaf hash `SHA-256(0x00 || E)`, node hash `SHA-256(0x01 || left || right)`; the tree
over n leaves splits at the largest power of two smaller than n. A *compact range* of
the first n leaves is the list of the roots of the perfect subtrees that n's binary
digits name, largest (leftmost) first: it is all a writer needs to append, and its
right fold is the tree's root.

Proofs are built from a `SubtreeHash` (the hash of leaves [lo, hi)), so the same code
serves the stored tree and the tests' reference implementation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

HASH_BYTES = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
SubtreeHash = Callable[[int, int], bytes]


def leaf_hash(record: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + record).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaves: Sequence[bytes]) -> bytes:
    """MTH over leaf hashes, by repeated pairing (equal to the recursive definition)."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    sha = hashlib.sha256
    while len(level) > 1:
        paired = [sha(b"\x01" + level[i] + level[i + 1]).digest()
                  for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def fold(compact: Sequence[bytes]) -> bytes:
    """The root of a tree from its compact range."""
    if not compact:
        return EMPTY_ROOT
    root = compact[-1]
    for left in reversed(compact[:-1]):
        root = node_hash(left, root)
    return root


def compact_heights(size: int) -> list[int]:
    """The heights of a compact range's subtrees, leftmost first."""
    return [h for h in range(size.bit_length() - 1, -1, -1) if size >> h & 1]


def inclusion_path(index: int, size: int, subtree: SubtreeHash) -> list[bytes]:
    """RFC 9162 2.1.3.1 PATH(index, D[0:size]), leaf-side first."""
    if not 0 <= index < size:
        raise ValueError(f"index {index} is not in a tree of size {size}")
    path: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = split_point(hi - lo)
        if index < lo + k:
            path.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            path.append(subtree(lo, lo + k))
            lo += k
    path.reverse()
    return path


def consistency_path(old: int, new: int, subtree: SubtreeHash) -> list[bytes]:
    """RFC 9162 2.1.4.1 PROOF(old, D[0:new])."""
    if not 0 < old <= new:
        raise ValueError(f"no consistency proof from size {old} to size {new}")
    path: list[bytes] = []

    def subproof(m: int, lo: int, hi: int, whole: bool) -> None:
        n = hi - lo
        if m == n:
            if not whole:
                path.append(subtree(lo, hi))
            return
        k = split_point(n)
        if m <= k:
            subproof(m, lo, lo + k, whole)
            path.append(subtree(lo + k, hi))
        else:
            subproof(m - k, lo + k, hi, False)
            path.append(subtree(lo, lo + k))

    subproof(old, 0, new, True)
    return path


def root_from_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes]) -> bytes:
    """RFC 9162 2.1.3.2: the root that `path` proves `leaf` at `index` into; ValueError
    when the path has the wrong length for (index, size)."""
    if not 0 <= index < size:
        raise ValueError(f"index {index} is not in a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise ValueError("the path is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ValueError("the path is shorter than the tree is deep")
    return r


def consistent(old: int, new: int, old_root: bytes, new_root: bytes,
               path: Sequence[bytes]) -> bool:
    """RFC 9162 2.1.4.2: whether `path` proves the tree of `old` a prefix of `new`'s."""
    if not 0 < old <= new:
        return False
    if old == new:
        return not path and old_root == new_root
    if not path:
        return False
    proof = list(path)
    if old & (old - 1) == 0:  # a power of two: the old root is the first node
        proof.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root
