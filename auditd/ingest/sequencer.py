"""Acceptance: assign seq and stream_seq in arrival order, enforce `expect` and `id`.

Runs on the event loop, synchronously, so acceptance order is arrival order and no
lock is needed. Idempotency is decided from three sources, cheapest first: the ids
accepted recently (held until long after they are committed), a Bloom filter over
every stored id (a miss proves the id is new), and, only on a filter hit, a database
lookup that the caller performs before calling accept().
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from sys import intern

from msgspec import UnsetType

from auditd.ingest.validation import ValidEvent
from auditd.schema import StoredEvent, encoder, id_hash, uuid7


class IdFilter:
    """A growing Bloom filter over 64-bit id keys: three probes at 16 or more bits a
    key, about 0.5% false positives. Three unrolled probes rather than seven in a loop:
    this runs twice for every event on the ingest path."""

    def __init__(self, capacity: int = 1 << 20) -> None:
        self._filters: list[tuple[bytearray, int]] = []
        self._limit = 0
        self._count = 0
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        bits = 1 << max(23, (capacity * 16 - 1).bit_length())
        self._filters.append((bytearray(bits // 8), bits - 1))
        self._limit, self._count = capacity, 0

    def add(self, key: int) -> None:
        if self._count >= self._limit:
            self._grow(self._limit * 4)
        bits, mask = self._filters[-1]
        first, step = _probes(key)
        index = first & mask
        bits[index >> 3] |= 1 << (index & 7)
        index = (first + step) & mask
        bits[index >> 3] |= 1 << (index & 7)
        index = (first + 2 * step) & mask
        bits[index >> 3] |= 1 << (index & 7)
        self._count += 1

    def may_contain(self, key: int) -> bool:
        first, step = _probes(key)
        for bits, mask in self._filters:
            index = first & mask
            if not bits[index >> 3] & (1 << (index & 7)):
                continue
            index = (first + step) & mask
            if not bits[index >> 3] & (1 << (index & 7)):
                continue
            index = (first + 2 * step) & mask
            if bits[index >> 3] & (1 << (index & 7)):
                return True
        return False


def _probes(key: int) -> tuple[int, int]:
    """First probe and step (double hashing) for a key. Keys of UUIDv7 ids begin with
    their timestamp, so the bits are spread first: an xor-shift and a multiply
    (Fibonacci hashing)."""
    mixed = (key ^ (key >> 29)) * 0x9E3779B97F4A7C15 & _MASK64
    return mixed >> 32, (mixed & 0xFFFFFFFF) | 1


_MASK64 = (1 << 64) - 1


@dataclass(slots=True)
class Peer:
    pid: int
    uid: int
    gid: int
    comm: str


@dataclass(slots=True)
class Acceptance:
    stored: list[StoredEvent] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)
    duplicates: list[tuple[int, int]] = field(default_factory=list)
    # What undo() needs: the seq before, the streams' previous versions.
    seq_before: int = 0
    streams_before: dict[str, int] = field(default_factory=dict)


class Sequencer:
    def __init__(self, last_seq: int, streams: dict[str, int], recent_limit: int) -> None:
        self.last_seq = last_seq
        self.streams = streams
        self.id_filter = IdFilter()
        self._recent: dict[str, int] = {}
        self._recent_order: deque[str] = deque()
        self._recent_limit = recent_limit
        self.evicted_through = 0  # highest seq whose id left the recent window

    def pending_lookups(self, events: list[ValidEvent]) -> list[str]:
        """Client ids that only the database can tell apart from new ones."""
        recent, may_contain = self._recent, self.id_filter.may_contain
        lookups = []
        for valid in events:
            event_id = valid.event.id
            if event_id is None or event_id in recent:
                continue
            valid.id_hash = hashed = id_hash(event_id)  # kept for accept()
            if may_contain(hashed):
                lookups.append(event_id)
        return lookups

    def accept(self, events: list[ValidEvent], peer: Peer, received_at: int,
               stored_ids: dict[str, int]) -> Acceptance:
        """Sequence a frame's valid events; `stored_ids` are the database's answers."""
        result = Acceptance(seq_before=self.last_seq)
        streams, recent = self.streams, self._recent
        encode = encoder.encode
        for valid in events:
            event = valid.event
            event_id = event.id or uuid7()
            earlier = recent.get(event_id) or stored_ids.get(event_id)
            if earlier is not None:
                result.duplicates.append((valid.index, earlier))
                continue
            stream_seq = None
            if event.stream is not None:
                version = streams.get(event.stream, 0)
                if event.expect is not None and event.expect != version:
                    result.rejected.append((
                        valid.index, "conflict",
                        f"stream {event.stream!r} is at version {version}, "
                        f"not {event.expect}"))
                    continue
                result.streams_before.setdefault(event.stream, version)
                stream_seq = streams[event.stream] = version + 1
            self.last_seq += 1
            recent[event_id] = self.last_seq
            # Interned: a full buffer holds the same few types and actors many times over.
            result.stored.append(StoredEvent(
                self.last_seq, event_id, received_at if valid.ts is None else valid.ts,
                received_at, intern(event.type),
                None if event.actor is None else intern(event.actor),
                None if event.target is None else intern(event.target),
                None if event.stream is None else intern(event.stream),
                stream_seq, event.correlation_id, event.causation_id,
                None if event.tags is None else encode(event.tags),
                None if isinstance(event.data, UnsetType) else bytes(event.data),
                peer.pid, peer.uid, peer.gid, peer.comm,
                id_hash(event_id) if valid.id_hash is None else valid.id_hash))
            result.sizes.append(valid.size)
        return result

    def commit(self, acceptance: Acceptance) -> None:
        """The acceptance is journaled: its ids join the filter and the recent window."""
        order, add = self._recent_order, self.id_filter.add
        for event in acceptance.stored:
            order.append(event.id)
            add(event.id_hash)

    def undo(self, acceptance: Acceptance) -> None:
        """Forget an acceptance whose journal write failed; it must be the latest."""
        self.last_seq = acceptance.seq_before
        for event in acceptance.stored:
            self._recent.pop(event.id, None)
        self.streams.update(acceptance.streams_before)
        for stream, version in acceptance.streams_before.items():
            if version == 0:
                del self.streams[stream]

    def restore(self, event: StoredEvent) -> None:
        """Take in a replayed event exactly as it was first sequenced."""
        self.last_seq = max(self.last_seq, event.seq)
        if event.stream is not None and event.stream_seq is not None:
            self.streams[event.stream] = max(self.streams.get(event.stream, 0),
                                             event.stream_seq)
        self._recent[event.id] = event.seq
        self._recent_order.append(event.id)
        self.id_filter.add(event.id_hash)

    def trim(self, committed_seq: int) -> None:
        """Drop ids of committed events beyond the window; the filter still holds them."""
        order, recent = self._recent_order, self._recent
        while len(order) > self._recent_limit:
            oldest = order[0]
            seq = recent.get(oldest, 0)
            if seq > committed_seq:
                break
            order.popleft()
            recent.pop(oldest, None)
            self.evicted_through = max(self.evicted_through, seq)
