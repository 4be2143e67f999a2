"""The sealed side of a query: partitions opened by the query engine's own thread.

The store's SealedSet serves ingest's id lookups on its thread; queries must not queue
behind it nor it behind them, so the engine opens its own read-only connection to each
file (immutable files: no locks, an open costs one small read), kept while the
partition is catalogued. Every filter is answered by the partition's own index
(SealedPartition.query); prefixes of `q`, which it does not index, are rechecked here
against the records, as is everything else (cheap, and it keeps one definition of a
match).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from pathlib import Path

from auditd.query.spec import QuerySpec, matches
from auditd.schema import StoredEvent
from auditd.store.partition.read import SealedPartition
from auditd.store.records import event_from_record, is_dead_letter

Files = list[tuple[int, int, Path]]
_CACHE_KB = 512
_CACHED_BLOCKS = 128  # while a query runs; _KEPT_BLOCKS between queries
_KEPT_BLOCKS = 16


class SealedReader:
    def __init__(self) -> None:
        self._open: dict[Path, SealedPartition] = {}

    def close(self) -> None:
        for part in self._open.values():
            part.close()
        self._open.clear()

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
        return part

    def warm(self, files: Files) -> int:
        """Open every partition and read its zone map ahead of the first query."""
        for _, _, path in files:
            self._part(path).zones()
        return len(files)

    def rest(self) -> None:
        """Between queries: let the decoded blocks go but the last few of each."""
        for part in self._open.values():
            part.drop_blocks(_KEPT_BLOCKS)

    def forget_missing(self, files: Files) -> None:
        """Close partitions no longer catalogued (retention dropped them)."""
        live = {path for _, _, path in files}
        for path in [p for p in self._open if p not in live]:
            self._open.pop(path).close()

    def query(self, files: Files, spec: QuerySpec, through: int,
              wanted: int) -> list[StoredEvent]:
        """Up to `wanted` matching events with seq <= through, in the spec's order."""
        self.forget_missing(files)
        filters = spec.partition_filters()
        after = spec.after
        before = through + 1 if spec.before is None else min(spec.before, through + 1)
        out: list[StoredEvent] = []
        order = reversed(files) if spec.descending else iter(files)
        for first, last, path in order:
            if (after is not None and last <= after) or first >= before:
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
        out: list[StoredEvent] = []
        for _, _, path in files:
            part = self._part(path)
            pairs = part.stream_range(stream, first_ss, last_ss)
            for record in part.records([seq for _, seq in pairs]):
                event = event_from_record(record)
                if matches(event, spec):
                    out.append(event)
                    if len(out) == spec.limit:
                        return out
        return out
