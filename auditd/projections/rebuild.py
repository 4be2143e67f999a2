"""Rebuilding a projection from the events, hot and sealed, without holding the writer.

A rebuild is a sequence of chunks (CHUNK seqs each), every one its own short
transaction on the store's thread, between two of the writer's batches: a hot chunk is
read and counted there (a few ms); a sealed chunk is read and aggregated on a worker
thread (partitions are immutable) and only its aggregates are added on the store's
thread. The position moves with each chunk, so a rebuild cut short (stop, SIGKILL)
resumes at the next start where it was. The event loop only awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog

from auditd.logs import RecurringFault
from auditd.projections.aggregate import Aggregates, Columns, aggregate
from auditd.projections.definitions import BY_NAME, Projection
from auditd.projections.projector import Projector
from auditd.store.partition.read import SealedPartition
from auditd.store.sealing import catalog
from auditd.store.store import Store

log = structlog.get_logger("auditd.projections.rebuild")
# Hot rows are read and counted on the store's thread: 4,096 of them take a few ms
# there, which a batch may wait. A sealed step reads one partition (at most
# SEALED_CHUNK seqs of it) on a worker thread; the store's thread only adds its sums.
CHUNK = 4096
SEALED_CHUNK = 65_536
_LOG_EVERY_S = 2.0
_RETRY_S = 1.0


class _Counted(msgspec.Struct, gc=False):
    """What a rebuild reads of a sealed record (every other key is skipped)."""

    seq: int
    dead_letter: bool = False
    ts: int = 0
    type: str = ""
    actor: str | None = None
    uid: int = 0
    comm: str = ""


_decode_counted = msgspec.msgpack.Decoder(_Counted).decode


@dataclass(slots=True)
class RebuildProgress:
    name: str
    through: int  # the window's top
    started_at: float  # time.time()
    started_position: int
    position: int
    finished_at: float | None = None
    error: str | None = None

    def document(self) -> dict[str, Any]:
        span = max(1e-6, (self.finished_at or time.time()) - self.started_at)
        done = self.position - self.started_position
        return {"through": self.through, "position": self.position,
                "done": done, "total": self.through - self.started_position,
                "seqs_per_s": round(done / span, 1), "started_at": self.started_at,
                "finished_at": self.finished_at, "error": self.error}


class Rebuilds:
    """Owns the rebuild tasks: `start(name)` from an operator, `resume(names)` at
    start, `aclose()` at shutdown (a cancelled rebuild resumes at the next start)."""

    def __init__(self, store: Store, projector: Projector, chunk: int = CHUNK) -> None:
        self.store = store
        self.projector = projector
        self.chunk = chunk
        self.progress: dict[str, RebuildProgress] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def running(self, name: str) -> bool:
        task = self._tasks.get(name)
        return task is not None and not task.done()

    async def start(self, name: str) -> dict[str, Any]:
        """Drop `name`'s rows and rebuild it in the background; KeyError for a name that
        is not a projection. A rebuild already running is restarted from scratch."""
        if name not in BY_NAME:
            raise KeyError(name)
        await self._stop(name)
        through = await self.store.on_writer(self.projector.begin_rebuild, name)
        log.info("projection_dropped", name=name, rebuild_through=through)
        self._spawn(name)
        return {"name": name, "state": "rebuilding", "rebuild_through": through}

    def resume(self, names: list[str]) -> None:
        for name in names:
            self._spawn(name)

    async def aclose(self) -> None:
        for name in list(self._tasks):
            await self._stop(name)

    async def _stop(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _spawn(self, name: str) -> None:
        self._tasks[name] = asyncio.get_running_loop().create_task(
            self._run(name), name=f"projection_rebuild:{name}")

    async def _run(self, name: str) -> None:
        projection = BY_NAME[name]
        state = self.projector.states[name]
        through = state.rebuild_through or 0
        progress = self.progress[name] = RebuildProgress(
            name, through, time.time(), state.position, state.position)
        log.info("projection_rebuild_started", name=name, position=state.position,
                 rebuild_through=through)
        fault = RecurringFault(log, "projection_rebuild_failing",
                               "projection_rebuild_recovered", level="warning")
        logged = time.monotonic()
        while True:
            try:
                if state.position >= through:
                    position = await self.store.on_writer(self.projector.finish_rebuild, name)
                    break
                await self._step(projection, state.position + 1, through)
            except Exception as exc:  # a busy store, an unreadable partition: said, retried
                fault.failed(exc)
                progress.error = str(exc)
                await asyncio.sleep(_RETRY_S)
                continue
            fault.succeeded()
            progress.position, progress.error = state.position, None
            if time.monotonic() - logged >= _LOG_EVERY_S:
                logged = time.monotonic()
                log.info("projection_rebuild_progress", name=name, position=state.position,
                         rebuild_through=through)
        progress.position, progress.finished_at = through, time.time()
        log.info("projection_rebuilt", name=name, position=position,
                 seconds=round(progress.finished_at - progress.started_at, 3))

    async def _step(self, projection: Projection, first: int, through: int) -> None:
        """Count from `first` on: a hot chunk, or (part of) the partition holding it."""
        sealed = await self.store.on_writer(self.projector.sealed_through)
        if first > sealed:
            if await self.store.on_writer(self.projector.count_hot, projection.name,
                                          first, min(through, first + self.chunk - 1)):
                return
            sealed = await self.store.on_writer(self.projector.sealed_through)
        last = min(through, sealed, first + SEALED_CHUNK - 1)
        entries = await self.store.on_writer(catalog.entries)
        files = [(e.first_seq, e.last_seq, e.file) for e in entries
                 if e.last_seq >= first and e.first_seq <= last][:1]
        if files:
            last = min(last, files[0][1])
        aggregates = await asyncio.to_thread(
            read_sealed, self.store.partitions_dir, files, first, last, projection)
        await self.store.on_writer(self.projector.count_sealed, projection.name, last,
                                   aggregates)


def read_sealed(directory: Path, files: list[tuple[int, int, str]], first: int, last: int,
                projection: Projection) -> Aggregates:
    """The aggregates of seqs first..last of sealed partitions, keyed by strings."""
    found: list[list[Any]] = [[], [], [], [], [], []]
    seqs, tss, types, actors, uids, comms = found
    for file_first, file_last, file in files:
        with SealedPartition(directory / file) as part:
            wanted = range(max(first, file_first), min(last, file_last) + 1)
            for record in part.records(wanted):
                fields = _decode_counted(record)
                if fields.dead_letter:
                    continue
                seqs.append(fields.seq)
                tss.append(fields.ts)
                types.append(fields.type)
                actors.append(fields.actor)
                uids.append(fields.uid)
                comms.append(fields.comm)
    return aggregate(Columns(*found), (projection,))
