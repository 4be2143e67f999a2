"""`auditd forward replay`: read one host's messages back from the stream, in stream
order, and check the copy is complete: every seq from `--from-seq` once, in order, with
no gap, each body hashing to its `Auditd-Leaf` header and, where the local store still
holds the seq, equal to the local record E byte for byte. What a central team runs to
prove the copy is complete.
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
from nats.js import api

from auditd.config import Config
from auditd.errors import AuditdError
from auditd.forward.connection import connect_options
from auditd.forward.messages import checkpoint_subject, render_subject, token
from auditd.proofs.merkle import leaf_hash
from auditd.proofs.records import RecordSource
from auditd.store.sealing.catalog import PARTITIONS_DIR

_T = TypeVar("_T")
_MAX_LISTED = 20
# A cluster that just lost or regained a node elects leaders for seconds, and a JetStream
# API request sent meanwhile may never be answered: each is asked again every
# _REQUEST_S until _WAIT_S, which is also how long the next message may take (one 5 s
# try failed a replay right after a stream leader's restart).
_WAIT_S = 30.0
_REQUEST_S = 3.0
_CHUNK = 4096


class ReplayTimeout(AuditdError):
    """The servers stopped answering (a cluster without a leader, a stalled consumer)."""


@dataclass
class ReplayReport:
    host: str
    first: int
    events: int = 0
    checkpoints: int = 0
    last_seq: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)  # missing [lo, hi]
    repeats: list[int] = field(default_factory=list)  # seqs seen more than once
    bad: list[str] = field(default_factory=list)  # leaf or body mismatches
    compared: int = 0  # bodies compared with the local store
    local_last: int | None = None  # the local store's last committed seq

    @property
    def complete(self) -> bool:
        return not (self.gaps or self.repeats or self.bad) and (
            self.local_last is None or self.last_seq >= self.local_last)

    def document(self) -> dict[str, Any]:
        return {"host": self.host, "from_seq": self.first, "events": self.events,
                "checkpoints": self.checkpoints, "last_seq": self.last_seq,
                "gaps": self.gaps[:_MAX_LISTED], "repeats": self.repeats[:_MAX_LISTED],
                "mismatches": self.bad[:_MAX_LISTED], "compared_with_store": self.compared,
                "store_last_committed_seq": self.local_last, "complete": self.complete}


class LocalRecords:
    """The local store's records, read in chunks, for comparison (absent: skipped)."""

    def __init__(self, storage: Path) -> None:
        path = storage / "auditd.db"
        # Used from one worker thread at a time (each call awaited), not always the same.
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                  check_same_thread=False) \
            if path.is_file() else None
        self.cache: dict[int, bytes] = {}
        self.last: int | None = None
        if self.db is not None:
            self.db.execute("BEGIN")
            self.last = int(self.db.execute(
                "SELECT value FROM meta WHERE key = 'committed_seq'").fetchone()[0])
            self.source = RecordSource(self.db, storage / PARTITIONS_DIR)

    def record(self, seq: int) -> bytes | None:
        if self.db is None:
            return None
        if seq not in self.cache:
            self.cache = dict(self.source.records(seq, seq + 4095))
        return self.cache.get(seq)

    def close(self) -> None:
        if self.db is not None:
            self.source.close()
            self.db.close()


def check_chunk(report: ReplayReport, local: LocalRecords,
                chunk: list[tuple[int, bytes, str | None]]) -> None:
    """Seqs in stream order: each once, the next one each time, bodies intact."""
    for seq, body, leaf in chunk:
        if report.events and seq <= report.last_seq:
            report.repeats.append(seq)
            continue
        expected = report.last_seq + 1 if report.events else report.first
        if seq > expected:
            report.gaps.append((expected, seq - 1))
        report.events += 1
        report.last_seq = seq
        if leaf != base64.b64encode(leaf_hash(body)).decode():
            report.bad.append(f"seq {seq}: the body does not hash to its Auditd-Leaf header")
        held = local.record(seq)
        if held is not None:
            report.compared += 1
            if held != body:
                report.bad.append(f"seq {seq}: the body differs from the local store's record")


async def asked(request: Callable[[], Awaitable[_T]]) -> _T:
    """`request`, asked again while it times out, until _WAIT_S."""
    deadline = time.monotonic() + _WAIT_S
    while True:
        try:
            return await request()
        except TimeoutError:
            if time.monotonic() + _REQUEST_S > deadline:
                raise


async def replay(config: Config, host: str, from_seq: int, storage: Path) -> ReplayReport:
    settings = config.forward
    nc = await nats.connect(**connect_options(settings), allow_reconnect=False)
    report = ReplayReport(host, from_seq)
    local = await asyncio.to_thread(LocalRecords, storage)
    report.local_last = local.last
    checkpoints = checkpoint_subject(token(host))
    events = render_subject(settings.subject, token(host), "*", "*")
    # One consumer for both when the template starts audit.{host}. (the default).
    both = f"audit.{token(host)}.>"
    wanted = both if settings.subject.startswith("audit.{host}.") else events
    waiting_for = "the stream's info"
    try:
        js = nc.jetstream(timeout=_REQUEST_S)
        info = await asked(lambda: js.stream_info(settings.stream))
        if info.state.messages == 0:
            return report
        waiting_for = "a consumer"
        sub = await asked(lambda: js.subscribe(
            wanted, stream=settings.stream, ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL))
        chunk: list[tuple[int, bytes, str | None]] = []
        waiting_for = "the first message"
        try:
            while True:
                msg = await sub.next_msg(timeout=_WAIT_S)
                waiting_for = f"the message after stream seq {msg.metadata.sequence.stream}"
                headers = msg.headers or {}
                if msg.subject == checkpoints:
                    report.checkpoints += 1
                elif headers.get("Nats-Msg-Id", "").startswith(f"{host}:"):
                    seq = int(headers.get("Auditd-Seq", "0"))
                    if seq >= from_seq:
                        chunk.append((seq, msg.data, headers.get("Auditd-Leaf")))
                done = msg.metadata.num_pending == 0
                if len(chunk) >= _CHUNK or (done and chunk):
                    await asyncio.to_thread(check_chunk, report, local, chunk)
                    chunk = []
                if done:
                    break
        finally:
            await sub.unsubscribe()
    except TimeoutError as exc:
        raise ReplayTimeout(f"no answer from the NATS servers within {_WAIT_S:.0f}s, waiting "
                            f"for {waiting_for}") from exc
    finally:
        await asyncio.to_thread(local.close)
        await nc.close()
    return report
