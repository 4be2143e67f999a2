"""`auditd import FILE`: an export's events into the running daemon (docs/design/
export.md).

First the whole file is checked against its manifest (reader.check_file): a file that
does not match adds no event. Then its events go through the daemon's ingest socket
with their ids, in pipelined batches, so the daemon assigns them new seqs, journals
them, counts them and puts them in its Merkle tree as it does any event; an id it
already holds comes back as a duplicate (importing twice adds nothing). Where each came
from (host, seq, received_at) goes to `POST /import/origins` on the status socket
(admin), which the daemon writes into `event_origins` on its writer: for the new
events and the duplicates alike, so a re-run repairs an import cut between the two.
Dead letters are counted, not imported: they hold no event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from auditd.client import Client
from auditd.client.common import Reply
from auditd.errors import AuditdError
from auditd.ingest.framing import encode_frame
from auditd.lifecycle.progress import Progress
from auditd.lifecycle.reader import FileCheck, Record, records, wire_bytes

_BATCH = 1000  # events a frame
_FRAMES = 16  # frames in flight at once
_ORIGINS_EVERY = 20_000
_TIMEOUT_S = 300.0


class ImportRefused(AuditdError):
    """The daemon cannot take the import (not running, not an admin, a refused frame)."""


@dataclass
class ImportReport:
    new: int = 0
    duplicates: int = 0
    refused: int = 0
    dead_letters: int = 0
    already_imported: int = 0  # of the duplicates: known by their origin, not sent
    refusals: list[str] = field(default_factory=list)  # the first few, for the operator
    seconds: float = 0.0

    def document(self, check: FileCheck) -> dict[str, Any]:
        m = check.manifest
        return {"new": self.new, "duplicates": self.duplicates, "refused": self.refused,
                "dead_letters_skipped": self.dead_letters,
                "already_imported": self.already_imported, "refusals": self.refusals,
                "origin_host": m.host, "first_seq": m.first_seq, "last_seq": m.last_seq,
                "root_checked": check.root_checked,
                "signature_checked": check.signature_checked, "notes": check.notes,
                "seconds": round(self.seconds, 3)}


class OriginSink:
    """Origins posted to the daemon in bodies of _ORIGINS_EVERY."""

    def __init__(self, status_socket: str, host: str) -> None:
        self.status_socket, self.host = status_socket, host
        self.pending: list[tuple[int, int, int]] = []
        self.posted = 0

    def add(self, seq: int, record: Record) -> None:
        self.pending.append((seq, record.seq, record.received_at))

    def flush(self, force: bool = False) -> None:
        if self.pending and (force or len(self.pending) >= _ORIGINS_EVERY):
            asyncio.run(_post_origins(self.status_socket, self.host, self.pending))
            self.posted += len(self.pending)
            self.pending = []

    def preflight(self) -> list[tuple[int, int]]:
        """An empty post: the caller must be an admin before any event is sent. Then
        the runs of this host's seqs already imported here (a re-run skips them)."""
        asyncio.run(_post_origins(self.status_socket, self.host, []))
        return asyncio.run(_imported_runs(self.status_socket, self.host))


async def _status_request(socket_path: str, method: str, path: str,
                          **options: Any) -> tuple[int, bytes]:
    """One call on the status socket: (HTTP status, body); ImportRefused when the
    socket does not answer."""
    connector = aiohttp.UnixConnector(path=socket_path)
    limit = aiohttp.ClientTimeout(total=_TIMEOUT_S)
    try:
        async with (aiohttp.ClientSession(connector=connector, timeout=limit) as session,
                    session.request(method, f"http://auditd{path}", **options) as response):
            return response.status, await response.read()
    except (aiohttp.ClientError, OSError) as exc:
        raise ImportRefused(f"cannot reach the daemon's status socket {socket_path}: "
                            f"{exc}") from None


async def _imported_runs(socket_path: str, host: str) -> list[tuple[int, int]]:
    status, raw = await _status_request(socket_path, "GET", "/import/origins",
                                        params={"host": host})
    if status != 200:
        raise ImportRefused(f"the daemon did not list what was imported before (HTTP "
                            f"{status}): {raw[:200].decode(errors='replace')}")
    return [(int(lo), int(hi)) for lo, hi in json.loads(raw)["runs"]]


class _Known:
    """Membership in ascending [first, last] runs, for records met in ascending seq."""

    def __init__(self, runs: list[tuple[int, int]]) -> None:
        self.runs, self.at = runs, 0

    def count_within(self, first: int, last: int) -> int:
        return sum(max(0, min(hi, last) - max(lo, first) + 1) for lo, hi in self.runs)

    def __contains__(self, seq: int) -> bool:
        runs = self.runs
        while self.at < len(runs) and runs[self.at][1] < seq:
            self.at += 1
        return self.at < len(runs) and runs[self.at][0] <= seq


async def _post_origins(socket_path: str, host: str, rows: list[tuple[int, int, int]]) -> None:
    status, raw = await _status_request(socket_path, "POST", "/import/origins",
                                        json={"host": host, "origins": rows})
    if status != 200:
        try:
            message = json.loads(raw).get("message") or raw[:200].decode(errors="replace")
        except ValueError:
            message = raw[:200].decode(errors="replace")
        raise ImportRefused(f"the daemon refused the import's origins (HTTP {status}): "
                            f"{message}")


