"""RingBuffer: a fixed-capacity circular array between ingest and the writer. No I/O.

Three absolute positions only ever grow: `_start` (oldest retained slot), `_committed`
(first pending slot) and `_end` (next free slot). Slots in [_committed, _end) are
pending: accepted but not yet committed, and never overwritten. Slots in
[_start, _committed) are the recently committed window kept for hot reads; a push
overwrites the oldest of them when the array is full, and a commit lets the oldest go
while the window holds more than `window_bytes` (an eighth of max_bytes by default):
counted in events alone, a window of big events held hundreds of MB for nothing. The
slot of position p is p % capacity.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar


class Entry(Protocol):
    @property
    def seq(self) -> int: ...

    @property
    def correlation_id(self) -> str | None: ...


T = TypeVar("T", bound=Entry)
# Most entries one commit or push lets go of the recent window (see _evict_to_fit).
_EVICT_STEP = 512


class RingBuffer(Generic[T]):
    def __init__(self, capacity: int, max_bytes: int, window_bytes: int | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.window_bytes = max_bytes // 8 if window_bytes is None else window_bytes
        self.window_size = 0  # bytes of the committed entries in [_start, _committed)
        self._slots: list[T | None] = [None] * capacity
        self._sizes: list[int] = [0] * capacity
        self._start = 0
        self._committed = 0
        self._end = 0
        self.pending_bytes = 0
        self._by_correlation: dict[str, deque[int]] = {}

    @property
    def pending(self) -> int:
        return self._end - self._committed

    @property
    def free(self) -> int:
        return self.capacity - self.pending

    def has_room(self, count: int, size: int) -> bool:
        """Whether `count` more events of `size` bytes fit under both bounds.

        The byte bound always admits one batch into an empty buffer, so an event
        larger than max_bytes cannot wedge ingest forever.
        """
        if count > self.free:
            return False
        return self.pending == 0 or self.pending_bytes + size <= self.max_bytes

    def below_low_water(self) -> bool:
        """Blocked senders resume only well below the bounds, to avoid flapping."""
        return (self.pending <= self.capacity * 3 // 4
                and self.pending_bytes <= self.max_bytes * 3 // 4)

    def push(self, entries: Iterable[T], sizes: Iterable[int]) -> None:
        """Append pending entries; the caller checked has_room()."""
        slots, byte_sizes, capacity = self._slots, self._sizes, self.capacity
        index = self._by_correlation
        pushed_from = self._end
        for entry, size in zip(entries, sizes, strict=True):
            position = self._end
            if position - self._committed >= capacity:
                raise OverflowError("ring buffer full")
            if position - self._start >= capacity:
                self._evict_oldest()
            slot = position % capacity
            slots[slot] = entry
            byte_sizes[slot] = size
            self.pending_bytes += size
            correlation = entry.correlation_id
            if correlation is not None:
                positions = index.get(correlation)
                if positions is None:
                    index[correlation] = deque((position,))
                else:
                    positions.append(position)
            self._end = position + 1
        if self.window_size > self.window_bytes:  # at least as many go as came
            self._evict_to_fit(self._end - pushed_from + _EVICT_STEP)

    def _evict_oldest(self) -> None:
        slot = self._start % self.capacity
        entry = self._slots[slot]
        self._slots[slot] = None
        self.window_size -= self._sizes[slot]
        if entry is not None and entry.correlation_id is not None:
            positions = self._by_correlation[entry.correlation_id]
            positions.popleft()
            if not positions:
                del self._by_correlation[entry.correlation_id]
        self._start += 1

    def peek_pending(self, limit: int, skip: int = 0) -> list[T]:
        """The oldest pending entries after the first `skip`, at most `limit`; they stay
        pending until mark_committed()."""
        first = self._committed + skip
        return self._between(first, min(self._end, first + limit))

    def mark_committed(self, count: int) -> None:
        """The first `count` pending entries are durable; they join the recent window.

        Runs on the event loop after every commit of up to a few thousand entries:
        slices, not a Python step per entry, where it can (one 4,096-entry commit cost
        the loop ~5 ms in per-entry steps, a stall every polite writer's reply felt)."""
        if count > self.pending:
            raise ValueError("cannot commit more than is pending")
        sizes = self._sizes
        moved = sum(sum(sizes[a:b]) for a, b in self._spans(self._committed,
                                                             self._committed + count))
        self.pending_bytes -= moved
        self.window_size += moved
        self._committed += count
        if self.window_size > self.window_bytes:
            self._evict_to_fit(_EVICT_STEP)

    def _evict_to_fit(self, most: int) -> None:
        """Let up to `most` of the oldest committed entries go, while the window holds
        more than window_bytes. Bounded, so that a big commit's evictions are spread
        over the pushes after it (each also evicts) instead of stalling the loop at
        once: the window may stay over its bound by one commit's bytes meanwhile."""
        sizes, capacity = self._sizes, self.capacity
        stop, committed = self._start, min(self._committed, self._start + most)
        excess = self.window_size - self.window_bytes
        while excess > 0 and stop < committed:
            excess -= sizes[stop % capacity]
            stop += 1
        slots, index = self._slots, self._by_correlation
        for a, b in self._spans(self._start, stop):
            self.window_size -= sum(sizes[a:b])
            evicted = slots[a:b]
            slots[a:b] = [None] * (b - a)
            for entry in evicted:
                correlation = entry.correlation_id if entry is not None else None
                if correlation is not None:
                    positions = index[correlation]
                    positions.popleft()
                    if not positions:
                        del index[correlation]
        self._start = stop

    def _spans(self, first: int, stop: int) -> list[tuple[int, int]]:
        """The slot ranges of positions [first, stop): one, or two where it wraps."""
        if stop <= first:
            return []
        capacity = self.capacity
        a = first % capacity
        b = a + (stop - first)
        return [(a, b)] if b <= capacity else [(a, capacity), (0, b - capacity)]

    def _between(self, first: int, stop: int) -> list[T]:
        slots = self._slots
        found: list[T] = []
        for a, b in self._spans(first, stop):
            found.extend(slots[a:b])  # type: ignore[arg-type]  # retained: never None
        return found

    def recent(self, count: int) -> list[T]:
        """The last `count` committed entries, oldest first."""
        return self._between(max(self._start, self._committed - count), self._committed)

    def by_correlation(self, correlation_id: str) -> list[T]:
        """Every retained entry (committed or pending) of one correlation, in seq order."""
        return [self._at(p) for p in self._by_correlation.get(correlation_id, ())]

    def committed_by_seq(self, seqs: Iterable[int]) -> dict[int, T]:
        """The entries of the committed window that hold these seqs (queries read
        recent events from here rather than from the database).

        Safe to call from another thread than the loop's: it only reads, each read is
        atomic under the GIL, and an entry is returned only if it holds the very seq
        asked for; a window moving meanwhile can only make it miss."""
        slots, capacity = self._slots, self.capacity
        low, high = self._start, self._committed

        def seq_at(position: int) -> int:
            entry = slots[position % capacity]
            return -1 if entry is None else entry.seq

        found: dict[int, T] = {}
        if low >= high:
            return found
        first, last = seq_at(low), seq_at(high - 1)
        for seq in seqs:
            if first <= seq <= last:
                position = bisect_left(range(low, high), seq, key=seq_at)
                entry = slots[position % capacity] if position < high else None
                if entry is not None and entry.seq == seq:
                    found[seq] = entry
        return found

    def oldest_retained_seq(self) -> int | None:
        if self._start == self._end:
            return None
        return self._at(self._start).seq

    def oldest_pending(self) -> T | None:
        return self._at(self._committed) if self.pending else None

    def _at(self, position: int) -> T:
        entry = self._slots[position % self.capacity]
        assert entry is not None
        return entry
