"""A seal interrupted at each of its steps loses nothing and leaves no half-partition in
use: killed before the rename (a temp file), after it but before the catalog commit (a
complete, uncatalogued file), after the commit but before the hot rows are released, and
a real SIGKILL of the daemon at the moment its sealing process is writing. A seal that
fails is shown in health and retried while ingest goes on."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import (
    DaemonProcess,
    catalogued,
    stored_seqs,
    wait_committed,
    wait_for,
    wait_sealed_through,
    write_config,
)
from fault_helpers import assert_integrity_ok, health

from auditd.store.sealing.catalog import entry_from_seal

PARTITION = 500


def fill(daemon: DaemonProcess, count: int, first: int = 0) -> None:
    with daemon.connect() as conn:
        for start in range(first, first + count, 100):
            reply = conn.request([{"type": "test.crash", "id": f"ev-{i}"}
                                  for i in range(start, min(start + 100, first + count))])
            assert reply["ok"] == min(100, first + count - start), reply
    wait_committed(daemon, first + count)


def run_child(daemon: DaemonProcess, first: int, last: int) -> dict[str, Any]:
    """The daemon's own sealing process, run by hand on the stopped daemon's store."""
    (daemon.storage / "partitions").mkdir(exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "auditd.store.sealing.child", str(daemon.db_path),
         str(daemon.storage / "partitions"), str(first), str(last)],
        capture_output=True, check=True)
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def assert_all_stored_once(daemon: DaemonProcess, count: int) -> None:
    assert stored_seqs(daemon) == {seq: f"ev-{seq - 1}" for seq in range(1, count + 1)}
    assert_integrity_ok(daemon.db_path)


def test_a_leftover_temp_file_and_an_uncatalogued_partition_are_removed_and_resealed(
        make_daemon: Any) -> None:
    daemon = make_daemon({"storage": {"partition_events": 100_000}})  # no seal by itself
    fill(daemon, 1200)
    daemon.stop()
    run_child(daemon, 1, PARTITION)  # renamed, never catalogued: a kill before the commit
    temp = daemon.storage / "partitions" / ".p000000000501-000000001000.tmp"
    temp.write_bytes(b"half a partition")  # a kill before the rename
    daemon.sections["storage"]["partition_events"] = PARTITION
    write_config(daemon.config_path, daemon.sections)
    daemon.start()
    removed = [e for e in daemon.log_events() if e["event"] == "partition_leftovers_removed"]
    assert removed and set(removed[0]["files"]) == {
        "p000000000001-000000000500.db", ".p000000000501-000000001000.tmp"}
    wait_sealed_through(daemon, 1000)
    assert [c[:2] for c in catalogued(daemon)] == [(1, 500), (501, 1000)]
    assert not temp.exists()
    assert_all_stored_once(daemon, 1200)


def test_a_seal_catalogued_but_not_released_resumes_the_release(make_daemon: Any) -> None:
    daemon = make_daemon({"storage": {"partition_events": 100_000}})
    fill(daemon, 700)
    daemon.stop()
    entry = entry_from_seal(run_child(daemon, 1, PARTITION))
    with sqlite3.connect(daemon.db_path) as conn:  # the writer's commit, and no more
        conn.execute("INSERT INTO partitions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (entry.first_seq, entry.last_seq, entry.file, entry.events,
                      entry.file_bytes, entry.format_version, entry.sealed_at, entry.seconds,
                      entry.id_keys))
        conn.execute("UPDATE meta SET value = 500 WHERE key = 'sealed_through'")
    assert daemon.query("SELECT count(*) FROM events")[0][0] == 700
    daemon.start()
    wait_sealed_through(daemon, 500)
    assert daemon.query("SELECT min(seq), count(*) FROM events")[0] == (501, 200)
    assert_all_stored_once(daemon, 700)
    with daemon.connect() as conn:  # its ids are known from the catalogued partition
        reply = conn.request([{"type": "test.crash", "id": "ev-10"}])
        assert reply["duplicates"] == [[0, 11]], reply


def test_sigkill_while_the_sealing_process_writes(make_daemon: Any) -> None:
    daemon = make_daemon({"storage": {"partition_events": 20_000}})
    partitions = daemon.storage / "partitions"
    total = 0
    for _ in range(3):
        fill(daemon, 20_000, first=total)
        total += 20_000
        wait_for(lambda: partitions.is_dir() and any(
            p.suffix == ".tmp" for p in partitions.iterdir()), 60, "a seal in progress")
        daemon.kill()
        daemon.start()
    wait_sealed_through(daemon, total)
    assert [c[:2] for c in catalogued(daemon)] == [
        (first, first + 19_999) for first in range(1, total, 20_000)]
    assert sorted(p.name for p in partitions.iterdir()) == [c[2] for c in catalogued(daemon)]
    assert_all_stored_once(daemon, total)


def test_a_failing_seal_is_shown_in_health_and_retried_until_it_succeeds(
        make_daemon: Any) -> None:
    daemon = make_daemon({"storage": {"partition_events": PARTITION}})
    blocker = daemon.storage / "partitions"
    blocker.write_text("a file where the partitions directory goes")  # mkdir fails
    fill(daemon, 600)

    def sealing_check() -> dict[str, Any] | None:
        check: dict[str, Any] = health(daemon)["checks"]["sealing"]
        return check if not check["ok"] else None
    check = wait_for(sealing_check, 30, "the seal fault in health")
    assert "sealing seqs 1-500 failed" in check["detail"]
    figures = daemon.stats()["partitions"]
    assert figures["count"] == 0 and figures["hot_events"] == 600 and figures["fault"]
    with daemon.connect() as conn:  # ingest goes on meanwhile
        assert conn.request({"type": "test.crash", "id": "during"})["ok"] == 1
    blocker.unlink()
    wait_sealed_through(daemon, 500)
    wait_for(lambda: health(daemon)["checks"]["sealing"]["ok"], 30, "the fault to clear")
    figures = daemon.stats()["partitions"]
    assert figures["count"] == 1 and figures["sealed_through"] == 500
    assert figures["hot_events"] == 101 and figures["last_seal_events"] == 500
    assert [e for e in daemon.log_events() if e["event"] == "seal_failed"]
    assert [e for e in daemon.log_events() if e["event"] == "seal_recovered"]


def sealing_children(daemon: DaemonProcess) -> list[tuple[int, int, int]]:
    """(pid, first, last) of the daemon's sealing processes now running."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"auditd.store.sealing.child" in argv and str(daemon.db_path).encode() in argv:
            at = argv.index(b"auditd.store.sealing.child")
            found.append((int(entry.name), int(argv[at + 3]), int(argv[at + 4])))
    return found


