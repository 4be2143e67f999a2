"""Projections across SIGKILLs: the daemon is killed under load, restarts and replays
its journal; the counts must still equal the stored events exactly (replay never
counts twice, nothing committed goes uncounted), sealed partitions included."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import wait_for
from fault_helpers import log_events_named
from projection_truth import actor_truth, assert_counts_match, http

WRITERS = 2
KILLS = 6
WRITER = Path(__file__).with_name("sigkill_writer.py")


def acked(outs: list[Path]) -> int:
    return sum(out.read_bytes().count(b"\n") for out in outs if out.exists())


def test_counts_equal_the_events_after_sigkills_and_replay(make_daemon: Any) -> None:
    seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    daemon = make_daemon({"writer": {"batch_max": 256, "batch_delay_ms": 2},
                          "storage": {"partition_events": 1000}})
    stop_file = daemon.root / "stop"
    outs = [daemon.root / f"acks-{n}.txt" for n in range(WRITERS)]
    errs = [(daemon.root / f"writer-{n}.err").open("wb") for n in range(WRITERS)]
    writers = [subprocess.Popen([sys.executable, str(WRITER), daemon.ingest_socket, f"w{n}",
                                 str(outs[n]), str(stop_file), str(seed + n)],
                                stdout=errs[n], stderr=errs[n]) for n in range(WRITERS)]
    try:
        for kill in range(KILLS):
            before = acked(outs)
            wait_for(lambda before=before: acked(outs) > before + 500, 60,
                     f"acknowledgements before kill {kill} (seed {seed})")
            time.sleep(rng.uniform(0.0, 0.3))  # a random moment of the load, not a state
            daemon.kill()
            daemon.start()
        before = acked(outs)
        wait_for(lambda: acked(outs) > before + 500, 60, "acknowledgements after the last start")
        stop_file.touch()
        for writer in writers:
            assert writer.wait(90) == 0
    finally:
        stop_file.touch()
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        for handle in errs:
            handle.close()
    replayed = sum(e["events"] for e in log_events_named(daemon, "replay_finished"))
    assert replayed > 0, f"seed {seed}: no kill left events to replay"
    rows = assert_counts_match(daemon)
    assert len(rows) >= acked(outs), f"seed {seed}"
    assert int(daemon.query("SELECT count(*) FROM partitions")[0][0]) > 0
    for name in ("w0", "w1"):
        status, summary = http(daemon, "GET", f"/actors/{name}")
        expected = actor_truth(rows, name)
        assert status == 200 and summary["total"] == expected["total"], f"seed {seed}"
        assert summary["last_seq"] == expected["last_seq"], f"seed {seed}"
