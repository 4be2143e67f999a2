"""`auditd bench` end to end: a throw-away daemon, client processes, the JSON report.

Only the shape and the counts are asserted: timings on a shared machine vary, and the
bars themselves are measured by hand (see the issue note), not by the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest


def bench(*flags: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "auditd.cli", "bench", "--json", *flags],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def test_load_with_baseline_stores_every_event() -> None:
    doc = bench("--events", "5000", "--clients", "2", "--baseline")
    for key in ("events_per_s", "sent_per_s", "latency_ms", "peak_rss_mb",
                "baseline_rows_per_s", "ratio", "events_sent", "events_committed"):
        assert key in doc, key
    assert set(doc["latency_ms"]) >= {"p50", "p99"}
    assert doc["events_sent"] == 5000
    assert doc["events_acknowledged"] == 5000
    assert doc["events_committed"] == doc["events_sent"]
    assert doc["events_rejected"] == 0 and doc["frame_errors"] == {}
    assert doc["events_per_s"] > 0 and doc["baseline_rows_per_s"] > 0
    before, after = doc["baseline_runs_rows_per_s"]  # around the daemon's run
    assert doc["baseline_rows_per_s"] == pytest.approx((before + after) / 2, abs=0.1)
    assert doc["ratio"] == pytest.approx(doc["events_per_s"] / doc["baseline_rows_per_s"],
                                         abs=0.001)
    assert doc["peak_rss_mb"] > 0


def test_paced_single_event_frames_are_all_answered() -> None:
    doc = bench("--events", "400", "--clients", "2", "--batch", "1", "--rate", "2000")
    assert doc["events_committed"] == doc["events_sent"] == 400
    assert doc["latency_ms"]["p50"] <= doc["latency_ms"]["p99"]


def test_ring_micro_benchmark() -> None:
    ring = bench("--ring")["ring"]
    assert ring["capacity"] == 10_000
    for name in ("recent_100_us", "by_correlation_us"):
        assert set(ring[name]) == {"mean", "p99", "max"}
        assert ring[name]["mean"] > 0


def test_replay_commits_every_journaled_event() -> None:
    doc = bench("--replay", "3000")["replay"]
    assert doc["events"] == 3000 and doc["journal_bytes"] > 3000 * 200
    assert 0 < doc["ready_s"] <= doc["all_committed_s"]


def test_query_bench_reports_every_query(tmp_path: Any) -> None:
    config = tmp_path / "auditd.toml"
    config.write_text("[storage]\npartition_events = 1000\n")  # 3 sealed, 500 hot
    doc = bench("--query", "3500", "--query-repeat", "2", "--config", str(config))["query"]
    assert doc["events"] == 3500 and doc["sealed"] == 3000
    assert doc["hot_index"]["events"] == 500
    assert doc["term_filters"]["filters"] == 3 and doc["term_filters"]["partitions_skipped"]
    queries = doc["queries"]
    assert {"type", "type+1h", "or_two_actors", "newest_100", "page_after_cursor",
            "correlation_100", "rare_word_0.1%"} <= set(queries)
    assert queries["newest_100"]["events"] == 100
    assert queries["rare_word_0.1%"]["events"] == 3  # every 1,000th event, from 500
    for figures in queries.values():
        assert set(figures["server_ms"]) == {"p50", "p99"}
        assert figures["server_cpu_ms"]["p50"] >= 0
