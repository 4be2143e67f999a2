"""HotIndex: the hot table's filter columns kept in memory as packed arrays.

One slot per committed hot event, in seq order. Each filter field is a `bytearray` of
4-byte keys, searched newest-first with C-speed `rfind` (hot_search.py): the interned
`names` id for type, actor, target, stream and comm (the writer has them in hand), the
uid itself, and 32 bits of the string hash of correlation and causation ids (a hit
off a 4-byte boundary is skipped by the search). `tags` has one key per `k=v` with the
slot it belongs to. `ts` is an `array('q')` with min/max per ZONE slots. Text for `q`
is the event's type, actor, target and raw tags and data bytes, ASCII-lower-cased, end
to end (substring candidates, rechecked against the rows).

Threads: append() and trim() run on the store's thread only (after a commit; after a
seal is opened for reads); readers on any thread take `columns` once and read slots
below its `count`, which append publishes last. trim() builds new columns and swaps the
reference, so a reader keeps a consistent (older) view.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from auditd.query.spec import decode_tags
from auditd.schema import StoredEvent

ZONE = 256
KEY_BYTES = 4
_MASK = 0xFFFF_FFFF
NAME_FIELDS = ("type", "actor", "target", "stream", "comm")
HASH_FIELDS = ("correlation_id", "causation_id")
KEY_FIELDS = (*NAME_FIELDS, *HASH_FIELDS, "uid")
# Positions in statements.event_row's tuple.
_ROW = {"seq": 0, "ts": 3, "type": 5, "actor": 6, "target": 7, "stream": 8,
        "correlation_id": 10, "causation_id": 11, "tags": 12, "data": 13, "uid": 15,
        "comm": 17}
_TAG_CACHE_MAX = 4096
_SEQ, _TS, _TAGS = itemgetter(_ROW["seq"]), itemgetter(_ROW["ts"]), itemgetter(_ROW["tags"])
# Name ids and uids are stored as they are (a hit off a key boundary is skipped);
# None is 0, which no name id is.
_ALWAYS = [(name, itemgetter(_ROW[name])) for name in ("type", "comm", "uid")]
_OPTIONAL = [(name, itemgetter(_ROW[name])) for name in ("actor", "target", "stream")]
_HASHED = [(name, itemgetter(_ROW[name])) for name in HASH_FIELDS]


def text_key(value: str) -> int:
    """The key of a correlation or causation id, or of a tag `k=v`: 32 bits of the
    process's string hash (the index lives in this process only)."""
    return hash(value) & _MASK


def key_bytes(key: int) -> bytes:
    return key.to_bytes(KEY_BYTES, "little")


@dataclass(slots=True)
class Columns:
    """One consistent set of columns; slots below `count` are complete."""

    count: int = 0
    seqs: array[int] = field(default_factory=lambda: array("q"))
    ts: array[int] = field(default_factory=lambda: array("q"))
    zone_min: array[int] = field(default_factory=lambda: array("q"))
    zone_max: array[int] = field(default_factory=lambda: array("q"))
    keys: dict[str, bytearray] = field(
        default_factory=lambda: {name: bytearray() for name in KEY_FIELDS})
    tag_keys: bytearray = field(default_factory=bytearray)
    tag_slots: array[int] = field(default_factory=lambda: array("q"))  # ordinals
    text: bytearray = field(default_factory=bytearray)
    text_ends: array[int] = field(default_factory=lambda: array("q"))  # absolute
    # Slot 0's ordinal, and text[0]'s absolute offset: a trim slices the arrays and
    # moves these, rather than rewriting every tag's slot and text end.
    base: int = 0
    text_base: int = 0

    def slot_of(self, seq: int) -> int:
        """The slot of the first seq above `seq`."""
        return bisect_right(self.seqs, seq, 0, self.count)

    def text_span(self, slot: int) -> tuple[int, int]:
        """Where slot's text lies in `text`."""
        start = self.text_ends[slot - 1] - self.text_base if slot else 0
        return start, self.text_ends[slot] - self.text_base

    def memory_bytes(self) -> int:
        arrays: list[array[int]] = [self.seqs, self.ts, self.zone_min, self.zone_max,
                                    self.tag_slots, self.text_ends]
        return (sum(a.itemsize * len(a) for a in arrays) + sum(map(len, self.keys.values()))
                + len(self.tag_keys) + len(self.text))


