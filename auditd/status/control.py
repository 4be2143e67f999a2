"""The daemon as operators reach it: figures, dead-letter actions, reload, backup, and the
audit trail of those actions (the daemon audits itself). Implements StatusSource.

It reaches the daemon through `DaemonView`, a protocol defined here, so that this
module never imports the daemon that wires it in.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import time
from pathlib import Path
from typing import Any, Protocol

import msgspec
import structlog

from auditd.config import Config, load_config, parse_rate_limit
from auditd.errors import AuditdError, ConfigError, ProtocolError
from auditd.forward.process import ForwardProcess
from auditd.ingest.sequencer import Peer, Sequencer
from auditd.ingest.server import IngestServer
from auditd.ingest.validation import ValidEvent, decode_body
from auditd.journal.journal import Journal
from auditd.lifecycle import origins
from auditd.lifecycle.retention import Retention
from auditd.logs import configure_logging
from auditd.projections import BY_NAME as PROJECTION_NAMES
from auditd.projections import CountsQuery, Projections
from auditd.proofs import access as proofs_access
from auditd.proofs.checkpointer import Checkpointer
from auditd.proofs.ledger import Ledger
from auditd.query.engine import QueryEngine
from auditd.query.feed import CommitFeed
from auditd.ring import RingBuffer
from auditd.schema import WireEvent, encoder, stored_decoder
from auditd.stats import Stats
from auditd.status.backup import online_backup
from auditd.status.source import ActionRefused, Gauges, admin_actor
from auditd.store.deadletters import DeadLetterStore
from auditd.store.recovery import salvage
from auditd.store.sealing.sealer import Sealer
from auditd.store.store import Store
from auditd.store.writer import Pending, Writer
from auditd.systemd import Notifier

log = structlog.get_logger("auditd.status.control")

# Keys a reload may change while running; the rest are wired into sockets and files.
RELOADABLE = {"log.level", "log.format", "retention.max_age", "retention.max_bytes",
              "retention.archive_dir", "retention.interval",
              "buffer.overflow", "status.admin_uids", "status.reader_gids",
              "ingest.rate_limit"}
# How long an admin call waits for ingest to take its audit event (and a dead-letter
# retry for ingest to take the entry's events) before it answers anyway: the admin
# event is then queued and recorded once ingest can take it (IngestServer.record).
ADMIN_EVENT_WAIT_S = 2.0


def _rfc3339(ns: int | None) -> str | None:
    if ns is None:
        return None
    moment = datetime.datetime.fromtimestamp(ns // 1_000_000_000, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 1_000_000_000:09d}Z"


def _flatten(config: Config) -> dict[str, Any]:
    document = msgspec.to_builtins(config)
    return {f"{section}.{key}": value for section, keys in document.items()
            if isinstance(keys, dict) for key, value in keys.items()}


class DaemonView(Protocol):
    """The parts of the running daemon that operators' calls read and act on."""

    @property
    def config(self) -> Config: ...
    @property
    def stats(self) -> Stats: ...
    @property
    def storage(self) -> Path: ...
    @property
    def ring(self) -> RingBuffer[Pending]: ...
    @property
    def sequencer(self) -> Sequencer: ...
    @property
    def journal(self) -> Journal: ...
    @property
    def store(self) -> Store: ...
    @property
    def writer(self) -> Writer: ...

    @property
    def sealer(self) -> Sealer: ...
    @property
    def retention(self) -> Retention: ...
    @property
    def query_engine(self) -> QueryEngine: ...
    @property
    def projections(self) -> Projections: ...
    @property
    def ingest(self) -> IngestServer: ...
    @property
    def dead_letters(self) -> DeadLetterStore: ...
    @property
    def notifier(self) -> Notifier: ...
    @property
    def stop_requested(self) -> asyncio.Event: ...
    @property
    def damaged(self) -> tuple[Path, str] | None:
        """Where a database that failed its check at start was moved, and why."""
        ...

    def status_line(self) -> str: ...

    @property
    def checkpointer(self) -> Checkpointer | None: ...

    @property
    def ledger(self) -> Ledger: ...

    @property
    def feed(self) -> CommitFeed: ...

    @property
    def forwarder(self) -> ForwardProcess | None: ...


