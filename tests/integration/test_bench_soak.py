"""`auditd bench --soak N` end to end with a small N, and the soak's event generator.

Only shapes and counts are asserted, never rates: the soak's figures are measured by
hand (see the README's Benchmarks section). The hidden `--soak-interval 5000` makes a
30,000-event run report six intervals, as 500k does for 3M.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from statistics import mean

import msgspec
import pytest

from auditd.bench.soak_events import (
    ACTORS,
    MAX_EVENT_BYTES,
    STREAMS,
    TARGETS,
    ClientFrames,
    SoakEvents,
    client_events,
)
from auditd.ingest.validation import decode_body
from auditd.schema import encoder, id_hash

N = 30_000


def _auditd(*flags: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auditd.cli", "bench", *flags],
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.timeout(600)
def test_soak_with_baseline_commits_every_event_and_reports_each_interval() -> None:
    done = _auditd("--soak", str(N), "--batch", "500", "--baseline", "--json",
                   "--soak-interval", "5000")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)["soak"]
    assert (doc["events"], doc["batch"], doc["interval"], doc["clients"]) == (N, 500, 5000, 4)
    # Not a TTY: progress went to stderr as one structured line per interval and phase.
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    progress = [line for line in lines if line["event"] == "soak_interval_committed"]
    assert [(p["phase"], p["events"]) for p in progress] == [
        (phase, k * 5000) for phase in ("daemon", "baseline") for k in range(1, 7)]

    daemon, baseline = doc["daemon"], doc["baseline"]
    assert daemon["events_sent"] == daemon["events_acknowledged"] == N
    assert daemon["events_committed"] == N
    assert daemon["events_rejected"] == daemon["duplicates"] == 0
    assert daemon["frame_errors"] == {}
    assert baseline["rows"] == N
    # Today's layout as the migrations build it: the seq rowid and its seven indexes.
    assert len(baseline["indexes"]) == 7 and "events_id_hash" in baseline["indexes"]
    for phase in (daemon, baseline):
        assert [row["through"] for row in phase["intervals"]] == list(range(5000, N + 1, 5000))
        assert all(row["per_s"] > 0 for row in phase["intervals"])
        assert phase["window"] == 10_000
        assert phase["sustained_per_s"] > 0 and phase["elapsed_s"] > 0
        assert phase["first_window_per_s"] > 0 and phase["last_window_per_s"] > 0
        assert phase["last_to_first"] == pytest.approx(
            phase["last_window_per_s"] / phase["first_window_per_s"], abs=0.001)
        assert phase["bytes_per_event"] > 0
        assert phase["disk_bytes"] == sum(phase["disk"].values())
        assert phase["bytes_per_event"] == pytest.approx(phase["disk_bytes"] / N, abs=0.1)
    assert "auditd.db" in daemon["disk"] and "journal" in daemon["disk"]
    assert daemon["peak_rss_mb"] > 0 and daemon["clients_cpu_s"] > 0
    assert set(doc["ratios"]) == {"sustained_per_s", "first_window_per_s",
                                  "last_window_per_s", "bytes_per_event"}
    assert doc["ratios"]["sustained_per_s"] == pytest.approx(
        daemon["sustained_per_s"] / baseline["sustained_per_s"], abs=0.001)


@pytest.mark.parametrize(("flags", "says"), [
    (["--soak", "0"], "--soak 0: expected a positive number"),
    (["--soak", "-5"], "--soak -5: expected a positive number"),
    (["--soak", "100", "--socket", "/tmp/x.sock"], "drop --socket"),
    (["--soak", "100", "--rate", "50"], "drop --rate"),
    (["--soak", "100", "--fuzz", "10"], "drop --fuzz"),
    (["--soak", "100", "--batch", "0"], "--batch 0: expected a positive number"),
    (["--soak", "100", "--clients", "0"], "--clients 0: expected a positive number"),
    (["--soak", "100", "--soak-interval", "0"], "--soak-interval 0"),
    (["--soak", "100", "--batch", "20000"], "ingest.max_batch_events"),
    (["--soak", "100", "--batch", "5000"], "ingest.max_frame_bytes"),
])
def test_bad_soak_arguments_are_one_line_usage_errors(flags: list[str], says: str) -> None:
    done = _auditd(*flags, timeout=60)
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_generator_has_issue_12s_cardinalities() -> None:
    source = SoakEvents(seed=0)
    events = [e for start in range(0, 200_000, 1000) for e in source.events(start, start + 1000)]
    sizes = [len(encoder.encode(e)) for e in events]
    assert 330 <= mean(sizes) <= 450 and max(sizes) <= MAX_EVENT_BYTES
    assert len({e["type"] for e in events}) == 50
    assert len({e["actor"] for e in events}) <= ACTORS
    assert len({e["target"] for e in events}) <= TARGETS
    assert len({e["stream"] for e in events}) <= STREAMS
    per_correlation = Counter(e["correlation_id"] for e in events)
    assert 4.5 <= mean(per_correlation.values()) <= 5.5
    assert {len(e["tags"]) for e in events} == {2, 3}
    assert all(isinstance(e["data"], dict) and e["data"] for e in events)
    assert not any("expect" in e or "ts" in e for e in events)
    ids = [e["id"] for e in events]
    assert len(set(ids)) == len(ids)
    # UUIDv7 (version 7, variant 10), and keys distinct: the daemon's id key appends.
    assert all(i[14] == "7" and i[19] in "89ab" for i in ids)
    assert len({id_hash(i) for i in ids}) == len(ids)
    causes = {e["id"]: e["correlation_id"] for e in events}
    assert all(causes[e["causation_id"]] == e["correlation_id"]
               for e in events if "causation_id" in e)


def test_generator_is_a_function_of_seed_and_number() -> None:
    again = SoakEvents(seed=0)
    assert again.events(12_345, 12_350) == SoakEvents(seed=0).events(12_340, 12_350)[5:]
    assert again.events(0, 10) != SoakEvents(seed=1).events(0, 10)


def test_client_frames_hold_every_event_once_and_pass_the_daemons_validation() -> None:
    total, batch, clients = 10_500, 1000, 4
    seen: list[str] = []
    for client in range(clients):
        frames = ClientFrames(client, clients, batch, total, seed=3)
        held = 0
        for frame in frames:
            decoded = decode_body(frame[4:], 10_000, 262_144)
            assert not decoded.rejected
            body = msgspec.msgpack.decode(frame[4:])
            held += len(body)
            seen += [e["id"] for e in body]
        assert held == client_events(client, clients, batch, total)
    expected = [e["id"] for e in SoakEvents(seed=3).events(0, total)]
    assert sorted(seen) == sorted(expected) and len(set(seen)) == total
