"""A partition's term filter: a Bloom filter over the keys of its terms, so a query can
skip a partition that cannot hold a value without asking the partition's index.

The keys are the partition's own (layout.term_key: CRC-32 of the term's value, seeded
by its field letter), which the builder computes anyway, for every field a query
filters on (type, actor, target, stream, correlation and causation ids, uid, comm,
tags, words); not ids nor dead letters, which no filter asks for. A key the index
could find is always in the filter, so a "no" is certain; a "maybe" is wrong ~1.2 %
of the time at BITS_PER_KEY and HASHES, which costs that probe, never a result.

Probe i of a key is a multiply-shift hash, ((key * M_i) mod 2**64) >> 32, mapped onto
the bit count by another multiply-shift (no modulo). The builder computes every key's
probe at once with big-integer arithmetic: the keys are 128-bit lanes of one integer,
one multiplication hashes them all, and the positions are set in a byte-per-bit array
by a C-level map, packed at the end with eight shifted ORs. A Python loop per key took
about twice as long (~7 % of a seal's CPU here), on the sealer's CPU.

Stored in the partition's meta under FILTER_META: a version byte, the number of hashes,
the bit count (4 bytes, little-endian), then the bits (bit p is bit p % 8 of byte p // 8).
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from itertools import repeat
from typing import Final

from auditd.store.partition.layout import array_bytes, array_from, term_key
from auditd.store.partition.query import filter_terms

FILTER_META: Final = "term_filter"
BITS_PER_KEY: Final = 10
HASHES: Final = 4  # 1.2 % false positives at 10 bits a key (6 hashes: 0.8 %, 1.5 x the build)
_VERSION: Final = 1
_HEADER: Final = 6
# Fixed odd 64-bit multipliers: the filter is read by other processes, so nothing seeded
# per process (Python's hash()) may go into it.
_MULTIPLIERS: Final = (0xBAAC04E6FF57BE67, 0x8DCC4BF6463F7749, 0x87FC4FCE29DD4EE9,
                       0x8EF5E715FD4C1479)
_MASK64: Final = (1 << 64) - 1
_CHUNK_KEYS: Final = 1 << 16  # keys hashed at once: ~1 MB integers, whatever the partition


class TermFilter:
    """A Bloom filter of 32-bit term keys. Immutable once built; any thread may read it."""

    __slots__ = ("bits", "hashes", "size")

    def __init__(self, bits: bytes, size: int, hashes: int = HASHES) -> None:
        if size <= 0 or size % 8 or len(bits) != size // 8:
            raise ValueError(f"term filter: {len(bits)} bytes for {size} bits")
        if not 1 <= hashes <= len(_MULTIPLIERS):
            raise ValueError(f"term filter: {hashes} hashes, at most {len(_MULTIPLIERS)}")
        self.bits, self.size, self.hashes = bits, size, hashes

    @property
    def nbytes(self) -> int:
        return len(self.bits)

    @classmethod
    def build(cls, keys: Iterable[int], hashes: int = HASHES) -> TermFilter:
        """The filter of these keys (repeats allowed: sized by the distinct count)."""
        distinct = array("I", set(keys))
        size = max(64, -(-len(distinct) * BITS_PER_KEY // 64) * 64)
        marks = bytearray(size)  # one byte per bit until packed
        for start in range(0, len(distinct), _CHUNK_KEYS):
            _mark(marks, distinct[start:start + _CHUNK_KEYS], size, _MULTIPLIERS[:hashes])
        packed = 0
        for bit in range(8):
            packed |= int.from_bytes(marks[bit::8], "little") << bit
        return cls(packed.to_bytes(size // 8, "little"), size, hashes)

    def may_hold(self, key: int) -> bool:
        return not self.rules_out([[probes(key)]])

    def rules_out(self, groups: Sequence[Sequence[Probes]]) -> bool:
        """Whether no record here can match: the groups AND, the keys of a group OR (as
        `probes` of each), so one group none of whose keys may be here rules it out.
        Plain loops: a query runs this once per partition."""
        bits, size, count = self.bits, self.size, self.hashes
        for group in groups:
            for hashes in group:
                for at in range(count):
                    position = hashes[at] * size >> 32
                    if not bits[position >> 3] >> (position & 7) & 1:
                        break
                else:
                    break  # this key may be here: the group may match
            else:
                return True
        return False

    def to_bytes(self) -> bytes:
        header = bytes((_VERSION, self.hashes)) + self.size.to_bytes(4, "little")
        return header + self.bits

    @classmethod
    def from_bytes(cls, data: bytes) -> TermFilter:
        """ValueError when `data` is not a term filter this version reads."""
        if len(data) < _HEADER or data[0] != _VERSION:
            raise ValueError(f"term filter: not version {_VERSION} ({len(data)} bytes)")
        return cls(bytes(data[_HEADER:]), int.from_bytes(data[2:_HEADER], "little"), data[1])


def _mark(marks: bytearray, keys: array[int], size: int, multipliers: Sequence[int]) -> None:
    """Set the byte of every probe of every key (see the module's docstring)."""
    count = len(keys)
    wide = array("I", bytes(16 * count))
    wide[0::4] = keys
    lanes = int.from_bytes(array_bytes(wide), "little")
    hashed = array("I", bytes(8 * count))
    for multiplier in multipliers:
        product = array_from("I", (lanes * multiplier).to_bytes(16 * count + 8, "little"))
        hashed[0::2] = product[1:4 * count:4]  # bits 32..63 of key * multiplier
        spread = (int.from_bytes(array_bytes(hashed), "little") * size).to_bytes(
            8 * count + 8, "little")
        positions = array_from("I", spread)[1:2 * count:2]  # hash * size >> 32
        deque(map(marks.__setitem__, positions, repeat(1)), maxlen=0)


Probes = tuple[int, ...]  # a key's 32-bit hash under each multiplier


def probes(key: int) -> Probes:
    """A key's hashes, the same for every partition's filter (each maps them onto its own
    bit count): computed once per query, tested against each partition."""
    return tuple(((key * multiplier) & _MASK64) >> 32 for multiplier in _MULTIPLIERS)


def probe_groups(filters: Mapping[str, Sequence[str]]) -> list[list[Probes]]:
    """What a partition must hold to match these filters (as SealedPartition.query
    takes them): one group per term list the query ANDs, each group an OR of keys."""
    return [[probes(term_key(term)) for term in terms]
            for name, values in filters.items() for terms in filter_terms(name, values)]
