"""Sealer: seals the hot table a partition at a time, in a child process, and releases
the hot rows behind each seal.

Once `partition_events` seqs past `sealed_through` are committed, the sealer runs
`auditd.store.sealing.child` on that range; the child writes and renames the file, and
only then does the writer's thread commit its catalog row and the new sealed_through
(catalog.add), and delete the hot rows behind it, a chunk per transaction. A failed
seal (disk full, I/O, a killed child) is logged once, shown in health (`fault`) and
retried with backoff; ingest goes on in the hot table meanwhile.

Cancellation (shutdown): the child is killed; its temp file is removed at next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from auditd.errors import StoreError
from auditd.logs import RecurringFault
from auditd.store.sealing.catalog import CatalogEntry, entry_from_seal

log = structlog.get_logger("auditd.store.sealing.sealer")
_RETRY_FIRST_S = 1.0
# Past this many partitions' worth of committed, unsealed events, commits wait for the
# seal: one partition filling while the one before it is sealed, and no more.
HOLD_PARTITIONS = 2
# The sealing process's niceness above the daemon's while nothing waits for it: it
# yields the CPU to ingest. While commits are held for it, it runs at the daemon's own
# priority: held at +10 beside other busy processes it got a tenth of a core and held
# ingest for minutes (priority inversion), found by the suite beside a CPU burner.
NICE = 10
_RETRY_MAX_S = 60.0


class SealTarget(Protocol):
    """What the sealer needs of the store."""

    path: Path  # the database
    partitions_dir: Path

    async def catalog_partition(self, entry: CatalogEntry) -> None: ...

    async def release_hot(self) -> int: ...

    async def sealed_through(self) -> int: ...


@dataclass(slots=True)
class SealFigures:
    """For /stats and health."""

    sealed: int = 0  # partitions sealed since start
    last_sealed_at: float | None = None  # time.time()
    last_seconds: float | None = None
    last_events: int = 0
    fault: str | None = None  # why seals fail now


class Sealer:
    def __init__(self, store: SealTarget, partition_events: int,
                 hold: Callable[[str | None], None]) -> None:
        self.store = store
        self.partition_events = partition_events
        self.hold = hold  # Writer.hold: commits wait while it is given a reason
        self.holding = False
        self.figures = SealFigures()
        self.committed_seq = 0
        self.sealed_through = 0
        # The last seq of the range a seal is reading, else sealed_through: no dead
        # letter at or below it may be restored under its seq (its record is sealed).
        self.frozen_through = 0
        self._wake = asyncio.Event()
        self._child: asyncio.subprocess.Process | None = None
        self._priority_refused = False  # said once: raising the child's priority failed

    def committed(self, seq: int) -> None:
        """The writer committed through `seq` (its on_committed hook): cheap, no I/O."""
        self.committed_seq = seq
        if seq - self.sealed_through >= self.partition_events and not self._wake.is_set():
            self._wake.set()
        self._hold_if_behind()

    def _hold_if_behind(self) -> None:
        """Pace commits to the sealer while seals succeed. While they fail, commits go
        on into the hot table (health shows the fault): holding them would stop all
        ingest for as long as a fault lasts, and a fault may last until an operator
        comes."""
        behind = self.committed_seq - self.sealed_through
        holding = (behind >= HOLD_PARTITIONS * self.partition_events
                   and self.figures.fault is None)
        if holding != self.holding:
            self.holding = holding
            self._prioritise()
            self.hold(f"sealing is behind: {behind} committed events are not sealed yet; "
                      "commits wait for the seal in progress" if holding else None)

    def document(self, partitions: int) -> dict[str, Any]:
        """The /stats `partitions` object."""
        figures = self.figures
        hot = max(0, self.committed_seq - self.sealed_through)
        return {
            "count": partitions, "sealed_through": self.sealed_through,
            "partition_events": self.partition_events, "hot_events": hot,
            # Whole partitions' worth committed and waiting for a seal.
            "seal_backlog": hot // self.partition_events,
            "sealing": self._child is not None, "sealed_since_start": figures.sealed,
            "last_sealed_at": figures.last_sealed_at,
            "last_seal_seconds": figures.last_seconds,
            "last_seal_events": figures.last_events, "fault": figures.fault,
            "commits_held": self.holding,
        }

    async def run(self) -> None:
        store = self.store
        self.sealed_through = self.frozen_through = await store.sealed_through()
        fault = RecurringFault(log, "seal_failed", "seal_recovered")
        delay = _RETRY_FIRST_S
        release = True  # what a restart interrupted, if anything
        while True:
            if release:
                release = not await self._release(fault)
            if self.committed_seq - self.sealed_through < self.partition_events:
                self._wake.clear()
                if release:  # a failed release is tried again after `delay`
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
                else:
                    await self._wake.wait()
                continue
            first = self.sealed_through + 1
            last = self.frozen_through = self.sealed_through + self.partition_events
            try:
                entry = await self._seal(first, last)
                await store.catalog_partition(entry)
            except (OSError, SealError, StoreError, ValueError) as exc:
                self.frozen_through = self.sealed_through
                fault.failed(exc)
                self.figures.fault = f"sealing seqs {first}-{last} failed: {exc}; retried"
                self._hold_if_behind()
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            fault.succeeded()
            delay, self.figures.fault = _RETRY_FIRST_S, None  # _hold_if_behind below
            self.sealed_through = self.frozen_through = entry.last_seq
            self._hold_if_behind()
            figures = self.figures
            figures.sealed += 1
            figures.last_sealed_at, figures.last_seconds = time.time(), entry.seconds
            figures.last_events = entry.events
            log.info("partition_sealed", file=entry.file, first_seq=entry.first_seq,
                     last_seq=entry.last_seq, events=entry.events, bytes=entry.file_bytes,
                     seconds=round(entry.seconds, 3))
            release = True

    async def _release(self, fault: RecurringFault) -> bool:
        """Delete the hot rows behind the seals; False when it failed (retried later)."""
        try:
            released = await self.store.release_hot()
        except StoreError as exc:
            fault.failed(exc)
            self.figures.fault = f"releasing sealed hot rows failed: {exc}; retried"
            return False
        if released:
            log.info("hot_rows_released", through=self.sealed_through, rows=released)
        return True

    async def _seal(self, first: int, last: int) -> CatalogEntry:
        store = self.store
        store.partitions_dir.mkdir(exist_ok=True)
        started = time.monotonic()
        self._child = child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "auditd.store.sealing.child", str(store.path),
            str(store.partitions_dir), str(first), str(last), str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        self._prioritise()
        try:
            out, err = await child.communicate()
        finally:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await child.wait()
            self._child = None
        if child.returncode != 0:
            reason = err.decode(errors="replace").strip().splitlines()
            raise SealError(reason[-1] if reason else f"exit code {child.returncode}")
        entry = entry_from_seal(json.loads(out))
        log.debug("seal_child_finished", seconds=round(time.monotonic() - started, 3))
        return entry


    def _prioritise(self) -> None:
        """The sealing process's niceness: the daemon's while commits wait for it, NICE
        above it otherwise. Raising a priority needs CAP_SYS_NICE (or RLIMIT_NICE): a
        daemon without it says so once and the seal goes on at its niceness."""
        child = self._child
        if child is None:
            return
        own = os.getpriority(os.PRIO_PROCESS, 0)
        wanted = own if self.holding else min(own + NICE, 19)
        try:
            os.setpriority(os.PRIO_PROCESS, child.pid, wanted)
        except ProcessLookupError:
            return  # it has just finished
        except PermissionError as exc:
            if not self._priority_refused:
                self._priority_refused = True
                log.warning("seal_priority_not_raised", pid=child.pid, niceness=wanted,
                            error=str(exc), note="commits wait for a seal at low priority")
            return
        log.debug("seal_priority", pid=child.pid, niceness=wanted, urgent=self.holding)


class SealError(Exception):
    """The sealing process failed; str() is its own last line."""
