"""Operator commands that talk to a running daemon over its status socket (HTTP, aiohttp).

`auditd status`, `auditd dlq list|retry|drop` and `auditd backup DEST`. Each returns an
exit code: 0 done, 1 the daemon refused or is unreachable or unhealthy.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import aiohttp

from auditd.errors import AuditdError

EXIT_OK, EXIT_FAILURE = 0, 1
_TIMEOUT_S = 300.0  # a backup of a large store takes a while


class StatusUnreachable(AuditdError):
    """The status socket did not answer."""


async def _call(socket_path: str, method: str, path: str,
                body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    connector = aiohttp.UnixConnector(path=socket_path)
    limit = aiohttp.ClientTimeout(total=_TIMEOUT_S)
    try:
        async with (aiohttp.ClientSession(connector=connector, timeout=limit) as session,
                    session.request(method, f"http://auditd{path}", json=body) as response):
            document: dict[str, Any] = await response.json(content_type=None)
            return response.status, document
    except (aiohttp.ClientConnectionError, FileNotFoundError) as exc:
        raise StatusUnreachable(f"cannot reach the daemon at {socket_path}: {exc}") from None


def call(socket_path: str, method: str, path: str,
         body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    return asyncio.run(_call(socket_path, method, path, body))


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


def _selection(ids: list[int], everything: bool) -> dict[str, Any]:
    if everything:
        return {"all": True}
    if not ids:
        raise AuditdError("name dead-letter ids, or --all")
    return {"ids": ids}


def dlq(socket_path: str, action: str, ids: list[int], everything: bool, as_json: bool,
        limit: int) -> int:
    if action == "list":
        code, document = call(socket_path, "GET", f"/dlq?limit={limit}")
        if code != 200:
            return _refusal(code, document)
        if as_json:
            print(json.dumps(document))
            return EXIT_OK
        for entry in document.get("dead_letters", []):
            print(f"{entry['id']:>8} seq={entry['seq'] or '-':<8} {entry['source']:<8} "
                  f"{entry['code']:<14} attempts={entry['attempts']} {entry['reason']}")
        return EXIT_OK
    code, document = call(socket_path, "POST", f"/dlq/{action}", _selection(ids, everything))
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
