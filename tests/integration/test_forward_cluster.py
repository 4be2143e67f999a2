"""Exactly once under faults, through `auditd bench --forward --forward-faults` (the
bar's own command, at a test's size): events forwarded to a 3-node JetStream cluster
with an R3 stream while the stream leader is SIGKILLed, then the node the forwarder is
connected to, then the daemon twice; the stream read back holds every seq exactly once,
gap-free, in order, and its message count is those events and checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from auditd.bench.nats_servers import nats_server_binary


def test_leader_connected_node_and_daemon_killed_every_seq_once(short_tmp: Path) -> None:
    assert nats_server_binary(), "nats-server not found: the test extra installs it"
    done = subprocess.run([sys.executable, "-m", "auditd.cli", "bench", "--forward",
                           "--forward-faults", "--events", "12000", "--rate", "2000",
                           "--json"],
                          capture_output=True, text=True, timeout=600, cwd=short_tmp)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)["forward"]
    assert [f["fault"] for f in doc["faults"]] == ["stream_leader", "connected_node",
                                                   "daemon", "daemon"], doc
    leader, connected = doc["faults"][:2]
    assert leader["node"] and connected["node"], doc
    # The node faults were felt (the daemon's restarts zero its figures: each fault's own).
    assert leader["errors"] or leader["reconnects"], leader
    assert connected["errors"] or connected["reconnects"], connected
    replay = doc["replay"]
    assert (replay["events"], replay["gaps"], replay["repeats"], replay["mismatches"]) == \
        (12_000, [], [], []), replay
    assert doc["stream_messages"] == 12_000 + replay["checkpoints"], doc
    assert doc["exactly_once"] is True, doc
