"""`python -m auditd.bench.verify_loop` (step 6's no-false-alarm bar) at a test's size:
verify runs against a daemon under load that is SIGKILLed between them; every run exits
0, and the report says so in figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_verify_runs_under_load_and_kills_all_exit_0(short_tmp: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "auditd.bench.verify_loop", "--runs", "6",
                           "--kills", "2", "--rate", "1000", "--partition", "500"],
                          capture_output=True, text=True, timeout=300, cwd=short_tmp)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert doc["exit_codes"] == {"0": 6} and doc["false_alarms"] == 0, doc
    assert doc["kills"] == 2 and doc["events_sent"] > 0 and doc["writer_error"] is None, doc
    final = doc["final_full"]
    assert final["code"] == 0 and final["status"] == "verified", final
    assert final["verified_events"] > 0, final
    assert "run 6/6, exit 0, kills 2" in done.stderr, done.stderr[-2000:]
