"""What the status server reads and asks of the daemon: one Protocol, one snapshot type.

The server never touches the ring, the writer or the store directly; the daemon
implements `StatusSource` and stays the only owner of its components. Everything
the server reads is called on the event loop thread, so no member needs a lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from auditd.config import Config
from auditd.errors import AuditdError
from auditd.projections.params import CountsQuery
from auditd.query.engine import QueryEngine
from auditd.query.feed import CommitFeed
from auditd.stats import Stats


class ActionRefused(AuditdError):
    """An admin action cannot be done as asked (unknown ids, backup target exists).

    The message is for the operator; the server answers 409 with it.
    """


def admin_actor(uid: int, comm: str) -> str:
    """The `actor` of an auditd.admin.* event: the operator's uid, then its command."""
    return f"uid:{uid} {comm}" if comm else f"uid:{uid}"


@dataclass(slots=True)
class Gauges:
    """Point-in-time figures that are not counters in `Stats`. Cheap to build: no I/O
    beyond stat() calls, since /health and /metrics build one per request."""

    pending: int  # events accepted but not yet committed (ring.pending)
    pending_bytes: int  # their encoded size (ring.pending_bytes)
    buffer_capacity: int  # ring.capacity
    last_seq: int  # highest seq handed out (sequencer.last_seq)
    journal_bytes: int  # total size of the journal segments on disk
    db_bytes: int  # database file plus its WAL (store.size_bytes())
    oldest_pending_age_s: float  # age of the oldest uncommitted event; 0.0 when none
    disk_free_bytes: int  # bytes available to the daemon on the storage volume; -1 unknown
    dlq_bytes: int  # bytes held in the dead-letter store (sum of dead_letters.size)
    dlq_entries: int  # rows in the dead-letter store
    writer_fault: str | None = None  # writer.fault: why commits are failing now
    # writer.database_fault: the database cannot be written (corrupt, read-only...)
    database_fault: str | None = None
    # writer.database_damage: SQLite said the file is damaged, since the start
    database_damage: str | None = None
    ingest_refusal: str | None = None  # ingest.refusal: why ingest is refusing now
    journal_fault: str | None = None  # why the journal cannot be appended to now
    id_lookup_fault: str | None = None  # why database id lookups fail now
    stopping: bool = False  # shutdown has begun
    # Connections held back now, by reason (ingest.held_counts): "buffer", "lookup",
    # "writing" (the client does not read its replies).
    held_connections: dict[str, int] = field(default_factory=dict)
    # Set when the database failed its check at start and was moved aside: a sentence
    # naming where it went, until the daemon restarts on a sound file.
    database_replaced: str | None = None
    seal_fault: str | None = None  # why sealing the hot table fails now (retried)
    tree_wait: str | None = None  # why the Merkle tree waits (proofs.ledger.waiting)
    # Why retention cannot delete what is due, or cannot get under max_bytes.
    retention_fault: str | None = None
    # Limits, disk use by component (at the last run), prune point, what went.
    retention: dict[str, Any] = field(default_factory=dict)
    # The partitioned store: count, sealed_through, hot_events, seal_backlog, ...
    partitions: dict[str, Any] = field(default_factory=dict)
    # Per projection: version, state, position, lag (and a rebuild's progress).
    projections: dict[str, Any] = field(default_factory=dict)
    # Forwarding (None when off): the /stats `forward` object, why it is degraded, and
    # why retention would have to delete unforwarded events (health fails).
    forward: dict[str, Any] | None = None
    forward_fault: str | None = None
    forward_blocked: str | None = None
    # The newest signed checkpoint: size, time, text (None before the first).
    checkpoint: dict[str, Any] | None = None


