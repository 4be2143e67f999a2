"""Dead letters deleted unresolved are counted by why: the quota on ingest rejects, or an
operator's drop; /stats and /metrics agree, and HELP says which is which."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from conftest import DaemonProcess, UnixHTTPConnection, wait_for

from auditd.client import Client

MakeDaemon = Callable[..., DaemonProcess]


def call(daemon: DaemonProcess, method: str, path: str,
         body: Any = None) -> tuple[int, str]:
    conn = UnixHTTPConnection(daemon.status_socket)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def stats(daemon: DaemonProcess) -> dict[str, Any]:
    status, body = call(daemon, "GET", "/stats")
    assert status == 200, body
    document: dict[str, Any] = json.loads(body)
    return document


def dropped_series(daemon: DaemonProcess) -> dict[str, float]:
    status, text = call(daemon, "GET", "/metrics")
    assert status == 200
    prefix = 'auditd_dead_letters_dropped_total{reason="'
    return {line[len(prefix):].split('"')[0]: float(line.split()[-1])
            for line in text.splitlines() if line.startswith(prefix)}


def test_quota_and_operator_drops_are_counted_apart(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon({"storage": {"dlq_max_bytes": "1KB"}})
    assert dropped_series(daemon) == {"operator": 0.0, "quota": 0.0}  # both, from the start
    with Client(daemon.ingest_socket, raise_on_reject=False) as client:
        reply = client.send_batch([{"type": "x" * 300, "id": f"r{i}"} for i in range(8)])
    assert len(reply.rejected) == 8  # ~2.5 KB of ingest rejects against a 1 KB quota

    over_quota = wait_for(lambda: stats(daemon)["dead_letters_dropped_by_reason"]["quota"], 30,
                          "the quota to drop the oldest rejects")
    left = stats(daemon)["dlq_entries"]
    assert over_quota + left == 8 and left > 0
    assert stats(daemon)["dead_letters_dropped_by_reason"] == {"operator": 0,
                                                               "quota": over_quota}

    status, body = call(daemon, "POST", "/dlq/drop", {"all": True})
    assert status == 200 and json.loads(body)["dropped"] == left, body
    document = stats(daemon)
    assert document["dead_letters_dropped_by_reason"] == {"operator": left,
                                                          "quota": over_quota}
    assert document["dead_letters_dropped"] == 8
    assert dropped_series(daemon) == {"operator": left, "quota": over_quota}

    _, text = call(daemon, "GET", "/metrics")
    help_line = next(line for line in text.splitlines()
                     if line.startswith("# HELP auditd_dead_letters_dropped_total"))
    assert "quota" in help_line and "operator" in help_line