def niceness(pid: int) -> int:
    # /proc/PID/stat: the field after the command's closing parenthesis is the state;
    # niceness is the 19th field overall, the 17th after it.
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_commits_wait_while_sealing_is_two_partitions_behind(make_daemon: Any) -> None:
    daemon = make_daemon({"storage": {"partition_events": PARTITION}})
    fill(daemon, PARTITION)
    # A slow seal, for real: its process stopped while it works on its range.
    pid, first, last = wait_for(lambda: next(iter(sealing_children(daemon)), None), 30,
                                "the sealing process")
    os.kill(pid, signal.SIGSTOP)
    assert daemon.proc is not None
    # Nothing waits for it yet: it yields the CPU to ingest.
    assert wait_for(lambda: niceness(pid) == min(niceness(daemon.proc.pid) + 10, 19), 30,
                    "the seal's low priority")
    try:
        behind = first - 1 + 2 * PARTITION  # sealed_through stays first - 1 meanwhile
        fill(daemon, behind - PARTITION, PARTITION)
        wait_for(lambda: daemon.stats()["partitions"]["commits_held"], 30, "commits held")
        # Commits wait for it: it runs at the daemon's priority, not below it.
        assert wait_for(lambda: niceness(pid) == niceness(daemon.proc.pid), 30,
                        "the seal's priority raised")
        with daemon.connect() as conn:  # acknowledged (journaled), but not committed
            for start in range(behind, behind + 300, 100):
                reply = conn.request([{"type": "test.crash", "id": f"ev-{i}"}
                                      for i in range(start, start + 100)])
                assert reply["ok"] == 100, reply
        assert daemon.stats()["last_committed_seq"] == behind
        assert daemon.stats()["pending"] == 300
        assert "sealing is behind" in health(daemon)["checks"]["sealing"]["detail"]
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_committed(daemon, behind + 300)
    wait_sealed_through(daemon, last)
    assert_all_stored_once(daemon, behind + 300)


def test_a_failing_seal_does_not_hold_commits(make_daemon: Any) -> None:
    """Pacing is for a slow sealer: a failing one (health says so) must not stop ingest."""
    daemon = make_daemon({"storage": {"partition_events": PARTITION}})
    blocker = daemon.storage / "partitions"
    blocker.write_text("a file where the partitions directory goes")  # seals fail
    fill(daemon, 2 * PARTITION)
    wait_for(lambda: daemon.stats()["partitions"]["fault"], 30, "the seal fault")
    fill(daemon, PARTITION, 2 * PARTITION)  # waits for each batch's commit
    assert not daemon.stats()["partitions"]["commits_held"]
    blocker.unlink()
    wait_sealed_through(daemon, 3 * PARTITION)
    assert_all_stored_once(daemon, 3 * PARTITION)