class DaemonControl:
    def __init__(self, daemon: DaemonView) -> None:
        self.daemon = daemon
        self.dlq_entries = 0
        self.dlq_bytes = 0

    @property
    def config(self) -> Config:
        return self.daemon.config

    @property
    def stats(self) -> Stats:
        return self.daemon.stats

    @property
    def events(self) -> QueryEngine:
        return self.daemon.query_engine

    @property
    def feed(self) -> CommitFeed:
        return self.daemon.feed

    def gauges(self) -> Gauges:
        daemon = self.daemon
        ring = daemon.ring
        oldest = ring.oldest_pending()
        age = (time.time_ns() - oldest.received_at) / 1e9 if oldest is not None else 0.0
        try:
            vfs = os.statvfs(daemon.storage)
            free = vfs.f_bavail * vfs.f_frsize
        except OSError:
            free = -1
        return Gauges(
            pending=ring.pending, pending_bytes=ring.pending_bytes,
            buffer_capacity=ring.capacity, last_seq=daemon.sequencer.last_seq,
            journal_bytes=daemon.journal.size_bytes(), db_bytes=daemon.store.size_bytes(),
            oldest_pending_age_s=max(0.0, age), disk_free_bytes=free,
            dlq_bytes=self.dlq_bytes, dlq_entries=self.dlq_entries,
            writer_fault=daemon.writer.fault, database_fault=daemon.writer.database_fault,
            database_damage=daemon.writer.database_damage,
            ingest_refusal=daemon.ingest.refusal,
            journal_fault=daemon.journal.fault or daemon.ingest.journal_fault,
            id_lookup_fault=daemon.ingest.lookups.fault,
            stopping=daemon.stop_requested.is_set(),
            held_connections=daemon.ingest.held_counts(),
            seal_fault=daemon.sealer.figures.fault or daemon.writer.held_for,
            tree_wait=daemon.ledger.waiting,
            retention_fault=daemon.retention.figures.fault or daemon.retention.figures.short,
            retention=daemon.retention.document(),
            partitions=daemon.sealer.document(len(daemon.store.sealed)),
            projections=daemon.projections.document(daemon.stats.last_committed_seq),
            checkpoint=self._checkpoint_figures(),
            **self._forward_figures(),
            database_replaced=None if daemon.damaged is None else (
                f"the database failed its check at start ({daemon.damaged[1]}) and was "
                f"moved to {daemon.damaged[0]}; a fresh one holds the journal's events; "
                f"run `auditd recover {daemon.damaged[0]}`"))

    def _forward_figures(self) -> dict[str, Any]:
        forwarder, config = self.daemon.forwarder, self.daemon.config
        if forwarder is None:
            return {}
        doc = forwarder.figures.document(self.daemon.retention.figures.unforwarded)
        return {"forward": doc,
                "forward_fault": forwarder.figures.problem(
                    doc, config.forward.lag_max_events,
                    config.duration_ms("forward", "lag_max_age") / 1000),
                "forward_blocked": doc["retention_blocked"]}

    def _checkpoint_figures(self) -> dict[str, Any] | None:
        checkpointer = self.daemon.checkpointer
        if checkpointer is None or checkpointer.newest_text is None:
            return None
        text = checkpointer.newest_text
        lines = text.split("\n")
        unix_time = next((int(x[5:]) for x in lines[3:] if x.startswith("time ")), None)
        return {"size": int(lines[1]), "time": unix_time, "text": text,
                "issued": checkpointer.issued, "refused": checkpointer.refused}

    def checkpoint_text(self) -> str | None:
        checkpointer = self.daemon.checkpointer
        return None if checkpointer is None else checkpointer.newest_text

    async def proof(self, seq: int, size: int | None, uid: int | None) -> dict[str, Any]:
        return await asyncio.to_thread(proofs_access.inclusion_for, self.daemon.storage,
                                       seq, size, uid)

    async def vacuum(self, dry_run: bool) -> dict[str, Any]:
        try:
            return await self.daemon.retention.apply(dry_run)
        except Exception as exc:  # the operator gets the reason, in one line
            raise ActionRefused(f"retention stopped: {exc or type(exc).__name__}") from exc

    async def issue_checkpoint(self) -> dict[str, Any]:
        """Sign a checkpoint of everything committed now (export's first step)."""
        checkpointer = self.daemon.checkpointer
        if checkpointer is None:
            raise ActionRefused("this daemon signs no checkpoints (no proofs key)")
        await self.daemon.store.checkpoint_wal()  # what is committed becomes durable
        await checkpointer.issue()
        if checkpointer.newest_text is None:
            raise ActionRefused("no event is committed yet: nothing to checkpoint")
        return {"size": int(checkpointer.newest_text.split("\n")[1]),
                "checkpoint": checkpointer.newest_text}

    async def record_origins(self, host: str, rows: list[tuple[int, int, int]]) -> dict[str, Any]:
        written = 0
        for at in range(0, len(rows), origins.CHUNK):
            written += await self.daemon.store.on_writer(
                origins.insert_origins, host, rows[at:at + origins.CHUNK])
        return {"host": host, "origins": len(rows), "new": written}

    async def consistency_proof(self, old: int, new: int) -> dict[str, Any]:
        return await asyncio.to_thread(proofs_access.consistency_for, self.daemon.storage,
                                       old, new)

    async def refresh(self) -> None:
        """Keep the dead-letter figures current and the ingest quota enforced."""
        dlq = self.daemon.dead_letters
        dropped = await dlq.enforce_quota(self.config.size("storage", "dlq_max_bytes"))
        if dropped:
            self.stats.dead_letters_deleted("quota", dropped)
            log.warning("dead_letters_dropped", count=dropped, reason="quota",
                        note="oldest ingest rejects over storage.dlq_max_bytes")
        self.dlq_entries, self.dlq_bytes = await dlq.stats()

    # -- dead letters ----------------------------------------------------------------

    async def dlq_list(self, limit: int, after: int | None,
                       uid: int | None) -> list[dict[str, Any]]:
        entries = await self.daemon.dead_letters.page(limit, after, uid)
        for entry in entries:
            entry["id"] = entry.pop("dlq_id")
            entry["first_failed_at"] = _rfc3339(entry["first_failed_at"])
            entry["last_failed_at"] = _rfc3339(entry["last_failed_at"])
        return entries

    async def dlq_drop(self, ids: list[int] | None) -> dict[str, Any]:
        dlq = self.daemon.dead_letters
        found = [entry[0] for entry in await dlq.entries(ids)]
        dropped = await dlq.drop(found) if found else 0
        if dropped:
            self.stats.dead_letters_deleted("operator", dropped)
            log.info("dead_letters_dropped", count=dropped, reason="operator")
        missing = sorted(set(ids or []) - set(found))
        return {"dropped": dropped, "missing": missing}

    async def dlq_retry(self, ids: list[int] | None) -> dict[str, Any]:
        daemon = self.daemon
        dlq = daemon.dead_letters
        entries = await dlq.entries(ids)
        accepted = failed = 0
        deadline = time.monotonic() + ADMIN_EVENT_WAIT_S  # for all of them together
        for dlq_id, seq, source, raw, uid in entries:
            problem = await self._retry_one(dlq_id, seq, source, raw, uid,
                                            max(0.0, deadline - time.monotonic()))
            if problem is None:
                accepted += 1
            else:
                failed += 1
                await dlq.failed_again(dlq_id, problem)
        missing = sorted(set(ids or []) - {entry[0] for entry in entries})
        return {"retried": len(entries), "accepted": accepted, "failed": failed,
                "missing": missing}

    async def _retry_one(self, dlq_id: int, seq: int | None, source: str, raw: bytes,
                         uid: int | None, within: float) -> str | None:
        """None when the entry's event is now stored (or already was), else why not."""
        daemon = self.daemon
        if source == "writer" and seq is not None and seq <= daemon.sealer.frozen_through:
            # A sealed partition is immutable, and its record for the seq (the dead
            # letter's) is part of the file: the event cannot take that seq back now.
            return (f"seq {seq} is sealed in a partition as this dead letter; the event "
                    "can no longer be stored under it (its raw bytes stay in the entry)")
        if source == "writer" and seq is not None:
            # An accepted event keeps its seq: re-committed as first sequenced.
            restored = daemon.writer.restore(stored_decoder.decode(raw), dlq_id)
            try:  # the writer may be stalled: answer anyway, the restore stays queued
                return await asyncio.wait_for(asyncio.shield(restored), within)
            except TimeoutError:
                return ("the writer is retrying a failing commit; the entry is re-committed "
                        "once it succeeds")
        if source != "ingest":
            return "damaged journal bytes cannot be decoded; inspect, then drop"
        limits = daemon.ingest.limits
        try:
            frame = decode_body(raw, limits.max_batch_events, limits.max_event_bytes)
        except ProtocolError as exc:
            return exc.message
        if frame.rejected:
            return frame.rejected[0][2]
        peer = Peer(0, -1 if uid is None else uid, -1, "auditd-dlq-retry")
        acceptance = await daemon.ingest.own_events.inject(frame.valid, peer, within)
        if acceptance is None:
            why = daemon.ingest.refusal or "the buffer is full"
            return f"ingest is not accepting events now ({why}); the entry stays: retry later"
        if acceptance.rejected:
            return acceptance.rejected[0][2]
        await daemon.dead_letters.drop([dlq_id])
        return None

    # -- reload, backup, admin trail -------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        daemon = self.daemon
        daemon.notifier.reloading()
        try:
            # In a thread: reading a file may block (a slow mount), the loop must not.
            new = await asyncio.to_thread(_load_for_reload, daemon.config.source or None)
            old_keys, new_keys = _flatten(daemon.config), _flatten(new)
            changed = sorted(k for k in new_keys if new_keys[k] != old_keys.get(k))
            applied = [k for k in changed if k in RELOADABLE]
            needs_restart = [k for k in changed if k not in RELOADABLE]
            for key in applied:
                section, name = key.split(".")
                setattr(getattr(daemon.config, section), name, getattr(getattr(new, section),
                                                                       name))
            # Logged under the old level, then the new one applies.
            log.info("config_reloaded", applied=applied, needs_restart=needs_restart)
            configure_logging(daemon.config.log.level, daemon.config.log.format)
            daemon.ingest.limits.overflow = daemon.config.buffer.overflow
            if any(key.startswith("retention.") for key in applied):
                daemon.retention.wake()
            daemon.ingest.set_rate_limit(
                parse_rate_limit("ingest.rate_limit", daemon.config.ingest.rate_limit))
            return {"applied": applied, "needs_restart": needs_restart}
        except AuditdError as exc:
            log.error("config_reload_refused", reason=str(exc))
            raise
        finally:
            daemon.notifier.ready_after_reload(daemon.status_line())

    async def backup(self, dest: str) -> dict[str, Any]:
        target = Path(dest)
        if not target.is_absolute():
            raise ActionRefused(f"{dest}: the destination must be an absolute path")
        started = time.monotonic()
        # Retention waits: it must not unlink a partition the snapshot names before the
        # copy has it.
        async with self.daemon.retention.paused():
            size = await asyncio.to_thread(online_backup, self.daemon.store.path, target)
        result = {"dest": dest, "bytes": size, "seconds": round(time.monotonic() - started, 3)}
        log.info("backup_written", **result)
        return result

    async def recover(self, path: str) -> dict[str, Any]:
        damaged = Path(path)
        if not await asyncio.to_thread(damaged.is_file):
            raise ActionRefused(f"{path}: no such file")
        daemon = self.daemon
        result = await asyncio.to_thread(salvage, damaged, daemon.store.path)
        for hashed in result.copied_hashes:
            daemon.sequencer.id_filter.add(hashed)
        streams = daemon.sequencer.streams
        for stream, version in result.stream_versions.items():
            streams[stream] = max(streams.get(stream, 0), version)
        if daemon.ledger.waiting is not None and daemon.ledger.waiting_path == str(damaged):
            while not await daemon.store.on_writer(daemon.ledger.resume_step):
                pass
        log.info("database_recovered", source=path, copied=result.copied,
                 already_present=result.already_present, unreadable=result.unreadable)
        document = result.document(str(daemon.store.path))
        if result.copied:
            # The copied events went in beside the writer: the projections count them
            # only from the events, so they are rebuilt.
            for name in PROJECTION_NAMES:
                await daemon.projections.rebuild(name)
            document["projections"] = "rebuilding"
        return document

    # -- projections -----------------------------------------------------------------

    async def projection_counts(self, query: CountsQuery,
                                uid: int | None) -> dict[str, Any]:
        return await self.daemon.projections.counts(query, uid)

    async def actor_summary(self, actor: str, uid: int | None) -> dict[str, Any] | None:
        return await self.daemon.projections.actor(actor, uid)

    async def rebuild_projection(self, name: str) -> dict[str, Any]:
        if name not in PROJECTION_NAMES:
            raise ActionRefused(f"{name!r} is not a projection; projections: "
                                f"{', '.join(PROJECTION_NAMES)}")
        return await self.daemon.projections.rebuild(name)

    async def record_admin(self, action: str, uid: int, gid: int, pid: int, comm: str,
                           data: dict[str, Any]) -> str:
        payload = encoder.encode(data)
        event = WireEvent(type=f"auditd.admin.{action}", actor=admin_actor(uid, comm),
                          data=msgspec.Raw(payload))
        raw = encoder.encode({"type": event.type, "actor": event.actor})
        return await self.daemon.ingest.own_events.record(
            [ValidEvent(0, event, None, raw)], Peer(pid, uid, gid, comm), ADMIN_EVENT_WAIT_S)


def _load_for_reload(source: str | None) -> Config:
    """load_config, with anything it raises turned into a ConfigError: a reload refuses
    what it cannot load, whatever the cause, and the daemon runs on its old config."""
    try:
        return load_config(source)
    except AuditdError:
        raise
    except Exception as exc:  # a case load_config does not know yet: still a refusal
        raise ConfigError(f"{source or 'the config file'}: cannot be loaded: "
                          f"{type(exc).__name__}: {exc}") from exc
