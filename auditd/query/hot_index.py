"""HotIndex: the hot table's filter columns kept in memory as packed arrays.

One slot per committed hot event, in seq order. Each filter field is a `bytearray` of
4-byte keys, searched newest-first with C-speed `rfind` (hot_search.py): the interned
`names` id for type, actor, target, stream and comm (the writer has them in hand), the
uid itself, and 32 bits of the string hash of correlation and causation ids (a hit
off a 4-byte boundary is skipped by the search). `tags` holds each slot's keys of its `k=v`s
(Spans: bytes per slot end to end, and where each slot ends). `ts` is an `array('q')`
with min/max per ZONE slots. Text for `q` (`text`): type, actor, target and the raw
MessagePack of tags and data, ASCII-lower-cased (substring candidates, rechecked
against the rows).

Threads: append() and trim() run on the store's thread only (after a commit; after a
seal is opened for reads); readers on any thread take `columns` once and read slots
below its `count`, which append publishes last. trim() builds new columns and swaps the
reference, so a reader keeps a consistent (older) view.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
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
_SEQ, _TS = itemgetter(_ROW["seq"]), itemgetter(_ROW["ts"])
_TAGS, _DATA = itemgetter(_ROW["tags"]), itemgetter(_ROW["data"])
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
class Spans:
    """Bytes of varying length per slot, end to end: slot s holds `data` from
    ends[s - 1] to ends[s], less `base` (the absolute offset of data[0]: a trim slices
    `data` and moves `base` rather than rewriting every end)."""

    data: bytearray = field(default_factory=bytearray)
    ends: array[int] = field(default_factory=lambda: array("q"))
    base: int = 0

    def span(self, slot: int) -> tuple[int, int]:
        """Where slot's bytes lie in `data`."""
        start = self.ends[slot - 1] - self.base if slot else 0
        return start, self.ends[slot] - self.base

    def slot_at(self, position: int, hi: int) -> int:
        """The slot (below hi) whose bytes hold data[position]."""
        return bisect_right(self.ends, position + self.base, 0, hi)

    @staticmethod
    def made(end: int, blob: bytes, lengths: Iterable[int]) -> tuple[bytes, array[int]]:
        """`blob` (pieces end to end) and the absolute end of each piece."""
        ends = array("q", accumulate(lengths, initial=end))
        del ends[0]
        return blob, ends

    def extend(self, made: tuple[bytes, array[int]]) -> None:
        self.data += made[0]
        self.ends += made[1]

    def after(self, cut: int, count: int) -> Spans:
        """These spans without the first `cut` slots."""
        base = self.ends[cut - 1]
        return Spans(self.data[base - self.base:], self.ends[cut:count], base)

    def memory_bytes(self) -> int:
        return len(self.data) + self.ends.itemsize * len(self.ends)


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
    tags: Spans = field(default_factory=Spans)  # 4-byte keys of each slot's k=v
    text: Spans = field(default_factory=Spans)  # type, actor, target, raw tags and data

    def slot_of(self, seq: int) -> int:
        """The slot of the first seq above `seq`."""
        return bisect_right(self.seqs, seq, 0, self.count)

    def memory_bytes(self) -> int:
        arrays: list[array[int]] = [self.seqs, self.ts, self.zone_min, self.zone_max]
        return (sum(a.itemsize * len(a) for a in arrays) + sum(map(len, self.keys.values()))
                + self.tags.memory_bytes() + self.text.memory_bytes())


class HotIndex:
    def __init__(self) -> None:
        self.columns = Columns()
        # Events committed out of seq order (a dead letter restored under its seq):
        # few, matched one by one.
        self.stragglers: list[StoredEvent] = []
        self._tag_cache: dict[bytes | None, bytes] = {None: b""}

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
        # Everything made first, then appended: a failure (a name id past 32 bits) must
        # not leave one column longer than the others.
        seqs = array("q", map(_SEQ, rows))
        stamps = array("q", map(_TS, rows))
        made = {name: array("I", map(get, rows)) for name, get in _ALWAYS}
        for name, get in _OPTIONAL:
            made[name] = array("I", [x or 0 for x in map(get, rows)])
        for name, get in _HASHED:
            made[name] = array("I", [0 if v is None else hash(v) & _MASK
                                     for v in map(get, rows)])
        tags = [x or b"" for x in map(_TAGS, rows)]
        tag_keys = self._tags(columns.tags, tags)
        texts = _texts(events, tags, [x or b"" for x in map(_DATA, rows)])
        text = Spans.made(columns.text.base + len(columns.text.data),
                          b"".join(texts).lower(), map(len, texts))
        columns.seqs += seqs
        columns.ts += stamps
        self._zones(columns, count, list(stamps))
        for name, column in made.items():
            columns.keys[name] += column
        columns.tags.extend(tag_keys)
        columns.text.extend(text)
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

    def _tags(self, spans: Spans, tags: list[bytes]) -> tuple[bytes, array[int]]:
        """The packed tag keys of each slot (a map's keys made once: few distinct)."""
        cache = self._tag_cache
        packed = list(map(cache.get, tags))
        if None in packed:
            if len(cache) >= _TAG_CACHE_MAX:
                cache.clear()
                cache[None] = b""
            for at, found in enumerate(packed):
                if found is None:
                    raw = tags[at]
                    found = cache.get(raw)  # made for an earlier slot of this batch?
                    if found is None:
                        found = cache[raw] = array("I", tag_keys(raw)).tobytes()
                    packed[at] = found
        blobs: list[bytes] = packed  # type: ignore[assignment]  # no None left
        return Spans.made(spans.base + len(spans.data), b"".join(blobs), map(len, blobs))

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
        fresh.tags = old.tags.after(cut, old.count)
        fresh.text = old.text.after(cut, old.count)
        self._zones(fresh, 0, list(fresh.ts))
        fresh.count = old.count - cut
        self.columns = fresh

    def rebuild(self, batches: Iterable[tuple[list[StoredEvent], list[tuple[Any, ...]]]]) -> int:
        """Index the hot table from scratch (at start); returns the slots indexed."""
        self.columns, self.stragglers = Columns(), []
        for events, rows in batches:
            self.append(events, rows)
        return self.columns.count


def _texts(events: Sequence[StoredEvent], tags: list[bytes], datas: list[bytes]
           ) -> list[bytes]:
    """Each event's text, one piece a slot: type, actor and target, then the raw
    MessagePack of its tags and data (one buffer: a word absent from the store is
    searched for in one pass, not one per part)."""
    heads = [f"\x00{e.type}\x00{e.actor or ''}\x00{e.target or ''}\x00".encode()
             for e in events]
    return list(map(bytes.__add__, map(bytes.__add__, heads, tags), datas))


def tag_keys(raw: bytes) -> tuple[int, ...]:
    return tuple(text_key(f"{key}={value}") for key, value in decode_tags(raw).items())
