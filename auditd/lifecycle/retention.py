"""Retention: keeps the store within `retention.max_age` and `retention.max_bytes`,
every `retention.interval` and on `auditd vacuum` (`POST /vacuum`).

Each step drops one thing and is re-planned from a fresh look at the disk
(retention_plan.py decides): an archive file is unlinked; a partition is first
archived when `archive_dir` is set (a complete MessagePack export of its range,
zstd, fsynced with its directory: deletion waits for it), then the prune point is
computed and signed, then one short writer transaction takes the partition out of
the catalog with every row at or below its last seq and records the prune point
(catalog.drop_oldest), and only then is the file unlinked. A crash between the
commit and the unlink leaves an uncatalogued file, removed at the next start.

Only what a checkpoint covers and the tree holds is deleted: the prune point's
checkpoint must be consistent with what was signed. Failures (an archive directory
read-only or full, a store error) stop deletion, never ingestion; health shows them.
With forwarding on (step 8), nothing above the forwarder's persisted cursor goes: when
only unforwarded events are left to delete and disk use stays over `max_bytes`,
`figures.unforwarded` says so, health fails and ingest refuses (as for a full disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from auditd.config import Config
from auditd.errors import AuditdError
from auditd.lifecycle.disk_use import DiskUse, measure
from auditd.lifecycle.export import archive_range
from auditd.lifecycle.files import Output
from auditd.lifecycle.retention_plan import (
    Candidate,
    Drop,
    Plan,
    archive_name,
    archives_by_seq,
    plan,
)
from auditd.logs import RecurringFault
from auditd.proofs import prune_point
from auditd.proofs.checkpointer import host_id_of
from auditd.proofs.merkle import consistency_path, consistent, fold
from auditd.proofs.prove import ProofError, StoredTree, compact_range
from auditd.proofs.scan import RangeTask, scan_range
from auditd.proofs.tree import TILE_HEIGHT, load_edge
from auditd.store.partition.read import SealedPartition
from auditd.store.records import event_from_record, is_dead_letter
from auditd.store.sealing import catalog
from auditd.store.store import Store

log = structlog.get_logger("auditd.lifecycle.retention")
Signer = Callable[[int, bytes], str]  # (size, root) -> a signed checkpoint's text
_NEWEST_PROBE = 64  # records looked at, from a partition's end, for an event's time
_DURABLE_TRIES = 100
_RETRY_FIRST_S = 1.0  # after a failed run; doubling up to the interval or _RETRY_MAX_S
_RETRY_MAX_S = 60.0
_DURABLE_RETRY_S = 0.05


class RetentionError(AuditdError):
    """A retention step could not be taken; deletion stops until the next run."""


@dataclass(slots=True)
class RetentionFigures:
    runs: int = 0
    last_run_at: float | None = None  # time.time()
    next_run_at: float | None = None
    dropped_partitions: int = 0  # since start
    dropped_events: int = 0
    dropped_archives: int = 0
    freed_bytes: int = 0
    fault: str | None = None  # why the last run stopped
    short: str | None = None  # over max_bytes with nothing retention may delete
    unforwarded: str | None = None  # ... because the rest is not forwarded yet


@dataclass(slots=True)
class Survey:
    use: DiskUse
    candidates: list[Candidate]
    waiting: str | None  # why the oldest partition may not go yet
    waiting_for_forward: bool
    host: str
    pruned_through: int
    oldest_seq: int | None
    oldest_ns: int | None  # when the oldest stored event was received


class Retention:
    def __init__(self, store: Store, config: Config, sign: Signer) -> None:
        self.store, self.config, self.sign = store, config, sign
        self.storage = store.path.parent
        self.figures = RetentionFigures()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._newest: dict[str, int] = {}  # partition file -> newest receipt (immutable)
        self.last_survey: Survey | None = None
        # Told after each drop (the query engine closes the dropped file at once).
        self.after_drop: Callable[[], Awaitable[None]] | None = None
        # The forwarder's persisted cursor, with forwarding on: nothing above it goes.
        self.forwarded: Callable[[], int] | None = None

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No retention step runs inside (a backup copies partitions its snapshot
        names)."""
        async with self._lock:
            yield

    def wake(self) -> None:
        """Run now (a reload may have changed the limits)."""
        self._wake.set()

    @property
    def archive_dir(self) -> Path | None:
        value = self.config.retention.archive_dir
        return Path(value) if value else None

    async def run(self) -> None:
        fault = RecurringFault(log, "retention_failed", "retention_recovered")
        retry = _RETRY_FIRST_S
        while True:
            interval = self.config.duration_ms("retention", "interval") / 1000
            try:
                await self.apply()
            except Exception as exc:  # any fault stops deletion, never the daemon
                fault.failed(exc)
                self.figures.fault = str(exc) or type(exc).__name__
                # Tried again soon (a passing fault clears from health quickly), less
                # often while it lasts.
                interval, retry = min(interval, retry), min(retry * 2, _RETRY_MAX_S)
            else:
                fault.succeeded()
                self.figures.fault, retry = None, _RETRY_FIRST_S
            self.figures.next_run_at = time.time() + interval
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)

    async def apply(self, dry_run: bool = False) -> dict[str, Any]:
        """Apply retention until nothing more is due (or say what would go)."""
        async with self._lock:
            started = time.monotonic()
            done: list[Drop] = []
            survey = await asyncio.to_thread(self._survey)
            decided = self._plan(survey)
            if not dry_run:
                while decided.drops:
                    step = decided.drops[0]
                    await self._take(step, survey)
                    done.append(step)
                    survey = await asyncio.to_thread(self._survey)
                    decided = self._plan(survey)
                    if decided.drops and decided.drops[0] == step:
                        raise RetentionError(f"deleting {step.name} did not take it away; "
                                             "retention stops until the next run")
                self.figures.runs += 1
                self.figures.last_run_at = time.time()
            self._note_short(decided, survey)
            return {"dry_run": dry_run,
                    "deleted" if not dry_run else "would_delete":
                        [d.document() for d in (decided.drops if dry_run else done)],
                    "disk": survey.use.document(), "max_bytes": self._max_bytes(),
                    "over_max_bytes_after": decided.short, "waiting": survey.waiting,
                    "seconds": round(time.monotonic() - started, 3)}

    def _max_bytes(self) -> int:
        return self.config.size("retention", "max_bytes")

    def _plan(self, survey: Survey) -> Plan:
        max_age_ms = self.config.duration_ms("retention", "max_age")
        cutoff = time.time_ns() - max_age_ms * 1_000_000 if max_age_ms else None
        return plan(survey.candidates, archives_by_seq(survey.use.archive_files, survey.host),
                    survey.use.total, self._max_bytes(), cutoff)

    def _note_short(self, decided: Plan, survey: Survey) -> None:
        if not decided.short:
            self.figures.short = self.figures.unforwarded = None
            return
        why = survey.waiting or "only the hot table, the journal and the database are left"
        short = (f"disk use {decided.used_after} bytes stays over retention.max_bytes "
                 f"{self._max_bytes()}: {why}")
        if short != self.figures.short:
            log.warning("retention_over_max_bytes", used=decided.used_after,
                        max_bytes=self._max_bytes(), reason=why)
        self.figures.short = short
        self.figures.unforwarded = (f"{short}; ingest refuses events until forwarding "
                                    "catches up" if survey.waiting_for_forward else None)

    def document(self) -> dict[str, Any]:
        """The /stats `retention` object (from the last run's look at the disk)."""
        settings, figures, survey = self.config.retention, self.figures, self.last_survey
        max_age_ms = self.config.duration_ms("retention", "max_age")
        next_by_age = None
        if survey is not None and survey.candidates and max_age_ms:
            next_by_age = survey.candidates[0].newest_ns / 1e9 + max_age_ms / 1000
        return {
            "max_age": settings.max_age, "max_bytes": self._max_bytes(),
            "archive_dir": settings.archive_dir or None, "interval": settings.interval,
            "disk": None if survey is None else survey.use.document(),
            "pruned_through": 0 if survey is None else survey.pruned_through,
            "oldest_seq": None if survey is None else survey.oldest_seq,
            "oldest_received_at": None if survey is None or survey.oldest_ns is None
            else survey.oldest_ns / 1e9,
            "next_deletion_by_age_at": next_by_age, "next_run_at": figures.next_run_at,
            "last_run_at": figures.last_run_at, "runs": figures.runs,
            "dropped_partitions": figures.dropped_partitions,
            "dropped_events": figures.dropped_events,
            "dropped_archives": figures.dropped_archives, "freed_bytes": figures.freed_bytes,
            "waiting": None if survey is None else survey.waiting,
            "fault": figures.fault, "over_max_bytes": figures.short,
        }

    # -- looking (in a thread) -------------------------------------------------------

    def _survey(self) -> Survey:
        use = measure(self.storage, self.archive_dir)
        db = sqlite3.connect(f"file:{self.store.path}?mode=ro", uri=True,
                             isolation_level=None)
        try:
            db.execute("BEGIN")
            entries = catalog.entries(db)
            tree_size = load_edge(db).size
            signed = db.execute("SELECT max(size) FROM checkpoints").fetchone()[0] or 0
            host = host_id_of(db)
            pruned = prune_point.pruned_through(db)
            oldest = db.execute("SELECT min(seq) FROM events").fetchone()[0]
        finally:
            db.close()
        oldest_ns = self._oldest_of(entries[0]) if entries else None
        if oldest_ns is None and oldest is not None:
            oldest_ns = self._hot_received(int(oldest))
        candidates, waiting, for_forward = [], None, False
        forwarded = None if self.forwarded is None else self.forwarded()
        for entry in entries:
            if entry.last_seq > min(tree_size, signed):
                waiting = (f"partition {entry.file} waits for a checkpoint covering seq "
                           f"{entry.last_seq} (signed through {signed}, tree {tree_size})")
                break
            if forwarded is not None and entry.last_seq > forwarded:
                waiting = (f"partition {entry.file} (seqs up to {entry.last_seq}) waits "
                           f"for forwarding (forwarded through {forwarded})")
                for_forward = True
                break
            candidates.append(Candidate(entry, use.partitions.get(entry.file, 0),
                                        self._newest_of(entry)))
        first = entries[0].first_seq if entries else oldest
        self.last_survey = survey = Survey(use, candidates, waiting, for_forward, host, pruned,
                                           None if first is None else int(first), oldest_ns)
        return survey

    def _oldest_of(self, entry: catalog.CatalogEntry) -> int | None:
        with SealedPartition(self.store.partitions_dir / entry.file) as part:
            high = min(entry.last_seq, entry.first_seq + _NEWEST_PROBE - 1)
            for record in part.records(range(entry.first_seq, high + 1)):
                if not is_dead_letter(record):
                    return event_from_record(record).received_at
        return None

    def _hot_received(self, seq: int) -> int | None:
        db = sqlite3.connect(f"file:{self.store.path}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT received_at FROM events WHERE seq = ?", (seq,)).fetchone()
        finally:
            db.close()
        return None if row is None else int(row[0])

    def _newest_of(self, entry: catalog.CatalogEntry) -> int:
        """When the partition's newest event was received (its last events' time; the
        seal's time when its end is all dead letters)."""
        found = self._newest.get(entry.file)
        if found is None:
            found = entry.sealed_at
            with SealedPartition(self.store.partitions_dir / entry.file) as part:
                low = max(entry.first_seq, entry.last_seq - _NEWEST_PROBE + 1)
                for record in reversed(part.records(range(low, entry.last_seq + 1))):
                    if not is_dead_letter(record):
                        found = event_from_record(record).received_at
                        break
            self._newest[entry.file] = found
        return found

    # -- deleting ----------------------------------------------------------------------

    async def _take(self, drop: Drop, survey: Survey) -> None:
        figures = self.figures
        if drop.kind == "archive":
            assert self.archive_dir is not None
            await asyncio.to_thread(catalog.unlink_durably, self.archive_dir / drop.name)
            figures.dropped_archives += 1
            figures.freed_bytes += drop.bytes
            log.info("retention_archive_deleted", file=drop.name, bytes=drop.bytes,
                     first_seq=drop.first_seq, last_seq=drop.last_seq, reason=drop.reason)
            return
        assert drop.candidate is not None
        entry = drop.candidate.entry
        prune = await asyncio.to_thread(self._prune_record, entry, drop.bytes)
        archived = await self._archive(entry, survey.host, prune.checkpoint)
        await self.store.on_writer(catalog.drop_oldest, entry, prune)
        await self.store.sealed.drop(entry.first_seq)
        if self.after_drop is not None:
            await self.after_drop()
        # The drop must be on disk before its file goes: with synchronous=NORMAL a
        # commit is durable once a WAL checkpoint that began after it completed, and a
        # drop lost to a power cut would leave a catalogued partition without a file.
        await self._durable()
        await asyncio.to_thread(catalog.unlink_durably, self.store.partitions_dir / entry.file)
        self._newest.pop(entry.file, None)
        figures.dropped_partitions += 1
        figures.dropped_events += entry.events
        figures.freed_bytes += drop.bytes
        log.info("retention_partition_dropped", file=entry.file, first_seq=entry.first_seq,
                 last_seq=entry.last_seq, events=entry.events, bytes=drop.bytes,
                 reason=drop.reason, archived=archived)

    async def _durable(self) -> None:
        for _ in range(_DURABLE_TRIES):
            if await self.store.checkpoint_wal():
                return
            await asyncio.sleep(_DURABLE_RETRY_S)
        raise RetentionError("the WAL checkpoint that makes the drop durable did not "
                             "complete; its file is removed at the next start")

    async def _archive(self, entry: catalog.CatalogEntry, host: str,
                       checkpoint: str) -> str | None:
        directory = self.archive_dir
        if directory is None:
            return None
        path = directory / archive_name(host, entry.first_seq, entry.last_seq)
        try:
            output = Output(str(path))
        except OSError as exc:
            raise RetentionError(f"archiving seqs {entry.first_seq}-{entry.last_seq} to "
                                 f"{directory} failed: {exc}; nothing deleted") from exc
        try:
            await asyncio.to_thread(archive_range, self.storage, output, entry.first_seq,
                                    entry.last_seq, checkpoint)
        except Exception as exc:  # a damaged partition's error too: the archive is not whole
            output.abandon()
            raise RetentionError(f"archiving seqs {entry.first_seq}-{entry.last_seq} to "
                                 f"{path} failed: {exc}; nothing deleted") from exc
        return str(path)

    def _prune_record(self, entry: catalog.CatalogEntry, size_bytes: int) -> catalog.PruneRecord:
        """The prune point at the partition's last seq, checked before anything goes:
        every record of the partition against the leaf fingerprints the tree stored
        (so an edited partition is found, not deleted without a trace), and the prune
        point's root against the newest signed checkpoint by a consistency proof from
        the stored tree (so stored nodes that were rewritten are found too)."""
        m = entry.last_seq
        db = sqlite3.connect(f"file:{self.store.path}?mode=ro", uri=True,
                             isolation_level=None)
        try:
            db.execute("BEGIN")
            edge = load_edge(db)
            newest = db.execute("SELECT size, root FROM checkpoints ORDER BY id DESC LIMIT 1"
                                ).fetchone()
            if newest is None or int(newest[0]) < m:
                raise RetentionError(f"no signed checkpoint covers seq {m} yet")
            scanned = scan_range(RangeTask(
                str(self.store.path), str(self.store.partitions_dir), entry.first_seq, m,
                frozenset(), edge.size >> TILE_HEIGHT, bytes(edge.fingerprints)))
            if scanned.problems:
                problem = scanned.problems[0]
                raise RetentionError(f"partition {entry.file} does not match its leaves "
                                     f"(seq {problem.seq}: {problem.detail}): run `auditd "
                                     "verify`; nothing deleted")
            tree = StoredTree(db, self.store.partitions_dir)
            try:
                compact = compact_range(tree, m)
                size, signed_root = int(newest[0]), bytes(newest[1])
                path = [] if size == m else consistency_path(m, size, tree.subtree)
            finally:
                tree.close()
        except ProofError as exc:
            raise RetentionError(f"the tree below seq {m} cannot be read: {exc}; run "
                                 "`auditd verify`; nothing deleted") from exc
        finally:
            db.close()
        root = fold(compact)
        if not consistent(m, size, root, signed_root, path):
            raise RetentionError(f"the stored tree at size {m} is not consistent with the "
                                 f"signed checkpoint of size {size}: run `auditd verify`; "
                                 "nothing deleted")
        return catalog.PruneRecord(m, b"".join(compact), self.sign(m, root), entry.events,
                                   size_bytes)
