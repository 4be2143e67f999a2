"""The daemon's sealer writes a term filter into each partition and its queries skip the
partitions whose filter rules a value out: answers checked against a brute force of
what was sent, skips read from /stats `query`."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, UnixHTTPConnection, wait_committed, wait_sealed_through

from auditd.client import Client

PARTITION = 500
COUNT = 1750  # seqs 1-1500 sealed in 3 partitions, 1501-1750 hot
START = 1_767_225_600 * 10**9
TYPES = ["user.login", "file.read", "db.query"]


def sent_event(i: int) -> dict[str, Any]:
    """Actors and one data word belong to one partition each (i // PARTITION)."""
    event: dict[str, Any] = {
        "type": TYPES[i % 3], "id": f"ev-{i}", "actor": f"user{i // PARTITION}",
        "target": f"/srv/t{i % 7}", "stream": f"acct-{i % 4}",
        "correlation_id": f"op-{i // 10}", "ts": START + i * 10**9,
        "tags": {"region": ["eu", "us", "ap"][i % 3]},
        "data": {"msg": f"batch{i // PARTITION}x common"}}
    if i % 10:
        event["causation_id"] = f"ev-{i - 1}"
    return event


SENT = [sent_event(i) for i in range(COUNT)]  # event i gets seq i + 1


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="adf"))
    (root / "d").mkdir()
    process = DaemonProcess(root / "d", {"storage": {"partition_events": PARTITION}})
    process.start()
    try:
        with Client(process.ingest_socket) as client:
            for start in range(0, COUNT, 250):
                client.send_batch(SENT[start:start + 250])
        wait_committed(process, COUNT)
        wait_sealed_through(process, 1500)
        yield process
    finally:
        process.stop()
        shutil.rmtree(root, ignore_errors=True)


def get(daemon: DaemonProcess, path: str, pairs: Sequence[tuple[str, str]] = ()) -> Any:
    conn = UnixHTTPConnection(daemon.status_socket)
    try:
        conn.request("GET", path + ("?" + urllib.parse.urlencode(pairs) if pairs else ""))
        response = conn.getresponse()
        body = json.loads(response.read())
        assert response.status == 200, body
        return body
    finally:
        conn.close()


def seqs_where(test: Any) -> list[int]:
    return [i + 1 for i, event in enumerate(SENT) if test(event)]


def skipped_by(daemon: DaemonProcess, path: str, pairs: Sequence[tuple[str, str]]
               ) -> tuple[list[int], int]:
    """The seqs answered, and how many partitions the term filters skipped for it."""
    before = daemon.stats()["query"]["partitions_skipped"]
    body = get(daemon, path, [*pairs, ("limit", "10000")] if path == "/events" else pairs)
    return [e["seq"] for e in body["events"]], daemon.stats()["query"][
        "partitions_skipped"] - before


def test_partitions_sealed_by_the_daemon_carry_filters(daemon: DaemonProcess) -> None:
    get(daemon, "/events", [("actor", "nobody")])  # every partition opened
    figures = daemon.stats()["query"]
    assert figures["filters"] == 3, (figures, daemon.stats()["partitions"])
    assert figures["filter_bytes"] > 0


@pytest.mark.parametrize(("pairs", "test", "skipped"), [
    ([("actor", "user1")], lambda e: e["actor"] == "user1", 2),
    ([("actor", "user3")], lambda e: e["actor"] == "user3", 3),  # hot only
    ([("actor", "nobody")], lambda e: False, 3),
    ([("actor", "user0"), ("actor", "user2")], lambda e: e["actor"] in ("user0", "user2"), 1),
    ([("q", "batch2x")], lambda e: "batch2x" in e["data"]["msg"], 2),
    ([("q", "batch0x common"), ("type", "db.query")],
     lambda e: "batch0x" in e["data"]["msg"] and e["type"] == "db.query", 2),
    ([("causation_id", "ev-612")], lambda e: e.get("causation_id") == "ev-612", 2),
    ([("actor", "user0"), ("correlation_id", "op-70")], lambda e: False, 3),
    ([("target", "/srv/t3")], lambda e: e["target"] == "/srv/t3", 0),
    ([("tag.region", "mars")], lambda e: False, 3),
])
def test_queries_skip_what_filters_rule_out(daemon: DaemonProcess,
                                            pairs: list[tuple[str, str]], test: Any,
                                            skipped: int) -> None:
    found, skips = skipped_by(daemon, "/events", [*pairs, ("order", "desc")])
    assert found == seqs_where(test)[::-1]
    assert skips == skipped


def test_a_correlation_reads_only_its_partition(daemon: DaemonProcess) -> None:
    before = daemon.stats()["query"]["partitions_skipped"]
    body = get(daemon, "/correlations/op-70")
    assert [e["seq"] for e in body["events"]] == seqs_where(
        lambda e: e["correlation_id"] == "op-70")
    assert daemon.stats()["query"]["partitions_skipped"] - before == 2
