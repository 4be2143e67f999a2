"""A store from before projections (schema 3, sealed partitions and hot rows) taken up
by a daemon of schema 4: migration 4 leaves the projections rebuilding, and the daemon
fills them from the events at start while taking new ones."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from typing import Any

from conftest import wait_committed, wait_sealed_through
from projection_truth import assert_counts_match

from auditd.store import migrations


def test_a_schema_3_store_gets_its_projections_built_at_start(make_daemon: Any) -> None:
    daemon = make_daemon({"storage": {"partition_events": 500}})
    with daemon.connect() as conn:
        for start in range(0, 2600, 200):
            events = [{"type": f"old.{i % 4}", "actor": f"u{i % 3}"}
                      for i in range(start, start + 200)]
            assert conn.request(events)["ok"] == 200
    wait_committed(daemon, 2600)
    wait_sealed_through(daemon, 2500)
    assert daemon.stop() == 0
    down = subprocess.run([sys.executable, "-m", "auditd.cli", "migrate", "--to", "3",
                           "--config", str(daemon.config_path)], capture_output=True,
                          text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert "rolled back 4 projections" in down.stdout
    assert not daemon.query("SELECT name FROM sqlite_master WHERE name = 'projections'")
    daemon.start()
    with daemon.connect() as conn:
        assert conn.request([{"type": "new", "actor": "u1"}] * 50)["ok"] == 50
    rows = assert_counts_match(daemon)
    assert len(rows) == 2650
    with contextlib.closing(daemon.db()) as db:
        assert migrations.current(db) == migrations.LATEST
    rebuilt = {e["name"] for e in daemon.log_events() if e["event"] == "projection_rebuilt"}
    assert rebuilt == {"counts_by_type", "counts_by_actor", "counts_by_uid", "counts_by_comm",
                       "actor_summary"}
