"""Candidate slots of the hot index for a QuerySpec, newest first or oldest first.

Each filter is a *seeker*: seek(p) is the nearest slot at or past p (below it when
descending) that the filter may hold, found with `bytearray.rfind`/`find` over its
packed column (a hit not on a key boundary is skipped) and kept per value, since p
only moves one way. Filters AND by leapfrogging: the seekers take turns moving p until
all of them agree, so the rarest filter sets the pace whatever the order. Candidates
are a superset (32-bit hashes, substrings for words): the caller rechecks each row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from auditd.query.hot_index import (
    HASH_FIELDS,
    KEY_BYTES,
    NAME_FIELDS,
    ZONE,
    Columns,
    Spans,
    key_bytes,
    text_key,
)
from auditd.query.spec import QuerySpec

NONE = -1


class Seeker:
    def seek(self, p: int) -> int:
        raise NotImplementedError


def _rfind(data: bytearray, needle: bytes, start: int, end: int, align: int) -> int:
    while True:
        at = data.rfind(needle, start, end)
        if at < 0 or at % align == 0:
            return at
        end = at + len(needle) - 1


def _find(data: bytearray, needle: bytes, start: int, end: int, align: int) -> int:
    while True:
        at = data.find(needle, start, end)
        if at < 0 or at % align == 0:
            return at
        start = at + 1


class KeySeeker(Seeker):
    """Slots whose key in `column` is one of `keys` (an OR), within [lo, hi)."""

    def __init__(self, column: bytearray, keys: list[int], lo: int, hi: int,
                 descending: bool) -> None:
        self.column, self.lo, self.hi, self.descending = column, lo, hi, descending
        self.needles = [key_bytes(key) for key in dict.fromkeys(keys)]
        self.found: list[int | None] = [None] * len(self.needles)

    def _search(self, needle: bytes, p: int) -> int:
        if self.descending:
            at = _rfind(self.column, needle, self.lo * KEY_BYTES, (p + 1) * KEY_BYTES,
                        KEY_BYTES)
        else:
            at = _find(self.column, needle, p * KEY_BYTES, self.hi * KEY_BYTES, KEY_BYTES)
        return NONE if at < 0 else at // KEY_BYTES

    def seek(self, p: int) -> int:
        best = NONE
        for i, needle in enumerate(self.needles):
            at = self.found[i]
            if at is None or (at != NONE and (at > p if self.descending else at < p)):
                at = self.found[i] = self._search(needle, p)
            if at != NONE and (best == NONE or (at > best if self.descending else at < best)):
                best = at
        return best


class TagSeeker(Seeker):
    """Slots holding one of the `k=v` keys: the tag keys' column, mapped to its slots."""

    def __init__(self, columns: Columns, keys: list[int], lo: int, hi: int,
                 descending: bool) -> None:
        self.spans, self.hi, self.descending = columns.tags, hi, descending
        first = self.spans.span(lo)[0] // KEY_BYTES
        last = self.spans.span(hi - 1)[1] // KEY_BYTES
        self.keys = KeySeeker(self.spans.data, keys, first, last, descending)

    def seek(self, p: int) -> int:
        start, end = self.spans.span(p)
        entry = end // KEY_BYTES - 1 if self.descending else start // KEY_BYTES
        if entry < self.keys.lo or entry >= self.keys.hi:
            return NONE
        found = self.keys.seek(entry)
        return NONE if found == NONE else self.spans.slot_at(found * KEY_BYTES, self.hi)


class TextSeeker(Seeker):
    """Slots whose lowered text in `spans` holds `needle` (a substring: a candidate)."""

    def __init__(self, spans: Spans, needle: bytes, lo: int, hi: int,
                 descending: bool) -> None:
        self.spans, self.needle, self.lo, self.hi = spans, needle, lo, hi
        self.descending = descending
        self.found: int | None = None

    def seek(self, p: int) -> int:
        at = self.found
        if at is not None and (at == NONE or (at <= p if self.descending else at >= p)):
            return at
        spans = self.spans
        if self.descending:
            pos = spans.data.rfind(self.needle, spans.span(self.lo)[0], spans.span(p)[1])
        else:
            pos = spans.data.find(self.needle, spans.span(p)[0], spans.span(self.hi - 1)[1])
        self.found = slot = NONE if pos < 0 else spans.slot_at(pos, self.hi)
        return slot


