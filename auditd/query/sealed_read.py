"""The sealed side of a query: partitions opened by the query engine's own thread.

The store's SealedSet serves ingest's id lookups on its thread; queries must not queue
behind it nor it behind them, so the engine opens its own read-only connection to each
file (immutable files: no locks, an open costs one small read), kept while the
partition is catalogued. Every filter is answered by the partition's own index
(SealedPartition.query); prefixes of `q`, which it does not index, are rechecked here
against the records, as is everything else (cheap, and it keeps one definition of a
match).

Before a partition's index is asked, its term filter (term_filter.py, read once when
the partition is opened and kept while it is catalogued) may rule it out: a value
absent from most partitions (a causation or correlation id, an actor gone quiet, a
misspelt word) then costs a few bit tests per partition, not a probe of its index. A
file sealed before there were filters has none and is always asked.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import structlog

from auditd.query.spec import QuerySpec, matches
from auditd.schema import StoredEvent
from auditd.store.partition.layout import STREAM, term_key
from auditd.store.partition.read import SealedPartition
from auditd.store.partition.term_filter import Probes, TermFilter, probe_groups, probes
from auditd.store.records import event_from_record, is_dead_letter

log = structlog.get_logger("auditd.query.sealed_read")

Files = list[tuple[int, int, Path]]
_UNOPENED = TermFilter(bytes(8), 64)  # a sentinel: the partition is not open yet
DEFAULT_FILTER_BUDGET = 32 << 20  # storage.term_filter_bytes: ~83 partitions of the soak's
_CACHE_KB = 512
_CACHED_BLOCKS = 128  # while a query runs; _KEPT_BLOCKS between queries
_KEPT_BLOCKS = 16


@dataclass(slots=True)
class FilterFigures:
    """What the term filters did, since start (written on the engine's thread; ints,
    so the loop reads them without a lock, at worst one query behind)."""

    probed: int = 0  # partitions whose index a query asked
    skipped: int = 0  # partitions a term filter ruled out, their index not asked
    unfiltered: int = 0  # of those probed: no filter to consult (sealed before filters)
    loaded: int = 0  # partitions open with a filter in memory now
    bytes: int = 0  # those filters' bits
    left_out: int = 0  # filters not kept (or let go) to stay within the memory budget

    def document(self) -> dict[str, Any]:
        return {"partitions_probed": self.probed, "partitions_skipped": self.skipped,
                "partitions_unfiltered": self.unfiltered, "filters": self.loaded,
                "filter_bytes": self.bytes, "filters_over_budget": self.left_out}


class SealedReader:
    """`filter_budget`: bytes the term filters may hold (storage.term_filter_bytes).
    Past it the oldest partitions' filters are let go, so the newest, which queries
    read first, keep theirs; a partition without one is simply asked."""

    def __init__(self, filter_budget: int = DEFAULT_FILTER_BUDGET) -> None:
        self.filter_budget = filter_budget
        self._open: dict[Path, SealedPartition] = {}
        self._filters: dict[Path, TermFilter | None] = {}
        self._catalogued = (0, 0, 0)  # what forget_missing saw last
        self.figures = FilterFigures()

    def close(self) -> None:
        for part in self._open.values():
            part.close()
        self._open.clear()
        self._filters.clear()
        self._catalogued = (0, 0, 0)
        self.figures.loaded = self.figures.bytes = 0

    def _part(self, path: Path) -> SealedPartition:
        part = self._open.get(path)
        if part is None:
            part = self._open[path] = SealedPartition(path)
            # As SealedSet: no mmap (mapped pages of every partition read would count
            # in the daemon's RSS), a page cache of its own per partition.
            part.conn.execute("PRAGMA mmap_size=0")
            part.conn.execute(f"PRAGMA cache_size=-{_CACHE_KB}")
            # A query decodes a candidate's block to recheck it, then again to read its
            # record: enough blocks for one page (~30 KB each) while it runs; after it
            # (rest()), as few as the store's set keeps, so that memory stays bounded
            # however many partitions queries touch.
            part.cached_blocks = _CACHED_BLOCKS
            self._keep_filter(path, _read_filter(part))
        return part

    def _keep_filter(self, path: Path, found: TermFilter | None) -> None:
        figures = self.figures
        while found is not None and figures.bytes + found.nbytes > self.filter_budget:
            # Partition names sort by seq: the oldest holding a filter lets it go, unless
            # this one is older still.
            held = [(p, f) for p, f in self._filters.items() if f is not None]
            figures.left_out += 1
            if not held or min(held, key=itemgetter(0))[0] > path:
                found = None
                break
            oldest, dropped = min(held, key=itemgetter(0))
            self._filters[oldest] = None
            figures.loaded -= 1
            figures.bytes -= dropped.nbytes
        self._filters[path] = found
        if found is not None:
            figures.loaded += 1
            figures.bytes += found.nbytes

    def _may_hold(self, path: Path, groups: list[list[Probes]]) -> bool:
        """Whether the partition at `path` may hold events with these keys (see
        term_filter.probe_groups); counts the answer."""
        figures = self.figures
        if groups:
            found = self._filters.get(path, _UNOPENED)
            if found is _UNOPENED:
                self._part(path)
                found = self._filters[path]
            if found is None:
                figures.unfiltered += 1
            elif found.rules_out(groups):
                figures.skipped += 1
                return False
        figures.probed += 1
        return True

    def warm(self, files: Files) -> int:
        """Open every partition and read its zone map ahead of the first query (newest
        first: if the filters' budget runs out, it is the oldest that go without)."""
        for _, _, path in reversed(files):
            self._part(path).zones()
        return len(files)

    def rest(self) -> None:
        """Between queries: let the decoded blocks go but the last few of each."""
        for part in self._open.values():
            part.drop_blocks(_KEPT_BLOCKS)

    def forget_missing(self, files: Files) -> None:
        """Close partitions no longer catalogued (retention dropped them)."""
        # The catalog is contiguous ranges in seq order: the same count, first and last
        # seq are the same files, and this runs before every query.
        signature = (len(files), files[0][0], files[-1][1]) if files else (0, 0, 0)
        if signature == self._catalogued:
            return
        self._catalogued = signature
        live = {path for _, _, path in files}
        for path in [p for p in self._open if p not in live]:
            self._open.pop(path).close()
            dropped = self._filters.pop(path, None)
            if dropped is not None:
                self.figures.loaded -= 1
                self.figures.bytes -= dropped.nbytes

    def query(self, files: Files, spec: QuerySpec, through: int,
              wanted: int) -> list[StoredEvent]:
        """Up to `wanted` matching events with seq <= through, in the spec's order."""
        self.forget_missing(files)
        if wanted <= 0:
            return []
        filters = spec.partition_filters()
        # Every tag key's values, though the index is asked for the first key's only.
        groups = probe_groups(filters) + [
            keys for values in list(spec.tag_groups.values())[1:]
            for keys in probe_groups({"tag": list(values)})]
        after = spec.after
        before = through + 1 if spec.before is None else min(spec.before, through + 1)
        out: list[StoredEvent] = []
        order = reversed(files) if spec.descending else iter(files)
        for first, last, path in order:
            if (after is not None and last <= after) or first >= before:
                continue
            if not self._may_hold(path, groups):
                continue
            part = self._part(path)
            low, high = after, before
            while len(out) < wanted:
                need = wanted - len(out)
                # Not all indexed (spec.rechecked): ask for more, some will not match.
                ask = need if not spec.rechecked else min(4 * need + 64, 10_000)
                seqs = part.query(filters, since_ns=spec.since_ns, until_ns=spec.until_ns,
                                  after_seq=low, before_seq=high, limit=ask,
                                  descending=spec.descending)
                for record in part.records(seqs):
                    event = event_from_record(record)
                    if matches(event, spec):
                        out.append(event)
                        if len(out) == wanted:
                            break
                if len(seqs) < ask:
                    break
                if spec.descending:
                    high = seqs[-1]
                else:
                    low = seqs[-1]
            if len(out) >= wanted:
                break
        return out

    def events(self, files: Files, seqs: Iterable[int]) -> dict[int, StoredEvent]:
        """The events of these seqs held by sealed partitions (dead letters left out)."""
        found: dict[int, StoredEvent] = {}
        firsts = [first for first, _, _ in files]
        for seq in seqs:
            at = bisect_left(firsts, seq + 1) - 1
            if at < 0 or seq > files[at][1]:
                continue
            record = self._part(files[at][2]).record(seq)
            if record is not None and not is_dead_letter(record):
                found[seq] = event_from_record(record)
        return found

    def seq_of_id(self, files: Files, event_id: str) -> int | None:
        for _, _, path in reversed(files):
            seq = self._part(path).lookup_id(event_id)
            if seq is not None:
                return seq
        return None

    def stream(self, files: Files, spec: QuerySpec, first_ss: int,
               last_ss: int) -> list[StoredEvent]:
        """Sealed events of the spec's one stream with first_ss <= stream_seq <= last_ss,
        by stream_seq, up to spec.limit."""
        (stream,) = spec.values["stream"]
        groups = [[probes(term_key(STREAM + stream))]]
        out: list[StoredEvent] = []
        for _, _, path in files:
            if not self._may_hold(path, groups):
                continue
            part = self._part(path)
            pairs = part.stream_range(stream, first_ss, last_ss)
            for record in part.records([seq for _, seq in pairs]):
                event = event_from_record(record)
                if matches(event, spec):
                    out.append(event)
                    if len(out) == spec.limit:
                        return out
        return out


def _read_filter(part: SealedPartition) -> TermFilter | None:
    """The partition's term filter; a damaged one is logged and the partition read
    without (its index still answers)."""
    try:
        return part.term_filter()
    except ValueError as exc:
        log.warning("term_filter_unreadable", partition=part.path.name, error=str(exc))
        return None
