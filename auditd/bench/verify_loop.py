"""`python -m auditd.bench.verify_loop`: no false alarm on a live store (step 6's bar).

`auditd verify --state F --json` (the real command, a process each time) runs --runs
times in a row against a throw-away daemon that takes a paced load (--rate events/s,
default 5,000, through the blocking client, which rides out the restarts) and is
SIGKILLed and restarted --kills times, spread evenly over the runs. All along the daemon
commits, seals partitions (--partition events) and issues checkpoints (every
--checkpoint-every), so verify reads a store that changes under it. Every run must exit
0; one that does not is kept with its finding (at most 10 shown), and the bench exits 1.
A last run with --full reads the whole store. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from auditd.bench.daemon import ThrowawayDaemon, wait_until
from auditd.bench.paced_writer import PacedWriter
from auditd.cli.operator import UnixHTTPConnection
from auditd.config import load_config

_SHOWN = 10  # failed runs kept in the report
_VERIFY_TIMEOUT_S = 600.0


def verify_once(config_path: Path, state: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "auditd.cli", "verify", "--config", str(config_path),
         "--state", str(state), "--json", *extra],
        capture_output=True, text=True, timeout=_VERIFY_TIMEOUT_S, check=False)
    try:
        doc: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        doc = {"stdout": done.stdout[-500:], "stderr": done.stderr[-500:]}
    return done.returncode, doc


def has_checkpoint(status_socket: str) -> bool:
    """GET /checkpoint answers 200 (the signed note) once there is one."""
    conn = UnixHTTPConnection(status_socket, timeout=10)
    try:
        conn.request("GET", "/checkpoint")
        return conn.getresponse().status == 200
    finally:
        conn.close()


def run_loop(runs: int, kills: int, rate: float, partition: int,
             checkpoint_every: str) -> dict[str, Any]:
    extra: dict[str, dict[str, Any]] = {
        "storage": {"partition_events": partition},
        "proofs": {"checkpoint_every": checkpoint_every}}
    kill_every = max(1, runs // kills) if kills else 0
    codes: Counter[int] = Counter()
    failed: list[dict[str, Any]] = []
    read: list[int] = []
    killed = 0
    started = time.monotonic()
    with ThrowawayDaemon(load_config(None), "write", None, extra=extra) as daemon:
        config_path, state = daemon.root / "auditd.toml", daemon.root / "verify-state.json"
        writer = PacedWriter(daemon.socket, None, rate, event_type="bench.verify",
                             prefix="vl")
        writer.start()
        # Before the first checkpoint verify has nothing to check against (exit 2, rightly).
        wait_until(lambda: has_checkpoint(daemon.status_socket), "a first checkpoint", 60,
                   "verify_loop")
        try:
            for run in range(1, runs + 1):
                code, doc = verify_once(config_path, state)
                codes[code] += 1
                read.append(int(doc.get("verified_events") or 0))
                if code != 0 and len(failed) < _SHOWN:
                    failed.append({"run": run, "code": code, "report": doc})
                if kill_every and killed < kills and run % kill_every == 0:
                    daemon.sigkill_and_restart()
                    killed += 1
                print(f"verify_loop: run {run}/{runs}, exit {code}, kills {killed}, "
                      f"events sent {writer.sent}", file=sys.stderr, flush=True)
        finally:
            writer.stop()
            writer.join(60)
        final_code, final = verify_once(config_path, state, "--full")
    return {"runs": runs, "exit_codes": {str(k): v for k, v in sorted(codes.items())},
            "false_alarms": runs - codes[0], "kills": killed, "rate": rate,
            "events_sent": writer.sent, "writer_error": repr(writer.error) if writer.error
            else None, "seconds": round(time.monotonic() - started, 1),
            "verified_events_per_run_median": statistics.median(read) if read else 0,
            "verified_events_per_run_max": max(read, default=0),
            "final_full": {"code": final_code, "verified_events": final.get("verified_events"),
                           "status": final.get("status")},
            "failed": failed}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m auditd.bench.verify_loop",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="verify runs (default 200)")
    parser.add_argument("--kills", type=int, default=20,
                        help="SIGKILL restarts of the daemon, spread over the runs (default 20)")
    parser.add_argument("--rate", type=float, default=5000.0,
                        help="the load's events/s (default 5000)")
    parser.add_argument("--partition", type=int, default=131_072,
                        help="storage.partition_events (default 131072)")
    parser.add_argument("--checkpoint-every", default="1s",
                        help="proofs.checkpoint_every (default 1s)")
    args = parser.parse_args()
    if args.runs <= 0 or args.kills < 0 or args.rate <= 0:
        parser.error("--runs and --rate must be positive, --kills not negative")
    doc = run_loop(args.runs, args.kills, args.rate, args.partition, args.checkpoint_every)
    print(json.dumps(doc))
    ok = doc["false_alarms"] == 0 and doc["final_full"]["code"] == 0 and not doc["writer_error"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
