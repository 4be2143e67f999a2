"""A committed batch as followers read it: selectors, selections and their lines.

A `Selector` says which events a follower wants; a `CommittedBatch` answers it once
per batch whatever the number of followers with equal filters: equality filters
through one dict per field and batch, `predicate` only for the rest, lines encoded
once per event and joined once per selector (`Selection.blob`).
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, cast

from auditd.query.lines import event_line
from auditd.schema import StoredEvent

Predicate = Callable[[StoredEvent], bool]
# What an event is assumed to take beyond its data and tags, for the byte bound: the
# Python object, its strings and its JSON line.
_EVENT_OVERHEAD = 600


def event_bytes(event: StoredEvent) -> int:
    return _EVENT_OVERHEAD + len(event.data or b"") + len(event.tags or b"")


@dataclass(frozen=True, slots=True)
class Selector:
    """Which events a follower wants: every field in `equal` has one of its values (an
    index per field and batch answers these, shared by all followers), and `predicate`
    (None: no more conditions) holds. `key` is equal for equal selectors."""

    key: Hashable
    equal: tuple[tuple[str, frozenset[Any]], ...] = ()
    predicate: Predicate | None = None


EVERY_EVENT = Selector("every event")


class Selection:
    """A selector's events in one batch: their encoded lines and how many bytes."""

    __slots__ = ("_blob", "lines", "size")

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines
        self.size = sum(map(len, lines))
        self._blob: bytes | None = None

    def blob(self) -> bytes:
        """Every line joined: one object shared by every follower of this selector."""
        if self._blob is None:
            self._blob = b"".join(self.lines)
        return self._blob


class CommittedBatch:
    """One commit's events, as followers read them; lines are encoded on first read."""

    __slots__ = ("_indexes", "_lines", "_offsets_by_key", "_selections", "bytes_before",
                 "events", "first_index", "last_seq", "published_at", "size")

    def __init__(self, events: list[StoredEvent], last_seq: int, first_index: int,
                 bytes_before: int) -> None:
        self.events = events
        self.last_seq = last_seq  # covered through here, dead letters included
        self.first_index = first_index  # events published before this batch
        self.bytes_before = bytes_before
        self.published_at = time.monotonic()
        self.size = sum(event_bytes(event) for event in events)
        self._lines: list[bytes | None] = [None] * len(events)
        self._indexes: dict[str, dict[Any, list[int]]] = {}
        self._selections: dict[Hashable, Selection] = {}
        self._offsets_by_key: dict[Hashable, list[int]] = {}

    def selects_none(self, selector: Selector) -> bool | None:
        """Whether `selector` selects nothing here; None when that would take running
        its predicate (which the follower does, not the writer's callback)."""
        if selector.predicate is not None:
            return None
        if not selector.equal:
            return not self.events
        return not self._offsets(selector)

    def selection(self, selector: Selector) -> Selection:
        chosen = self._selections.get(selector.key)
        if chosen is None:
            offsets = self._offsets(selector)
            lines, events = self._lines, self.events
            for offset in offsets:
                if lines[offset] is None:
                    lines[offset] = event_line(events[offset])
            chosen = self._selections[selector.key] = Selection(
                cast(list[bytes], [lines[offset] for offset in offsets]))
        return chosen

    def _offsets(self, selector: Selector) -> list[int]:
        found = self._offsets_by_key.get(selector.key)
        if found is None:
            found = self._offsets_by_key[selector.key] = self._select(selector)
        return found

    def _select(self, selector: Selector) -> list[int]:
        offsets: list[int] | None = None
        for field, values in selector.equal:
            index = self._index(field)
            found = sorted(o for value in values for o in index.get(value, ()))
            if offsets is not None:
                keep = set(found)
                found = [o for o in offsets if o in keep]
            offsets = found
            if not offsets:
                return []
        if offsets is None:
            offsets = list(range(len(self.events)))
        if selector.predicate is not None:
            events, predicate = self.events, selector.predicate
            offsets = [o for o in offsets if predicate(events[o])]
        return offsets

    def _index(self, field: str) -> dict[Any, list[int]]:
        index = self._indexes.get(field)
        if index is None:
            index = self._indexes[field] = {}
            for offset, value in enumerate(map(operator.attrgetter(field), self.events)):
                index.setdefault(value, []).append(offset)
        return index
