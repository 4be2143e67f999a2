"""Filter queries over one sealed partition: postings intersected window by window.

Each filter is a *source* (the OR of its values' postings). The smallest source
drives: a window of offsets is taken from the top (or bottom) of the seq range, the
driver's postings in it are intersected with every other source's postings in the
same window, survivors that came only from unverified entries (singles, short terms)
or from a zone whose ts range crosses the query's are rechecked against their
records, and windows double until `limit` seqs are found. A window never reads more
of a long term than the chunks that overlap it.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Protocol

from auditd.store.partition.fields import IndexedFields, matches
from auditd.store.partition.layout import (
    FILTER_FIELDS,
    TAG,
    TAG_SEPARATOR,
    WORD,
    ZONE_RECORDS,
    words,
)
from auditd.store.partition.lookup import Run, TermPostings, resolve

_FIRST_WINDOW = 1024


class PartitionView(Protocol):
    """What a query needs of an open partition."""

    count: int
    run: Run
    bits: int

    def fields_at(self, offset: int) -> IndexedFields: ...

    def dead_offsets(self) -> set[int]: ...

    def zones(self) -> Zones: ...


def filter_terms(name: str, values: Sequence[str]) -> list[list[str]]:
    """The term lists (each an OR) that filter `name` ANDs: one for a plain filter,
    one per word for `q` (every word must match)."""
    letter = FILTER_FIELDS.get(name)
    if letter is None:
        raise ValueError(f"unknown filter {name!r}; known: {', '.join(FILTER_FIELDS)}")
    if letter == WORD:
        found = dict.fromkeys(word for value in values for word in words(value))
        return [[WORD + word] for word in found]
    if letter == TAG:
        terms = []
        for value in values:
            key, separator, tag_value = value.partition("=")
            if not separator:
                raise ValueError(f"tag filter {value!r}: expected KEY=VALUE")
            terms.append(TAG + key + TAG_SEPARATOR + tag_value)
        return [terms]
    return [[letter + value for value in values]]


@dataclass
class Source:
    """The OR of some terms of one field."""

    letter: str
    terms: list[str]
    postings: list[TermPostings]

    def estimate(self) -> int:
        return sum(p.estimate() for p in self.postings)

    def between(self, run: Run, lo: int, hi: int) -> tuple[list[int], set[int]]:
        """Offsets in [lo, hi] ascending, and those of them to recheck."""
        exact: set[int] = set()
        unsure: set[int] = set()
        for posting in self.postings:
            for long in posting.exact:
                exact.update(long.between(run, lo, hi))
            found = posting.candidates
            unsure.update(found[bisect_left(found, lo):bisect_right(found, hi)])
        unsure -= exact
        return sorted(exact | unsure), unsure

    def holding(self, run: Run, offsets: list[int]) -> tuple[set[int], set[int]]:
        """Which of the ascending `offsets` this source holds, and which of those to
        recheck."""
        exact: set[int] = set()
        for posting in self.postings:
            for long in posting.exact:
                exact |= long.holds(run, offsets)
        unsure: set[int] = set()
        for posting in self.postings:
            unsure.update(posting.candidates)
        unsure = unsure.intersection(offsets) - exact
        return exact | unsure, unsure


class EverySource(Source):
    """No filter: every offset but the dead letters'."""

    def __init__(self, count: int, dead: set[int]) -> None:
        super().__init__("", [], [])
        self.count, self.dead = count, dead

    def estimate(self) -> int:
        return self.count

    def between(self, run: Run, lo: int, hi: int) -> tuple[list[int], set[int]]:
        return [x for x in range(lo, hi + 1) if x not in self.dead], set()

    def holding(self, run: Run, offsets: list[int]) -> tuple[set[int], set[int]]:
        return set(offsets) - self.dead, set()


