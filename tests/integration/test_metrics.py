"""GET /metrics on the real daemon: promtool accepts it, it agrees with /stats, and
status.metrics_listen serves it (and only it) over TCP."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import time
from typing import Any

import pytest
from conftest import UnixHTTPConnection
from prometheus_client.parser import text_string_to_metric_families

from auditd.client import Client
from auditd.errors import ConfigError
from auditd.status import parse_listen


def get(conn: http.client.HTTPConnection, url: str,
        accept: str | None = None) -> tuple[int, str, str]:
    """(status, Content-Type, body) of one GET; closes the connection."""
    try:
        conn.request("GET", url, headers={"Accept": accept} if accept else {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), \
            response.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from the text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def traffic(daemon: Any) -> None:
    """Events, a rejection (a dead letter), then wait until all is committed."""
    with Client(daemon.ingest_socket, raise_on_reject=False) as client:
        client.send_batch([{"type": "metrics.test", "data": i} for i in range(20)])
        client.send({"type": ""})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        stats = json.loads(get(UnixHTTPConnection(daemon.status_socket), "/stats")[2])
        # dlq_entries counts stored rows: the dead letter's own commit is done too.
        if stats["last_committed_seq"] == stats["last_seq"] and stats["dlq_entries"]:
            return
        time.sleep(0.05)
    raise AssertionError("traffic was not committed in time")


def promtool() -> str:
    """promtool's path. Missing, the test skips on a developer's machine and fails in CI
    (CI=true): .ci/run installs it, and a CI run that checked nothing must not pass."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("promtool is not installed, and CI=true: .ci/run must install it")
        pytest.skip("promtool is not installed")
    return path


def test_promtool_check_metrics_passes(daemon: Any) -> None:
    checker = promtool()
    traffic(daemon)
    with Client(daemon.ingest_socket) as client:  # an open connection: a labelled series
        client.send({"type": "held.open"})
        status, content_type, text = get(UnixHTTPConnection(daemon.status_socket), "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    assert 'auditd_connections_open_by_uid{uid="0"} 1.0' in text
    assert 'auditd_dead_letters_total{reason="rejected"} 1.0' in text
    checked = subprocess.run([checker, "check", "metrics"], input=text,
                             capture_output=True, text=True, timeout=60)
    # promtool prints lint findings and still exits 0 for some: accept neither.
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), (
        checked.stdout + checked.stderr)


def test_metrics_agree_with_stats(daemon: Any) -> None:
    traffic(daemon)
    stats = json.loads(get(UnixHTTPConnection(daemon.status_socket), "/stats")[2])
    found = samples(get(UnixHTTPConnection(daemon.status_socket), "/metrics")[2])
    assert found[("auditd_events_accepted_total", ())] == stats["accepted"] == 20
    assert found[("auditd_events_rejected_total", ())] == stats["rejected"] == 1
    assert found[("auditd_events_committed_total", ())] == stats["committed"]
    assert found[("auditd_last_committed_seq", ())] == stats["last_committed_seq"]
    assert found[("auditd_buffer_capacity_events", ())] == stats["buffer_capacity"]
    assert found[("auditd_pending_events", ())] == 0
    assert found[("auditd_replay_finished", ())] == 1
    assert found[("auditd_health_status", (("status", "ok"),))] == 1
    assert found[("auditd_health_check_ok", (("check", "writer_progress"),))] == 1
    assert found[("process_resident_memory_bytes", ())] > 0
    for name, count in (("auditd_commit_latency_seconds", stats["commit_latency_ms"]["count"]),
                        ("auditd_reply_latency_seconds", 2),
                        ("auditd_commit_batch_events", stats["batch_size"]["count"])):
        buckets = sorted(((float(dict(labels)["le"]), value) for (sample, labels), value
                          in found.items() if sample == f"{name}_bucket"))
        values = [value for _le, value in buckets]
        assert values == sorted(values), f"{name}: buckets are not cumulative"
        assert buckets[-1] == (float("inf"), count) == (float("inf"),
                                                         found[(f"{name}_count", ())])
    batch_sum = found[("auditd_commit_batch_events_sum", ())]
    assert batch_sum == stats["committed"]


def test_openmetrics_is_served_when_asked_for(daemon: Any) -> None:
    status, content_type, text = get(UnixHTTPConnection(daemon.status_socket), "/metrics",
                                     accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_metrics_listen_serves_only_metrics_over_tcp(make_daemon: Any) -> None:
    port = _free_port()
    daemon = make_daemon({"status": {"metrics_listen": f"127.0.0.1:{port}"}})
    status, _type, text = get(http.client.HTTPConnection("127.0.0.1", port, timeout=30),
                              "/metrics")
    assert status == 200 and "auditd_events_accepted_total 0.0" in text
    status, _type, body = get(http.client.HTTPConnection("127.0.0.1", port, timeout=30),
                              "/stats")
    assert (status, json.loads(body)["error"]) == (404, "not_found")
    # The Unix socket still serves everything.
    assert get(UnixHTTPConnection(daemon.status_socket), "/stats")[0] == 200


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:9477", ("127.0.0.1", 9477)),
    ("[::1]:9477", ("::1", 9477)),
    ("localhost:80", ("localhost", 80)),
])
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["9477", ":9477", "127.0.0.1:", "127.0.0.1:http",
                                   "127.0.0.1:70000"])
def test_parse_listen_names_the_key_on_a_bad_value(value: str) -> None:
    with pytest.raises(ConfigError, match=r"status\.metrics_listen = .*expected host:port"):
        parse_listen(value)