class TimeSeeker(Seeker):
    """Slots with since <= ts < until: zones out of range skipped whole."""

    def __init__(self, columns: Columns, since: int | None, until: int | None, lo: int,
                 hi: int, descending: bool) -> None:
        self.columns, self.lo, self.hi, self.descending = columns, lo, hi, descending
        self.since = -(1 << 63) if since is None else since
        self.until = (1 << 63) if until is None else until

    def seek(self, p: int) -> int:
        columns, since, until = self.columns, self.since, self.until
        ts, zmin, zmax = columns.ts, columns.zone_min, columns.zone_max
        step = -1 if self.descending else 1
        while self.lo <= p < self.hi:
            zone = p // ZONE
            if zmax[zone] < since or zmin[zone] >= until:
                p = zone * ZONE - 1 if self.descending else (zone + 1) * ZONE
                continue
            if since <= ts[p] < until:
                return p
            p += step
        return NONE


def word_needle(word: str) -> bytes:
    """What to look for in the lowered text: the word's longest run that bytes.lower()
    leaves as a lower-casing of the whole would (ASCII, or without case)."""
    runs, current = [], ""
    for char in word:
        if char.isascii() or char.lower() == char.upper():
            current += char
        else:
            runs.append(current)
            current = ""
    runs.append(current)
    return max(runs, key=len).encode() or word.encode()


def seekers(columns: Columns, spec: QuerySpec, name_ids: Mapping[str, int], lo: int, hi: int
            ) -> list[Seeker] | None:
    """One seeker per filter; None when a filter cannot match any hot slot."""
    descending = spec.descending
    found: list[Seeker] = []
    groups = [(name, values) for name, values in spec.values.items() if name != "tag"]
    groups += [("tag", values) for values in spec.tag_groups.values()]
    for name, values in groups:
        if name in NAME_FIELDS:
            keys = [name_ids[v] for v in values if v in name_ids]
        elif name in HASH_FIELDS:
            keys = [text_key(v) for v in values]
        else:
            keys = [text_key(v) for v in values]  # tag k=v
        if not keys:
            return None
        if name == "tag":
            found.append(TagSeeker(columns, keys, lo, hi, descending))
        else:
            found.append(KeySeeker(columns.keys[name], keys, lo, hi, descending))
    if spec.uids is not None:
        if not spec.uids:
            return None
        found.append(KeySeeker(columns.keys["uid"], list(spec.uids), lo, hi,
                               descending))
    for word in (*spec.words, *spec.prefixes):
        needle = word_needle(word)
        found.append(TextSeeker(columns.text, needle, lo, hi, descending))
    if spec.since_ns is not None or spec.until_ns is not None:
        found.append(TimeSeeker(columns, spec.since_ns, spec.until_ns, lo, hi, descending))
    return found


def candidate_slots(columns: Columns, spec: QuerySpec, name_ids: Mapping[str, int],
                    lo: int, hi: int) -> Iterator[int]:
    """Slots in [lo, hi) that may match, in the spec's order."""
    if lo >= hi:
        return
    chosen = seekers(columns, spec, name_ids, lo, hi)
    if chosen is None:
        return
    step = -1 if spec.descending else 1
    p = hi - 1 if spec.descending else lo
    if not chosen:
        while lo <= p < hi:
            yield p
            p += step
        return
    count = len(chosen)
    while lo <= p < hi:
        agreed, turn = 0, 0
        while agreed < count:
            q = chosen[turn].seek(p)
            if q == NONE:
                return
            if q == p:
                agreed += 1
            else:
                p, agreed = q, 1
            turn = (turn + 1) % count
        yield p
        p += step


SlotFilter = Callable[[int], bool]
