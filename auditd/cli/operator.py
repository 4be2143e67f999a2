"""Operator commands that talk to a running daemon over its status socket (HTTP).

`auditd status`, `auditd dlq list|retry|drop` and `auditd backup DEST`. Each returns an
exit code: 0 done, 1 the daemon refused or is unreachable or unhealthy. An answer that
is not the status API's (not HTTP, not JSON, a closed connection: another program on
the socket, or a proxy's error page) is an operational failure with one line, never a
traceback. Usage errors (`UsageError`) are found before anything is sent.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import os
import socket
import sys
from typing import Any

from auditd.cli.parser import UsageError
from auditd.errors import AuditdError

EXIT_OK, EXIT_FAILURE = 0, 1
_TIMEOUT_S = 300.0  # a backup of a large store takes a while


class StatusUnreachable(AuditdError):
    """The status socket did not answer."""


class StatusReplyError(AuditdError):
    """Something answered on the status socket, but not with the status API's JSON."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket: the status API's requests and answers are small
    and one at a time, and the stdlib client starts in a fraction of aiohttp's time
    (an operator command paid ~0.2 s importing aiohttp's client and its TLS setup)."""

    def __init__(self, socket_path: str, timeout: float = _TIMEOUT_S) -> None:
        super().__init__("auditd", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _document(socket_path: str, status: int, raw: bytes) -> dict[str, Any]:
    """The reply body as a JSON object, or a one-line StatusReplyError saying what came."""
    try:
        document = json.loads(raw)
    except ValueError:  # includes bytes that are not UTF-8
        shown = raw[:80].decode("utf-8", errors="replace")
        raise StatusReplyError(f"{socket_path} answered HTTP {status} with a body that is "
                               f"not JSON: {_one_line(shown)!r}") from None
    if not isinstance(document, dict):
        raise StatusReplyError(f"{socket_path} answered HTTP {status} with JSON that is not "
                               f"an object: {_one_line(json.dumps(document)[:80])}")
    return document


def _one_line(text: str) -> str:
    return " ".join(text.split())


def call(socket_path: str, method: str, path: str,
         body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """One request to the status API; its HTTP status and JSON object."""
    conn = UnixHTTPConnection(socket_path)
    try:
        try:
            conn.connect()
        except OSError as exc:
            raise StatusUnreachable(
                f"cannot reach the daemon at {socket_path}: {exc.strerror or exc}") from None
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {} if payload is None else {"Content-Type": "application/json"}
            # A server may answer once it has the headers and close without reading the
            # body (a proxy's error page does): its answer is still there to be read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except TimeoutError:
            raise StatusReplyError(f"{socket_path} did not answer {method} {path} within "
                                   f"{_TIMEOUT_S:.0f} s") from None
        except (http.client.HTTPException, ConnectionError) as exc:
            # Connected, then no usable HTTP answer: another program on the socket.
            reason = str(exc) or type(exc).__name__
            raise StatusReplyError(f"{socket_path} did not answer {method} {path} as the "
                                   f"auditd status API: {_one_line(reason)}") from None
        return response.status, _document(socket_path, response.status, raw)
    finally:
        conn.close()


def _refusal(status: int, document: dict[str, Any]) -> int:
    print(f"auditd: {document.get('message') or document.get('error') or status}",
          file=sys.stderr)
    return EXIT_FAILURE


def _size(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return str(value)


def _when(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def render_status(health: dict[str, Any], stats: dict[str, Any]) -> str:
    """The readable summary: state first, then throughput, backlog, latency, storage."""
    lines = [f"state:        {health.get('status', '?')}"]
    for name, check in health.get("checks", {}).items():
        if not check.get("ok", True):
            lines.append(f"  ! {name}: {check.get('detail', '')}")
    rates = stats.get("rates", {})
    commit = stats.get("commit_latency_ms", {})
    reply = stats.get("reply_latency_ms", {})
    lines += [
        f"events:       {stats.get('accepted', 0)} accepted, {stats.get('committed', 0)} "
        f"committed, {stats.get('rejected', 0)} rejected, {stats.get('duplicates', 0)} "
        "duplicates",
        f"rates:        {rates.get('accepted_per_s', 0)}/s accepted, "
        f"{rates.get('committed_per_s', 0)}/s committed",
        f"pending:      {stats.get('pending', 0)} of {stats.get('buffer_capacity', 0)} "
        f"(oldest {stats.get('oldest_pending_age_s', 0)} s)",
        f"last seq:     {stats.get('last_seq', 0)} "
        f"(committed {stats.get('last_committed_seq', 0)})",
        f"latency:      reply p50 {reply.get('p50', 0)} ms p99 {reply.get('p99', 0)} ms; "
        f"commit p50 {commit.get('p50', 0)} ms p99 {commit.get('p99', 0)} ms",
        f"connections:  {stats.get('connections', 0)}",
        f"disk:         database {_size(stats.get('db_bytes', 0))}, journal "
        f"{_size(stats.get('journal_bytes', 0))}, free {_size(stats.get('disk_free_bytes', 0))}",
        f"dead letters: {stats.get('dlq_entries', 0)} ({_size(stats.get('dlq_bytes', 0))}), "
        f"{stats.get('dead_letters_dropped_by_reason', {}).get('quota', 0)} dropped over "
        f"quota, {stats.get('dead_letters_dropped_by_reason', {}).get('operator', 0)} by "
        "operators",
        f"uptime:       {stats.get('uptime_s', 0)} s",
    ]
    parts = stats.get("partitions") or {}
    if parts:
        last = parts.get("last_seal_seconds")
        lines.insert(-1, (
            f"partitions:   {parts.get('count', 0)} sealed through seq "
            f"{parts.get('sealed_through', 0)}, {parts.get('hot_events', 0)} hot events"
            + (", sealing now" if parts.get("sealing") else "")
            + (f"; last seal {last:.1f} s" if last is not None else "")))
    projections = stats.get("projections") or {}
    if projections:
        live = sum(1 for p in projections.values() if p.get("state") == "live")
        lag = max((p.get("lag", 0) for p in projections.values()), default=0)
        lines.insert(-1, f"projections:  {live} of {len(projections)} live, lag {lag} events"
                     + ("" if live == len(projections) else "; rebuilding the others"))
    retention = stats.get("retention") or {}
    disk = retention.get("disk") or {}
    if disk:
        limit = retention.get("max_bytes") or 0
        lines.insert(-1, (
            f"disk use:     {_size(disk.get('total', 0))}"
            + (f" of {_size(limit)}" if limit else "") + f": partitions "
            f"{_size(disk.get('partitions', 0))} ({disk.get('partition_files', 0)} files), "
            f"database {_size(disk.get('database', 0))}, WAL {_size(disk.get('wal', 0))}, "
            f"journal {_size(disk.get('journal', 0))}, archive {_size(disk.get('archive', 0))}"))
        oldest = retention.get("oldest_received_at")
        lines.insert(-1, (
            f"retention:    max_age {retention.get('max_age')}; oldest event seq "
            f"{retention.get('oldest_seq')}"
            + (f" received {_when(oldest)}" if oldest else "")
            + (f"; next deletion by age {_when(retention['next_deletion_by_age_at'])}"
               if retention.get("next_deletion_by_age_at") else "")))
    if "forward" in stats:
        from auditd.cli.forward import line

        lines.insert(-1, line(stats["forward"]))
    checkpoint = stats.get("checkpoint")
    lines.insert(-1, "checkpoint:   none yet" if not checkpoint else (
        f"checkpoint:   size {checkpoint.get('size')} at {checkpoint.get('time')} "
        f"(unix), {checkpoint.get('issued', 0)} issued since start"
        + (f"; REFUSED: {checkpoint['refused']}" if checkpoint.get("refused") else "")))
    return "\n".join(lines)


def status(socket_path: str, as_json: bool) -> int:
    health_code, health = call(socket_path, "GET", "/health")
    stats_code, stats = call(socket_path, "GET", "/stats")
    if stats_code != 200:
        return _refusal(stats_code, stats)
    if as_json:
        print(json.dumps({"health": health, "stats": stats}))
    else:
        print(render_status(health, stats))
    return EXIT_OK if health_code == 200 else EXIT_FAILURE


def _selection(action: str, ids: list[int], everything: bool) -> dict[str, Any]:
    """The request body for retry/drop; the same rule as the API: ids or all, not both."""
    if everything and ids:
        raise UsageError(f"dlq {action}: name dead-letter ids or --all, not both")
    if everything:
        return {"all": True}
    if not ids:
        raise UsageError(f"dlq {action}: name dead-letter ids, or --all for every entry")
    return {"ids": ids}


def dlq(socket_path: str, action: str, ids: list[int], everything: bool, as_json: bool,
        limit: int) -> int:
    if action == "list":
        if ids or everything:
            raise UsageError("dlq list takes no ids and no --all; it lists the first "
                             "--limit entries")
        code, document = call(socket_path, "GET", f"/dlq?limit={limit}")
        if code != 200:
            return _refusal(code, document)
        if as_json:
            print(json.dumps(document))
            return EXIT_OK
        for entry in document.get("dead_letters", []):
            print(f"{entry.get('id', '?'):>8} seq={entry.get('seq') or '-':<8} "
                  f"{entry.get('source', '?'):<8} {entry.get('code', '?'):<14} "
                  f"attempts={entry.get('attempts', '?')} {entry.get('reason', '')}")
        return EXIT_OK
    selection = _selection(action, ids, everything)  # before any request is sent
    code, document = call(socket_path, "POST", f"/dlq/{action}", selection)
    if code != 200:
        return _refusal(code, document)
    print(json.dumps(document))
    return EXIT_OK


def backup(socket_path: str, dest: str, as_json: bool) -> int:
    target = os.path.abspath(dest)
    if sys.stderr.isatty():
        print(f"backing up to {target} ...", file=sys.stderr)
    code, document = call(socket_path, "POST", "/backup", {"dest": target})
    if code != 200:
        return _refusal(code, document)
    result = document.get("result", document)
    print(json.dumps(document) if as_json else
          f"backup written to {result.get('dest', target)}: {result.get('bytes', '?')} bytes "
          f"in {result.get('seconds', '?')} s")
    return EXIT_OK


def vacuum(socket_path: str, dry_run: bool, as_json: bool) -> int:
    """Apply retention now, through the daemon (it waits until retention is done)."""
    code, document = call(socket_path, "POST", "/vacuum", {"dry_run": dry_run})
    if code != 200:
        return _refusal(code, document)
    result = document.get("result", document)
    if as_json:
        print(json.dumps(document))
        return EXIT_OK
    drops = result.get("would_delete" if dry_run else "deleted", [])
    verb = "would delete" if dry_run else "deleted"
    for drop in drops:
        what = (f"partition {drop['file']}" if drop["kind"] == "partition"
                else f"archive file {drop['file']}")
        print(f"{verb} {what}: seqs {drop['first_seq']}-{drop['last_seq']}, "
              f"{drop['events']} events, {_size(drop['bytes'])} ({drop['reason']})")
    disk = result.get("disk", {})
    limit = result.get("max_bytes") or 0
    print(f"{len(drops)} {'would go' if dry_run else 'deleted'}; disk use "
          f"{_size(disk.get('total', 0))}"
          + (f" of max_bytes {_size(limit)}" if limit else " (no max_bytes)")
          + (f"; {result['waiting']}" if result.get("waiting") else ""))
    if result.get("over_max_bytes_after"):
        print("auditd: still over retention.max_bytes: only the hot table, the journal and "
              "the database are left, or the rest waits for a checkpoint", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