class StatusSource(Protocol):
    """The daemon as the status server sees it.

    Async members are awaited from request handlers; a request that is cancelled
    (client gone) cancels the await, so they must leave no half-done state behind
    a cancellation other than what their own transaction guarantees.
    """

    @property
    def config(self) -> Config:
        """The config in force now (replaced by a successful reload)."""
        ...

    @property
    def stats(self) -> Stats:
        """The live counters; read directly, never copied."""
        ...

    def gauges(self) -> Gauges:
        """A fresh snapshot of the figures `Gauges` lists."""
        ...

    def checkpoint_text(self) -> str | None:
        """The newest signed checkpoint's text, None before the first."""
        ...

    async def vacuum(self, dry_run: bool) -> dict[str, Any]:
        """Apply retention now and answer what went (`dry_run`: what would go)."""
        ...

    async def issue_checkpoint(self) -> dict[str, Any]:
        """Make what is committed durable and sign a checkpoint of it: {"size",
        "checkpoint": text} (the newest, when nothing new was committed). ActionRefused
        when no checkpoint can be signed."""
        ...

    async def record_origins(self, host: str, rows: list[tuple[int, int, int]]) -> dict[str, Any]:
        """Write imported events' origins (seq here, seq at `host`, received_at there):
        {"host", "origins": n, "new": n}; rows already written are left as they are."""
        ...

    async def proof(self, seq: int, size: int | None, uid: int | None) -> dict[str, Any]:
        """The inclusion proof document of `seq` (proofs.md); `uid` set: only for an
        event that uid wrote (ProofError 403 otherwise)."""
        ...

    async def consistency_proof(self, old: int, new: int) -> dict[str, Any]:
        """The consistency proof document between two stored checkpoint sizes."""
        ...

    @property
    def events(self) -> QueryEngine:
        """Queries over the stored events (/events, /streams, /correlations)."""
        ...

    async def dlq_list(self, limit: int, after: int | None,
                       uid: int | None) -> list[dict[str, Any]]:
        """Up to `limit` dead letters with dlq_id > `after`, oldest first.

        `uid` None means every entry; otherwise only entries written by that uid.
        Each entry: {"id": dlq_id, "seq", "source", "code", "reason", "size", "uid",
        "attempts", "first_failed_at", "last_failed_at"} plus "raw" as
        {"$bytes": base64}; timestamps as RFC 3339 strings.
        """
        ...

    async def dlq_retry(self, ids: list[int] | None) -> dict[str, Any]:
        """Feed these entries (None: all) back through validation and the writer.

        Returns a JSON-able summary, e.g. {"retried": n, "accepted": n, "failed": n,
        "missing": [ids not found]}. Raises ActionRefused for a request it will not do.
        """
        ...

    async def dlq_drop(self, ids: list[int] | None) -> dict[str, Any]:
        """Delete these entries (None: all); returns e.g. {"dropped": n, "missing": [...]}."""
        ...

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply the safe keys.

        Returns {"applied": [keys], "needs_restart": [keys]}; raises ConfigError with
        the reason for a bad file, and the old config keeps running.
        """
        ...

    async def backup(self, dest: str) -> dict[str, Any]:
        """A consistent online copy of the database at the absolute path `dest`.

        Returns e.g. {"dest": dest, "bytes": n, "seconds": s}; raises ActionRefused
        when `dest` exists or its folder does not, AuditdError when the copy fails.
        """
        ...

    async def recover(self, path: str) -> dict[str, Any]:
        """Salvage readable events of a damaged database file into the live store.

        Returns {"copied", "already_present", "unreadable", "into"}; the copied ids
        join the daemon's idempotency filter. Raises ActionRefused for a missing file.
        """
        ...

    async def projection_counts(self, query: CountsQuery,
                                uid: int | None) -> dict[str, Any]:
        """The /counts document: {"by", "interval", "projection", "complete",
        "buckets_json"}, the buckets ([[start, value, count], ...]) as JSON text that
        the server splices in as "buckets"; only `uid`'s events unless uid is None."""
        ...

    async def actor_summary(self, actor: str, uid: int | None) -> dict[str, Any] | None:
        """{"actor", "first_seen", "last_seen", "total", "last_seq", "last_event",
        "complete"}; None when the caller may see no event of that actor."""
        ...

    async def rebuild_projection(self, name: str) -> dict[str, Any]:
        """Drop a projection's rows and rebuild it in the background; ActionRefused
        for a name that is not a projection."""
        ...

    async def record_admin(self, action: str, uid: int, gid: int, pid: int, comm: str,
                           data: dict[str, Any]) -> str:
        """Append an `auditd.admin.<action>` event through the daemon's own ingest path.

        actor = admin_actor(uid, comm); pid/uid/gid/comm = the operator's credentials
        (not the daemon's); data = `data` (the request and its outcome). Waits a bounded
        time: "recorded" once the event is journaled; "queued" when ingest could not
        take it in time (kept and recorded as soon as ingest can); "suppressed" when
        that queue is full (counted in an auditd.admin.suppressed event, logged whole).
        Raises only for an unexpected failure.
        """
        ...

    # -- follow (GET /tail) ----------------------------------------------------------

    @property
    def feed(self) -> CommitFeed:
        """Committed events offered to followers as each batch commits."""
        ...
