"""`auditd bench --stall MODE` end to end, each mode small: the document's shape and the
behaviour behind each figure (every paced event acknowledged and committed, the lock
really held, the forced exit's code, the error naming the path), never how fast. The
figures and their old bars are the bench's to report (README, Benchmarks).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

LATENCY = {"p50", "p99", "max"}


def run_bench(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auditd.cli", "bench", *flags],
                          capture_output=True, text=True, timeout=240, check=False)


def stall(mode: str, *flags: str) -> dict[str, Any]:
    done = run_bench("--json", "--stall", mode, *flags)
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)["stall"]
    assert document["mode"] == mode
    return document


def assert_paced_all_stored(paced: dict[str, Any], sent: int) -> None:
    assert paced["events_sent"] == sent
    assert paced["events_acknowledged"] == sent, paced
    assert paced["events_committed"] == sent, paced
    assert paced["frame_errors"] == {}
    assert set(paced["latency_ms"]) == LATENCY


def test_non_reader_is_held_while_the_paced_client_is_served() -> None:
    doc = stall("non-reader", "--duration", "5", "--rate", "200")
    assert (doc["duration_s"], doc["rate"]) == (5.0, 200.0)
    assert_paced_all_stored(doc["paced"], 1000)
    assert doc["paced"]["bar_ms"] == {"p50": 100, "max": 2000}
    flood = doc["non_reader"]
    assert flood["bytes_sent"] > 0
    # The daemon stopped reading the connection that does not read, by its own count.
    assert flood["held"] is True and flood["held_after_s"] is not None, flood
    assert doc["peak_rss_mb"] > 0


def test_locked_database_holds_commits_not_replies() -> None:
    doc = stall("locked", "--duration", "3", "--rate", "200")
    lock = doc["lock"]
    assert lock["committed_while_locked"] == 0, lock  # the lock was really held
    assert lock["held_s"] > 0
    assert {"wait_to_lock_s", "pending_at_release", "commit_failures_at_release",
            "health_at_release"} <= set(lock)
    paced = doc["paced"]
    assert_paced_all_stored(paced, 600)  # and all committed once the lock went
    during = paced["during_lock"]
    assert during["replies"] > 0  # answered while nothing could be committed
    assert set(during["latency_ms"]) == LATENCY
    assert during["bar_ms"] == {"p99": 100, "max": 1000}


def test_second_signal_forces_the_exit_of_a_held_up_drain() -> None:
    doc = stall("second-signal", "--clients", "1", "--batch", "50", "--duration", "0.5")
    assert (doc["clients"], doc["batch"], doc["drain_s"]) == (1, 50, 0.5)
    assert set(doc["rounds"]) == {"SIGTERM", "SIGINT"}
    for name, run in doc["rounds"].items():
        # Still draining when the second signal came (the lock held it up), then the
        # forced exit: code 1 and its log line (a finished drain exits 0, and a timed
        # out one logs no forced_exit).
        assert run["running_at_second_signal"] is True, (name, run)
        assert run["exit_code"] == 1, (name, run)
        assert run["forced_exit_logged"] is True, (name, run)
        assert isinstance(run["exit_s"], float) and run["bar_s"] == 5
        assert run["committed_at_exit"] == 0  # nothing got past the lock
        assert run["load_events_acknowledged"] >= run["pending_at_first_signal"] > 0
        assert run["load_frames_refused"].get("shutting_down", 0) > 0, run  # the drain's load


def test_no_socket_fails_every_first_connect_naming_the_path() -> None:
    doc = stall("no-socket")
    path = doc["path"]
    for name in ("blocking", "asyncio"):
        client = doc[name]
        attempts = client["attempts"]
        assert attempts > 0
        assert client["errors"] == {"DisconnectedError": attempts}, client
        assert client["errors_naming_path"] == attempts
        # The refused connect itself, not a retry until the reconnect deadline.
        assert client["error"].startswith(f"cannot connect to {path}: "), client
        assert set(client["latency_ms"]) == LATENCY and client["bar_ms"] == {"max": 1000}


def test_bad_arguments_are_one_line_errors() -> None:
    for flags, named in ((("--stall", "locked", "--rate", "0"), "--rate 0.0"),
                         (("--stall", "non-reader", "--duration", "-1"), "--duration -1.0"),
                         (("--stall", "second-signal", "--clients", "0"), "--clients 0"),
                         (("--stall", "locked", "--socket", "/tmp/x.sock"), "--socket"),
                         (("--stall", "stuck"), "invalid choice: 'stuck'")):
        done = run_bench(*flags)
        assert done.returncode == 2, (flags, done.stderr)
        assert "Traceback" not in done.stderr
        assert named in done.stderr.strip().splitlines()[-1], (flags, done.stderr)
        assert done.stdout == ""