def import_file(path: str, check: FileCheck, ingest_socket: str, status_socket: str, *,
                max_frame_bytes: int = 1 << 20, max_batch: int = _BATCH) -> ImportReport:
    """Send the checked file's events to the daemon; the counts of what it did."""
    report = ImportReport(dead_letters=check.dead_letters)
    sink = OriginSink(status_socket, check.manifest.host)
    known = _Known(sink.preflight())
    m = check.manifest
    if m.complete and known.count_within(m.first_seq, m.last_seq) == check.events:
        # Every seq of a complete range that holds an event is imported already (the
        # origins only ever name such seqs): nothing to send, no second read.
        report.duplicates = report.already_imported = check.events
        return report
    progress = Progress("import", check.events)
    try:
        client = Client(ingest_socket, raise_on_reject=False, reconnect=False)
        client.connect()
    except AuditdError as exc:
        raise ImportRefused(f"import needs the running daemon (it assigns the new seqs): "
                            f"{exc}") from None
    frames = _Frames(max_frame_bytes, min(max_batch, _BATCH))
    try:
        _send(path, client, frames, known, report, sink, progress)
    except BaseException:
        # What the daemon acknowledged before the failure keeps its origin.
        with contextlib.suppress(AuditdError):
            sink.flush(force=True)
        raise
    sink.flush(force=True)
    report.seconds = progress.finish()
    return report


def _send(path: str, client: Client, frames: _Frames, known: _Known, report: ImportReport,
          sink: OriginSink, progress: Progress) -> None:
    with client, records(path) as (_, _, found):
        for record in found:
            if record.dead_letter:
                continue
            if record.seq in known:  # imported before, its origin written: nothing to do
                report.duplicates += 1
                report.already_imported += 1
                progress.step(1)
                continue
            encoded = wire_bytes(record)
            if len(encoded) > frames.room:
                report.refused += 1
                if len(report.refusals) < 5:
                    report.refusals.append(f"seq {record.seq}: too_large: {len(encoded)} "
                                           "bytes, over ingest.max_frame_bytes")
                continue
            frames.add(record, encoded)
            if len(frames.ready) == _FRAMES:
                _exchange(client, frames.take(), report, sink, progress)
        frames.cut()
        if frames.ready:
            _exchange(client, frames.take(), report, sink, progress)


class _Frames:
    """Events packed into frames of at most `max_events` and `max_bytes` (ingest's
    limits): a frame body is an array header and the events' maps, encoded once."""

    def __init__(self, max_bytes: int, max_events: int) -> None:
        self.room = max_bytes - 5  # the array header
        self.max_events = max_events
        self.batch: list[Record] = []
        self.parts: list[bytes] = []
        self.size = 0
        self.ready: list[tuple[list[Record], bytes]] = []

    def add(self, record: Record, encoded: bytes) -> None:
        if len(self.batch) == self.max_events or self.size + len(encoded) > self.room:
            self.cut()
        self.batch.append(record)
        self.parts.append(encoded)
        self.size += len(encoded)

    def cut(self) -> None:
        if self.batch:
            body = b"\xdd" + len(self.batch).to_bytes(4, "big") + b"".join(self.parts)
            self.ready.append((self.batch, encode_frame(body)))
            self.batch, self.parts, self.size = [], [], 0

    def take(self) -> list[tuple[list[Record], bytes]]:
        ready, self.ready = self.ready, []
        return ready


def _exchange(client: Client, frames: list[tuple[list[Record], bytes]],
              report: ImportReport, sink: OriginSink, progress: Progress) -> None:
    replies = client.send_frames([frame for _, frame in frames])
    for (batch, _), reply in zip(frames, replies, strict=True):
        _count(batch, reply, report, sink)
        progress.step(len(batch))
    sink.flush()


def _count(batch: list[Record], reply: Reply, report: ImportReport, sink: OriginSink) -> None:
    if reply.error is not None:
        raise ImportRefused(f"the daemon refused a batch: {reply.error}: {reply.message} "
                            f"({report.new} events imported so far; run the import again "
                            "to finish it, it adds nothing twice)")
    refused = {index for index, _, _ in reply.rejected}
    for index, code, message in reply.rejected[:max(0, 5 - len(report.refusals))]:
        report.refusals.append(f"seq {batch[index].seq}: {code}: {message}")
    duplicates = dict(reply.duplicates)
    accepted = [i for i in range(len(batch)) if i not in refused and i not in duplicates]
    if len(accepted) != reply.ok or (reply.ok and (reply.first is None or reply.last is None
                                                   or reply.last - reply.first + 1 != reply.ok)):
        raise ImportRefused(f"the daemon's reply does not map onto the batch: ok={reply.ok}, "
                            f"first={reply.first}, last={reply.last}")
    for offset, index in enumerate(accepted):
        assert reply.first is not None
        sink.add(reply.first + offset, batch[index])
    for index, seq in duplicates.items():
        sink.add(seq, batch[index])
    report.new += reply.ok
    report.duplicates += len(duplicates)
    report.refused += len(refused)
