"""`auditd verify` on a store that is being written, sealed and SIGKILLed: it reads one
snapshot and verifies up to the newest checkpoint in it, so every run exits 0 (newer
events are reported as not yet checkpointed). A short loop here; the bench runs long."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from conftest import DaemonProcess, wait_for
from proofs_store import SETTINGS, checkpoint_size, send, sql, verify, wait_checkpointed

PACE_S = 0.02  # 2,500 events/s: ten partitions of 256 a second


class Load(threading.Thread):
    """Batches of events, 50 every PACE_S, until stopped; reconnects after a kill. Paced:
    what matters is commits, seals and checkpoints while verify reads, and a flood only
    grew the store that the last, full verify reads (74k events, a third of the test)."""

    def __init__(self, daemon: DaemonProcess) -> None:
        super().__init__(daemon=True)
        self.daemon_process = daemon
        self.stopping = threading.Event()
        self.sent = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                with self.daemon_process.connect() as conn:
                    while not self.stopping.is_set():
                        events = [{"type": "live", "actor": f"a{i % 9}", "data": {"i": i}}
                                  for i in range(self.sent, self.sent + 50)]
                        conn.request(events)
                        self.sent += 50
                        self.stopping.wait(PACE_S)
            except OSError:
                continue


def test_verify_during_load_and_sigkills_never_alarms(make_daemon: Any,
                                                      short_tmp: Path) -> None:
    daemon = make_daemon(SETTINGS)
    load = Load(daemon)
    load.start()
    state = short_tmp / "state.json"
    try:
        for round_ in range(6):
            wait_for(lambda: checkpoint_size(daemon) > 0, 30, "a checkpoint")
            code, doc = verify(daemon.config_path, "--state", str(state))
            assert code == 0, doc
            if round_ in (2, 4):
                daemon.stop(signal.SIGKILL)
                daemon.start()
    finally:
        load.stopping.set()
        load.join(30)
    code, doc = verify(daemon.config_path, "--state", str(state))
    assert code == 0, doc
    # --state reads only the seqs after the checkpoint the last round verified, which
    # may be none when no newer checkpoint was issued since: the whole store, then.
    code, whole = verify(daemon.config_path, "--state", str(state), "--full")
    assert code == 0 and whole["verified_events"] >= whole["checkpoint"]["size"] > 0, whole


def test_verify_with_state_reads_only_what_came_after(make_daemon: Any,
                                                      short_tmp: Path) -> None:
    """--state remembers the compact range at the verified checkpoint: the next run
    reads only the newer seqs (and still finds an edit among them); --full reads all."""
    daemon = make_daemon(SETTINGS)
    send(daemon, 0, 700)
    wait_checkpointed(daemon, 700)
    state = short_tmp / "state.json"
    code, first = verify(daemon.config_path, "--state", str(state))
    assert code == 0 and first["verified_events"] >= 700, first
    size = first["checkpoint"]["size"]
    send(daemon, 700, 300)
    last = int(daemon.stats()["last_seq"])
    wait_checkpointed(daemon, last)
    code, again = verify(daemon.config_path, "--state", str(state))
    assert code == 0, again
    assert any(note.startswith("incremental") for note in again["notes"]), again
    newest = again["checkpoint"]["size"]
    assert again["verified_events"] == newest - size, (again, size)
    code, full = verify(daemon.config_path, "--full")
    assert code == 0 and full["verified_events"] == newest, full
    send(daemon, 1000, 100)
    last = int(daemon.stats()["last_seq"])
    wait_checkpointed(daemon, last)
    daemon.stop()
    sql(daemon.db_path, "DROP TRIGGER events_no_update;"
        f" UPDATE events SET data = x'80' WHERE seq = {last - 1};")
    code, edited = verify(daemon.config_path, "--state", str(state))
    assert code == 1 and edited["problem"]["seq"] == last - 1, edited
