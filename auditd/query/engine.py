"""QueryEngine: runs a QuerySpec over the hot index and the sealed partitions.

Plan: the newest partition open for reads fixes S (its last seq); seqs above S come
from the hot index (hot_search), seqs at or below it from the sealed partitions, each
with its own read-only connection on this engine's thread. Descending: hot, then
partitions newest first; ascending: partitions oldest first, then hot; either stops
at `limit`. Candidates of the hot index are rechecked against their rows, read from
the ring's committed window when it still holds them, else from the hot table by
rowid, else (released by a seal since) from the partition now holding them: all of
it on the engine's thread, one hop from the loop per tier. The hot index is trimmed
only after its partition is open for reads, so taking the columns before S never
leaves a gap.

Keyset pagination: `next` is the last event's seq when the page is full. Never an
OFFSET, so a page is the same while events arrive. Dead letters never match.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog

from auditd.query.hot_index import NAME_FIELDS, Columns, HotIndex
from auditd.query.hot_search import candidate_slots
from auditd.query.rows import connect_reader, hot_rows, name_ids
from auditd.query.sealed_read import DEFAULT_FILTER_BUDGET, SealedReader
from auditd.query.spec import QuerySpec, matches
from auditd.schema import StoredEvent, id_hash

log = structlog.get_logger("auditd.query.engine")
_T = TypeVar("_T")
_FIRST_CHUNK = 32
_MAX_CHUNK = 4096
_SLOW_MS = 100.0
_ORIGIN_SEQS = """SELECT seq FROM event_origins
    WHERE origin_host IN (SELECT value FROM json_each(?)) AND seq > ? AND seq < ?"""
_ORIGIN_RUNS = """SELECT origin_seq FROM event_origins WHERE origin_host = ?
    ORDER BY origin_seq"""
_ORIGINS = """SELECT seq, origin_host, origin_seq, origin_received_at FROM event_origins
    WHERE seq IN (SELECT value FROM json_each(?))"""


@dataclass(slots=True)
class Page:
    events: list[StoredEvent]
    next: int | None
    ms: float = 0.0  # time spent answering, inside the daemon
    cpu_ms: float = 0.0  # of which the engine's thread ran (the rest: waiting for a core)


# The ring's committed window by seq (RingBuffer.committed_by_seq: any thread).
RecentEvents = Callable[[Sequence[int]], Mapping[int, Any]]


class SealedFiles(Protocol):
    def files(self) -> list[tuple[int, int, Path]]: ...


class QueryEngine:
    def __init__(self, db_path: Path, hot: HotIndex, sealed: SealedFiles,
                 recent: RecentEvents, filter_budget: int = DEFAULT_FILTER_BUDGET) -> None:
        self.db_path, self.hot, self.sealed, self.recent = db_path, hot, sealed, recent
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="auditd-query")
        self._conn: sqlite3.Connection | None = None  # only on _thread
        self.partitions = SealedReader(filter_budget)  # only on _thread

    def _call(self, function: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        return asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect_reader(self.db_path)
        return self._conn

    def figures(self) -> dict[str, Any]:
        """The /stats `query` section: what the partitions' term filters did."""
        return self.partitions.figures.document()

    async def warm(self) -> None:
        """Open the partitions for reads now, so the first query does not pay for it."""
        started = time.perf_counter()
        try:
            opened = await self._call(self.partitions.warm, self.sealed.files())
        except Exception as exc:  # a courtesy: queries open what they need anyway
            log.warning("query_partitions_open_failed", error=repr(exc))
            return
        figures = self.partitions.figures
        log.info("query_partitions_opened", partitions=opened, term_filters=figures.loaded,
                 filter_bytes=figures.bytes, ms=round((time.perf_counter() - started) * 1000, 1))

    async def forget_dropped(self) -> None:
        """Close partitions retention took out of the catalog now, not at the next query:
        an open file keeps its space from the filesystem."""
        await self._call(self.partitions.forget_missing, self.sealed.files())

    async def aclose(self) -> None:
        def close() -> None:
            self.partitions.close()
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        await self._call(close)
        self._thread.shutdown(wait=True)

    # -- queries -------------------------------------------------------------------

    async def query(self, spec: QuerySpec) -> Page:
        started = time.perf_counter()
        found: list[StoredEvent] = []
        cpu_ms = 0.0
        if spec.origin_hosts is not None:
            found, cpu_ms = await self._call(_timed, self._origins_sync, spec)
        elif not spec.empty:
            columns = self.hot.columns  # first: see the module's docstring
            files = self.sealed.files()
            through = files[-1][1] if files else 0
            for tier in ("hot", "sealed") if spec.descending else ("sealed", "hot"):
                wanted = spec.limit - len(found)
                if wanted <= 0:
                    break
                if tier == "hot":
                    events, cpu = await self._call(_timed, self._hot_sync, spec, columns,
                                                   through, wanted)
                else:
                    events, cpu = await self._call(_timed, self._sealed_sync, files, spec,
                                                   through, wanted)
                found.extend(events)
                cpu_ms += cpu
        ms = (time.perf_counter() - started) * 1000
        if ms > _SLOW_MS:
            log.info("query_slow", ms=round(ms, 2), filters=sorted(spec.values),
                     words=len(spec.words) + len(spec.prefixes), found=len(found))
        following = found[-1].seq if len(found) == spec.limit else None
        return Page(found, following, ms, cpu_ms)

    def _hot_sync(self, spec: QuerySpec, columns: Columns, through: int,
                  wanted: int) -> list[StoredEvent]:
        """On the thread, in one go: each hop to the loop and back costs a scheduling
        delay, which under load was most of a query's time."""
        scan = self._hot_scan(spec, columns, through)
        out: list[StoredEvent] = []
        chunk = max(_FIRST_CHUNK, wanted)
        while len(out) < wanted:
            seqs = _take(scan, min(chunk, _MAX_CHUNK))
            if not seqs:
                break
            chunk *= 2
            events = self._events_sync(seqs)
            for seq in seqs:
                event = events.get(seq)
                if event is not None and matches(event, spec):
                    out.append(event)
                    if len(out) == wanted:
                        break
        return _merge(out, [e for e in self.hot.stragglers
                            if e.seq > through and matches(e, spec)], spec, wanted)

    def _origins_sync(self, spec: QuerySpec) -> list[StoredEvent]:
        """Imported events of spec.origin_hosts, by seq from event_origins, each
        checked against the other filters."""
        order = "DESC" if spec.descending else "ASC"
        hosts = json.dumps(list(spec.origin_hosts or ()))
        after, before = spec.after or 0, 2**63 - 1 if spec.before is None else spec.before
        out: list[StoredEvent] = []
        while len(out) < spec.limit:
            seqs = [int(row[0]) for row in self.conn.execute(
                f"{_ORIGIN_SEQS} ORDER BY seq {order} LIMIT ?",
                (hosts, after, before, _MAX_CHUNK))]
            if not seqs:
                break
            events = self._events_sync(seqs)
            out.extend(e for e in (events.get(seq) for seq in seqs)
                       if e is not None and matches(e, spec))
            after, before = (after, seqs[-1]) if spec.descending else (seqs[-1], before)
        return out[:spec.limit]

    async def origins(self, seqs: Sequence[int]) -> dict[int, tuple[str, int, int]]:
        """Where each imported one of these events came from: seq -> (origin host, its
        seq there, its received_at there); the others are absent."""
        return await self._call(self._origins_of, list(seqs))

    def _origins_of(self, seqs: list[int]) -> dict[int, tuple[str, int, int]]:
        try:
            if self.conn.execute("SELECT 1 FROM event_origins LIMIT 1").fetchone() is None:
                return {}  # a store that never imported: no lookup a page
            return {int(r[0]): (str(r[1]), int(r[2]), int(r[3])) for r in self.conn.execute(
                _ORIGINS, (json.dumps(seqs),))}
        except sqlite3.OperationalError:  # a store migrated below schema 6
            return {}

    async def origin_runs(self, host: str) -> list[list[int]]:
        """The seqs at `host` already imported here, as ascending [first, last] runs."""
        return await self._call(self._origin_runs, host)

    def _origin_runs(self, host: str) -> list[list[int]]:
        runs: list[list[int]] = []
        try:
            rows = self.conn.execute(_ORIGIN_RUNS, (host,))
            for (seq,) in rows:
                if runs and runs[-1][1] == seq - 1:
                    runs[-1][1] = seq
                else:
                    runs.append([seq, seq])
        except sqlite3.OperationalError:  # a store migrated below schema 6
            return []
        return runs

    def _sealed_sync(self, files: list[tuple[int, int, Path]], spec: QuerySpec, through: int,
                     wanted: int) -> list[StoredEvent]:
        try:
            return self.partitions.query(files, spec, through, wanted)
        finally:
            self.partitions.rest()

    def _hot_scan(self, spec: QuerySpec, columns: Columns, through: int) -> Iterator[int]:
        lo = columns.slot_of(max(through, spec.after or 0))
        hi = columns.count if spec.before is None else bisect_left(
            columns.seqs, spec.before, 0, columns.count)
        names = [v for name in NAME_FIELDS for v in spec.values.get(name, ())]
        ids = name_ids(self.conn, names)
        seqs = columns.seqs
        return (seqs[slot] for slot in candidate_slots(columns, spec, ids, lo, hi))

    async def events(self, seqs: Sequence[int]) -> dict[int, StoredEvent]:
        """The events of these seqs (absent ones and dead letters left out): from the
        ring's window, else the hot table, else the sealed partitions."""
        return await self._call(self._events_sync, seqs)

    def _events_sync(self, seqs: Sequence[int]) -> dict[int, StoredEvent]:
        found = {seq: e for seq, e in self.recent(seqs).items() if isinstance(e, StoredEvent)}
        missing = [seq for seq in seqs if seq not in found]
        if missing:
            found.update(self._stored(missing))
        return found

    def _stored(self, seqs: list[int]) -> dict[int, StoredEvent]:
        """Hot rows above the sealed range (those below may be being released), then
        sealed records for the rest (a seal may have released some hot ones since)."""
        files = self.sealed.files()
        through = files[-1][1] if files else 0
        found = hot_rows(self.conn, [seq for seq in seqs if seq > through])
        rest = [seq for seq in seqs if seq not in found]
        if rest:
            found.update(self.partitions.events(files, rest))
        return found

    async def event(self, seq: int) -> StoredEvent | None:
        return (await self.events([seq])).get(seq)

    async def event_by_id(self, event_id: str) -> StoredEvent | None:
        """The event stored under this id: the hot table's id index, else the sealed
        partitions' id terms, newest first."""
        seq = await self._call(self._seq_of_id, event_id)
        return None if seq is None else await self.event(seq)

    def _seq_of_id(self, event_id: str) -> int | None:
        row = self.conn.execute("SELECT seq FROM events WHERE id_hash = ? AND id = ?",
                                (id_hash(event_id), event_id)).fetchone()
        if row is not None:
            return int(row[0])
        return self.partitions.seq_of_id(self.sealed.files(), event_id)

    async def stream(self, stream: str, first: int, last: int, limit: int,
                     uid: int | None) -> list[StoredEvent]:
        """The stream's events with first <= stream_seq <= last, by stream_seq."""
        spec = QuerySpec(values={"stream": (stream,)}, limit=limit).restricted_to(uid)
        files = self.sealed.files()
        through = files[-1][1] if files else 0
        found = await self._call(self.partitions.stream, files, spec, first, last)
        after = max([through, *(e.seq for e in found)])
        while len(found) < limit and not spec.empty:
            page = await self.query(spec.replace(after=after, limit=min(1000, limit)))
            for event in page.events:
                if event.stream_seq is not None and first <= event.stream_seq <= last:
                    found.append(event)
                if event.stream_seq is not None and event.stream_seq > last:
                    page.next = None
                    break
            if page.next is None:
                break
            after = page.next
        return found[:limit]


def _timed(function: Callable[..., list[StoredEvent]], *args: Any
           ) -> tuple[list[StoredEvent], float]:
    started = time.thread_time()
    found = function(*args)
    return found, (time.thread_time() - started) * 1000


def _take(scan: Iterator[int], count: int) -> list[int]:
    out = []
    for seq in scan:
        out.append(seq)
        if len(out) == count:
            break
    return out


def _merge(found: list[StoredEvent], extra: list[StoredEvent], spec: QuerySpec,
           wanted: int) -> list[StoredEvent]:
    if not extra:
        return found
    merged = sorted([*found, *extra], key=lambda e: e.seq, reverse=spec.descending)
    return merged[:wanted]
