"""`python -m auditd.bench.export_import --events N`: the figures of `auditd export` and
`auditd import` (docs/design/export.md) between two throw-away daemons.

N events go into a source daemon through ingest (batches of 1,000); then, each timed
as the CLI runs it: `export --format msgpack -o F.zst` (live: the daemon runs),
`export -o F.jsonl.zst`, `import F.zst` into an empty second daemon, and the same
import again (every event a duplicate). Wall seconds and events/s; the machine's load
average beside them, since on a shared machine wall time says as much about the
neighbours as about auditd. `s` is each command's wall time, start-up included;
`inner_s` what the command itself reports (the export's read and write, the import's
send; not the import's check pass).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from auditd.bench.daemon import ThrowawayDaemon
from auditd.client import Client
from auditd.config import Config


def _fill(socket_path: str, count: int) -> float:
    started = time.perf_counter()
    with Client(socket_path) as client:
        for first in range(0, count, 1000):
            client.send_many([
                {"type": "user.login", "actor": f"user{i % 97}", "target": f"/srv/{i % 13}",
                 "tags": {"outcome": "ok" if i % 7 else "denied"},
                 "data": {"n": i, "method": "sso", "ip": f"10.0.{i % 250}.{i % 199}"}}
                for i in range(first, min(count, first + 1000))], batch=1000)
    return time.perf_counter() - started


def _timed(daemon: ThrowawayDaemon, *args: str) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "auditd.cli", *args, "--json", "--config",
                           str(daemon.root / "auditd.toml")], capture_output=True, text=True,
                          check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(args)}: {done.stderr.strip()}")
    return seconds, json.loads(done.stdout or done.stderr)


def _per_s(count: int, seconds: float) -> float:
    return round(count / seconds) if seconds > 0 else 0.0


def run(count: int) -> dict[str, Any]:
    config = Config()
    work = Path(tempfile.mkdtemp(dir="/tmp", prefix="adexp"))
    packed, lines = work / "e.msgpack.zst", work / "e.jsonl.zst"
    doc: dict[str, Any] = {"events": count, "load_average_before": os.getloadavg()[0]}
    with ThrowawayDaemon(config, "write", None) as source:
        doc["fill_s"] = round(_fill(source.socket, count), 2)
        seconds, exported = _timed(source, "export", "--format", "msgpack", "-o", str(packed))
        records = exported["count"]
        doc["export_msgpack_zst"] = {"s": round(seconds, 2), "records": records,
                                     "records_per_s": _per_s(records, seconds),
                                     "inner_s": exported["seconds"],
                                     "bytes": exported["bytes"]}
        seconds, exported = _timed(source, "export", "-o", str(lines))
        doc["export_jsonl_zst"] = {"s": round(seconds, 2), "records_per_s":
                                   _per_s(exported["count"], seconds),
                                   "inner_s": exported["seconds"], "bytes": exported["bytes"]}
    with ThrowawayDaemon(config, "write", None) as target:
        for name in ("import", "reimport"):
            seconds, report = _timed(target, "import", str(packed))
            doc[name] = {"s": round(seconds, 2), "inner_s": report["seconds"],
                         "new": report["new"],
                         "duplicates": report["duplicates"],
                         "events_per_s": _per_s(report["new"] + report["duplicates"], seconds)}
    doc["reimport_share"] = round(doc["reimport"]["s"] / doc["import"]["s"], 3)
    doc["load_average_after"] = os.getloadavg()[0]
    for path in (packed, lines):
        path.unlink(missing_ok=True)
    work.rmdir()
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    print(json.dumps(run(args.events), indent=1))


if __name__ == "__main__":
    main()