class ZoneFilter:
    """Which records' ts may lie in [since, until): per zone of ZONE_RECORDS, 0 none,
    1 all of them (no recheck), 2 some (recheck each)."""

    def __init__(self, zones: Zones, since: int | None, until: int | None) -> None:
        self.low = low = -(1 << 63) if since is None else since
        self.high = high = (1 << 63) if until is None else until
        self.mins, self.maxs = zones.mins, zones.maxs
        self.first = bisect_left(zones.running_max, low)
        self.last = bisect_right(zones.suffix_min, high - 1) - 1

    def state(self, offset: int) -> int:
        zone = offset // ZONE_RECORDS
        if not self.first <= zone <= self.last:
            return 0
        low, high, least, most = self.low, self.high, self.mins[zone], self.maxs[zone]
        if most < low or least >= high:
            return 0
        return 1 if least >= low and most < high else 2

    def admits(self, fields: IndexedFields) -> bool:
        return not fields.dead_letter and self.low <= fields.ts < self.high


class Zones:
    """A partition's zone map. Running maxima of the maxs, and minima of the mins from
    the right, are sorted even when ts is not: the zones that may hold a ts in a range
    lie between two bisects of them."""

    def __init__(self, mins: Sequence[int], maxs: Sequence[int]) -> None:
        self.mins, self.maxs = mins, maxs
        self.running_max = list(accumulate(maxs, max))
        self.suffix_min = list(accumulate(reversed(mins), min))[::-1]


def plan_sources(view: PartitionView, filters: Mapping[str, Sequence[str]]) -> list[Source]:
    sources = []
    for name, values in filters.items():
        for terms in filter_terms(name, values):
            postings = [resolve(view.run, view.bits, term) for term in dict.fromkeys(terms)]
            sources.append(Source(terms[0][0] if terms else "", terms, postings))
    return sources


def execute(view: PartitionView, filters: Mapping[str, Sequence[str]], *, lo: int, hi: int,
            since_ns: int | None, until_ns: int | None, limit: int,
            descending: bool) -> list[int]:
    """Matching offsets in [lo, hi], newest first when `descending`, at most `limit`."""
    if limit <= 0 or lo > hi:
        return []
    zones = None
    if since_ns is not None or until_ns is not None:
        zones = ZoneFilter(view.zones(), since_ns, until_ns)
        lo = max(lo, zones.first * ZONE_RECORDS)
        hi = min(hi, (zones.last + 1) * ZONE_RECORDS - 1)
        if lo > hi:
            return []
    sources = plan_sources(view, filters)
    if any(not source.terms for source in sources):
        return []  # a filter given no value matches nothing
    if not sources:
        sources = [EverySource(view.count, view.dead_offsets())]
    sources.sort(key=Source.estimate)
    driver, others = sources[0], sources[1:]
    if driver.estimate() == 0:
        return []
    density = driver.estimate() / max(1, view.count)
    width = max(_FIRST_WINDOW, int(2 * limit / density)) if density else hi - lo + 1
    found: list[int] = []
    top, bottom = hi, lo
    while bottom <= top and len(found) < limit:
        if descending:
            window_lo, window_hi = max(bottom, top - width + 1), top
            top = window_lo - 1
        else:
            window_lo, window_hi = bottom, min(top, bottom + width - 1)
            bottom = window_hi + 1
        width *= 2
        found.extend(_window(view, driver, others, zones, window_lo, window_hi, descending,
                             limit - len(found)))
    return found


def _window(view: PartitionView, driver: Source, others: list[Source],
            zones: ZoneFilter | None, lo: int, hi: int, descending: bool,
            wanted: int) -> list[int]:
    offsets, unsure = driver.between(view.run, lo, hi)
    recheck: list[tuple[Source, set[int]]] = [(driver, unsure)] if unsure else []
    for other in others:
        if not offsets:
            return []
        present, their_unsure = other.holding(view.run, offsets)
        offsets = [x for x in offsets if x in present]
        if their_unsure:
            recheck.append((other, their_unsure))
    if descending:
        offsets.reverse()
    out: list[int] = []
    for offset in offsets:
        state = zones.state(offset) if zones is not None else 1
        if state == 0:
            continue
        checks = [source for source, unsure_set in recheck if offset in unsure_set]
        if checks or state == 2:
            fields = view.fields_at(offset)
            if not all(matches(fields, s.letter, s.terms) for s in checks):
                continue
            if state == 2 and zones is not None and not zones.admits(fields):
                continue
        out.append(offset)
        if len(out) == wanted:
            break
    return out
