"""Health: named checks over a small snapshot, as a pure function so tests need no daemon.

A check that fails is either `degraded` (auditd still accepts and commits, but an
operator should look) or `failing` (events are not being accepted or not being
made durable). The overall status is the worst failed check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from auditd.status.source import StatusSource

Severity = Literal["degraded", "failing"]

# Longer than the writer's capped retry delay (5 s by default) plus a slow commit, so
# one backoff step alone never reads as a stall.
STALL_AFTER_S = 10.0
# A healthy writer commits within batch_delay_ms; seconds of backlog mean it is
# falling behind ingest even though it still makes progress.
PENDING_AGE_BOUND_S = 5.0


@dataclass(slots=True, frozen=True)
class HealthInputs:
    pending: int
    oldest_pending_age_s: float
    since_commit_s: float  # seconds since the writer last finished a commit
    disk_free_bytes: int  # -1 when unknown
    reserve_bytes: int
    dlq_bytes: int
    dlq_max_bytes: int
    replay_finished: bool
    replay_done: int = 0
    replay_total: int = 0
    writer_fault: str | None = None
    database_fault: str | None = None
    database_damage: str | None = None
    ingest_refusal: str | None = None
    journal_fault: str | None = None
    id_lookup_fault: str | None = None
    seal_fault: str | None = None
    tree_wait: str | None = None
    retention_fault: str | None = None
    forward_on: bool = False
    forward_fault: str | None = None
    forward_blocked: str | None = None
    forward_warning: str | None = None
    stopping: bool = False
    database_replaced: str | None = None
    stall_after_s: float = STALL_AFTER_S
    pending_age_bound_s: float = PENDING_AGE_BOUND_S


@dataclass(slots=True, frozen=True)
class Check:
    ok: bool
    detail: str  # one sentence, for the operator
    severity: Severity  # what a failure of this check means

    def document(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ok": self.ok, "detail": self.detail}
        if not self.ok:
            body["severity"] = self.severity
        return body


@dataclass(slots=True, frozen=True)
class Health:
    status: Literal["ok", "degraded", "failing"]
    checks: dict[str, Check]

    @property
    def http_status(self) -> int:
        return 200 if self.status == "ok" else 503

    def document(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": self.status,
            "checks": {name: check.document() for name, check in self.checks.items()},
        }
        problems = {name: c.detail for name, c in self.checks.items() if not c.ok}
        if problems:
            body["problems"] = problems
        return body


def inputs_from(source: StatusSource) -> HealthInputs:
    """Gather the snapshot from the daemon; the only impure step."""
    config, stats, gauges = source.config, source.stats, source.gauges()
    return HealthInputs(
        pending=gauges.pending,
        oldest_pending_age_s=gauges.oldest_pending_age_s,
        since_commit_s=max(0.0, time.monotonic() - stats.last_commit_at),
        disk_free_bytes=gauges.disk_free_bytes,
        reserve_bytes=config.size("storage", "reserve_bytes"),
        dlq_bytes=gauges.dlq_bytes,
        dlq_max_bytes=config.size("storage", "dlq_max_bytes"),
        replay_finished=stats.replay_finished,
        replay_done=stats.replay_done,
        replay_total=stats.replay_total,
        writer_fault=gauges.writer_fault,
        database_fault=gauges.database_fault,
        database_damage=gauges.database_damage,
        ingest_refusal=gauges.ingest_refusal,
        journal_fault=gauges.journal_fault,
        id_lookup_fault=gauges.id_lookup_fault,
        seal_fault=gauges.seal_fault,
        tree_wait=gauges.tree_wait,
        retention_fault=gauges.retention_fault,
        forward_on=gauges.forward is not None,
        forward_fault=gauges.forward_fault,
        forward_blocked=gauges.forward_blocked,
        forward_warning=None if gauges.forward is None else gauges.forward.get("warning"),
        stopping=gauges.stopping,
        database_replaced=gauges.database_replaced,
    )


def evaluate(h: HealthInputs) -> Health:
    checks = {
        "running": _running(h),
        "replay_finished": _replay(h),
        "writer_progress": _writer_progress(h),
        "pending_age": _pending_age(h),
        "database_writable": _database_writable(h),
        "database_intact": _database_intact(h),
        "journal_writable": _fault(h.journal_fault,
                                   "the journal accepts appends and its syncs succeed",
                                   "failing"),
        "ingest_accepting": _fault(h.ingest_refusal, "ingest accepts events", "degraded"),
        # Failing: a frame whose ids need the database is answered overloaded meanwhile,
        # so a client resending after a lost reply cannot get its events in.
        "id_lookup": _fault(h.id_lookup_fault, "id lookups in the database succeed",
                            "failing"),
        # Degraded: ingest goes on in the hot table, which grows past its bound.
        "sealing": _fault(h.seal_fault, "the hot table is sealed as it fills", "degraded"),
        # Degraded: events are taken and stored, but new checkpoints cover none of them.
        "proofs_tree": _fault(h.tree_wait, "the Merkle tree covers every committed seq",
                              "degraded"),
        # Degraded: events are taken and kept; what is due for deletion stays for now.
        "retention": _fault(h.retention_fault, "retention keeps the store within its "
                            "limits", "degraded"),
        "disk_space": _disk(h),
        "dead_letter_quota": _dead_letters(h),
    }
    if h.forward_on:
        checks["forwarding"] = _forwarding(h)
    failed = [c for c in checks.values() if not c.ok]
    if any(c.severity == "failing" for c in failed):
        return Health("failing", checks)
    return Health("degraded" if failed else "ok", checks)


def _forwarding(h: HealthInputs) -> Check:
    # Failing: ingest refuses events rather than retention deleting unforwarded ones.
    if h.forward_blocked is not None:
        return Check(False, h.forward_blocked, "failing")
    if h.forward_fault is not None:  # events are kept; the central copy falls behind
        return Check(False, h.forward_fault, "degraded")
    fine = "committed events are forwarded to NATS JetStream"
    return Check(True, f"{fine}; warning: {h.forward_warning}" if h.forward_warning else fine,
                 "degraded")


def _running(h: HealthInputs) -> Check:
    if h.stopping:
        return Check(False, "the daemon is stopping and no longer accepts events", "failing")
    return Check(True, "the daemon is running", "failing")


def _replay(h: HealthInputs) -> Check:
    if h.replay_finished:
        return Check(True, "journal replay finished", "degraded")
    of_total = f" of {h.replay_total}" if h.replay_total else ""
    return Check(False, f"replaying the journal: {h.replay_done}{of_total} events so far",
                 "degraded")


def _writer_progress(h: HealthInputs) -> Check:
    # Both conditions: an event that arrives after a long idle spell is young, and a
    # writer that just committed is moving even when the backlog is old.
    stalled = (h.pending > 0 and h.oldest_pending_age_s > h.stall_after_s
               and h.since_commit_s > h.stall_after_s)
    if stalled:
        why = f": {h.writer_fault}" if h.writer_fault else ""
        return Check(False, f"no commit for {h.since_commit_s:.0f} s while {h.pending} "
                     f"events wait{why}", "failing")
    if h.pending == 0:
        return Check(True, "nothing is waiting to be committed", "failing")
    return Check(True, f"last commit {h.since_commit_s:.1f} s ago", "failing")


def _pending_age(h: HealthInputs) -> Check:
    age, bound = h.oldest_pending_age_s, h.pending_age_bound_s
    if age > bound:
        return Check(False, f"the oldest pending event has waited {age:.1f} s, "
                     f"over the {bound:g} s bound", "degraded")
    return Check(True, f"the oldest pending event has waited {age:.3f} s", "degraded")


def _database_writable(h: HealthInputs) -> Check:
    """Failing when the database itself refuses (a fault an operator must clear),
    degraded while commits fail in ways that pass by themselves (busy, I/O, full)."""
    if h.database_fault is not None:
        return Check(False, h.database_fault, "failing")
    return _fault(h.writer_fault, "commits succeed", "degraded")


def _database_intact(h: HealthInputs) -> Check:
    if h.database_damage is not None:
        return Check(False, h.database_damage, "failing")
    return _fault(h.database_replaced, "the database passed its integrity check at start",
                  "degraded")


def _fault(reason: str | None, fine: str, severity: Severity) -> Check:
    return Check(reason is None, reason or fine, severity)


def _disk(h: HealthInputs) -> Check:
    if h.disk_free_bytes < 0:
        return Check(True, "free disk space is unknown", "failing")
    if h.disk_free_bytes < h.reserve_bytes:
        return Check(False, f"{_size(h.disk_free_bytes)} free on the storage volume, below "
                     f"the {_size(h.reserve_bytes)} reserve", "failing")
    return Check(True, f"{_size(h.disk_free_bytes)} free on the storage volume", "failing")


def _dead_letters(h: HealthInputs) -> Check:
    if h.dlq_bytes >= h.dlq_max_bytes:
        return Check(False, f"the dead-letter store holds {_size(h.dlq_bytes)}, at or over "
                     f"its {_size(h.dlq_max_bytes)} quota", "degraded")
    return Check(True, f"the dead-letter store holds {_size(h.dlq_bytes)} of "
                 f"{_size(h.dlq_max_bytes)}", "degraded")


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KB", "MB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"