class HotIndex:
    def __init__(self) -> None:
        self.columns = Columns()
        # Events committed out of seq order (a dead letter restored under its seq):
        # few, matched one by one.
        self.stragglers: list[StoredEvent] = []
        self._tag_cache: dict[bytes, tuple[int, ...]] = {}

    def last_seq(self) -> int:
        columns = self.columns
        return int(columns.seqs[columns.count - 1]) if columns.count else 0

    def append(self, events: Sequence[StoredEvent], rows: Sequence[tuple[Any, ...]]) -> None:
        """Index a committed batch: `rows` are its events-table rows (event_row).

        Per column one C-level pass where it can be (map with itemgetter into an
        array): the writer's thread pays for this after every commit."""
        if not rows:
            return
        columns = self.columns
        last = self.last_seq()
        if rows[0][0] <= last:
            self._stragglers(events, rows, last)
            return
        count = columns.count
        columns.seqs.extend(map(_SEQ, rows))
        stamps = list(map(_TS, rows))
        columns.ts.extend(stamps)
        self._zones(columns, count, stamps)
        keys = columns.keys
        for name, get in _ALWAYS:
            keys[name] += array("I", map(get, rows))
        for name, get in _OPTIONAL:
            keys[name] += array("I", [x or 0 for x in map(get, rows)])
        for name, get in _HASHED:
            keys[name] += array("I", [0 if v is None else hash(v) & _MASK
                                      for v in map(get, rows)])
        self._tags(columns, count, list(map(_TAGS, rows)))
        self._text(columns, events)
        columns.count = count + len(rows)  # last: readers see complete slots only

    def _stragglers(self, events: Sequence[StoredEvent], rows: Sequence[tuple[Any, ...]],
                    last: int) -> None:
        late = [event for event in events if event.seq <= last]
        self.stragglers.extend(late)
        self.stragglers.sort(key=lambda event: event.seq)
        fresh = [(e, row) for e, row in zip(events, rows, strict=True) if e.seq > last]
        if fresh:
            self.append([e for e, _ in fresh], [row for _, row in fresh])

    @staticmethod
    def _zones(columns: Columns, first: int, stamps: list[int]) -> None:
        slot = first
        while stamps:
            zone, room = divmod(slot, ZONE)
            part, stamps = stamps[:ZONE - room], stamps[ZONE - room:]
            low, high = min(part), max(part)
            if zone < len(columns.zone_min):
                columns.zone_min[zone] = min(columns.zone_min[zone], low)
                columns.zone_max[zone] = max(columns.zone_max[zone], high)
            else:
                columns.zone_min.append(low)
                columns.zone_max.append(high)
            slot += len(part)

    def _tags(self, columns: Columns, first: int, tags: list[bytes | None]) -> None:
        cache = self._tag_cache
        keys: list[int] = []
        slots: list[int] = []
        for slot, raw in enumerate(tags, columns.base + first):
            if raw is None:
                continue
            found = cache.get(raw)
            if found is None:
                if len(cache) >= _TAG_CACHE_MAX:
                    cache.clear()
                found = cache[raw] = tag_keys(raw)
            keys.extend(found)
            slots.extend([slot] * len(found))
        columns.tag_keys += array("I", keys)
        columns.tag_slots.extend(slots)

    @staticmethod
    def _text(columns: Columns, events: Sequence[StoredEvent]) -> None:
        pieces = [b"".join((f"\x00{e.type}\x00{e.actor or ''}\x00{e.target or ''}\x00"
                            .encode(), e.tags or b"", e.data or b"")) for e in events]
        end = columns.text_base + len(columns.text)
        ends = array("q")
        for piece in pieces:
            end += len(piece)
            ends.append(end)
        columns.text += b"".join(pieces).lower()
        columns.text_ends.extend(ends)

    def trim(self, through_seq: int) -> None:
        """Forget slots at or below `through_seq` (sealed: read from the partition)."""
        old = self.columns
        cut = old.slot_of(through_seq)
        self.stragglers = [e for e in self.stragglers if e.seq > through_seq]
        if cut == 0:
            return
        fresh = Columns()
        fresh.seqs = old.seqs[cut:old.count]
        fresh.ts = old.ts[cut:old.count]
        for name, column in old.keys.items():
            fresh.keys[name] = column[cut * KEY_BYTES:old.count * KEY_BYTES]
        fresh.base = old.base + cut
        tag_from = bisect_left(old.tag_slots, fresh.base)
        fresh.tag_keys = old.tag_keys[tag_from * KEY_BYTES:]
        fresh.tag_slots = old.tag_slots[tag_from:]
        fresh.text_base = old.text_ends[cut - 1]
        fresh.text = old.text[fresh.text_base - old.text_base:]
        fresh.text_ends = old.text_ends[cut:old.count]
        self._zones(fresh, 0, list(fresh.ts))
        fresh.count = old.count - cut
        self.columns = fresh

    def rebuild(self, batches: Iterable[tuple[list[StoredEvent], list[tuple[Any, ...]]]]) -> int:
        """Index the hot table from scratch (at start); returns the slots indexed."""
        self.columns, self.stragglers = Columns(), []
        for events, rows in batches:
            self.append(events, rows)
        return self.columns.count


def tag_keys(raw: bytes) -> tuple[int, ...]:
    return tuple(text_key(f"{key}={value}") for key, value in decode_tags(raw).items())
