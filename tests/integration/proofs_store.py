"""A store with a Merkle log for the proofs tests: sealed partitions and hot rows, two
checkpoints far apart; and the CLI run against copies of it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import (
    DaemonProcess,
    UnixHTTPConnection,
    wait_committed,
    wait_for,
    wait_sealed_through,
    write_config,
)

PARTITION = 256
SETTINGS = {"storage": {"partition_events": PARTITION},
            "proofs": {"checkpoint_every": "100ms"}}


def get(daemon: DaemonProcess, path: str) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(daemon.status_socket)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def get_json(daemon: DaemonProcess, path: str) -> tuple[int, Any]:
    status, body = get(daemon, path)
    return status, json.loads(body)


def vkey_text(daemon: DaemonProcess) -> str:
    """The daemon's verifier key, as `auditd export-vkey` prints it."""
    done = cli(daemon.config_path, "export-vkey")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def checkpoint_size(daemon: DaemonProcess) -> int:
    status, body = get(daemon, "/checkpoint")
    return int(body.split(b"\n")[1]) if status == 200 else 0


def wait_checkpointed(daemon: DaemonProcess, seq: int, timeout: float = 30.0) -> None:
    """Until a checkpoint covers `seq`: first its commit (wait_committed, which tells a
    slow store, e.g. tiny partitions sealed on a loaded machine, from a stalled one),
    then the checkpoint, within `timeout` s of the commit."""
    wait_committed(daemon, seq)
    wait_for(lambda: checkpoint_size(daemon) >= seq, timeout, f"a checkpoint of seq {seq}")


def send(daemon: DaemonProcess, first: int, count: int, batch: int = 100) -> None:
    with daemon.connect() as conn:
        for start in range(first, first + count, batch):
            events = [{"type": "test.proof", "id": f"ev-{i}", "actor": f"user{i % 5}",
                       "data": {"n": i, "text": f"event number {i}"}}
                      for i in range(start, min(start + batch, first + count))]
            assert conn.request(events)["ok"]


def build(daemon: DaemonProcess, old_checkpoint: Path) -> None:
    """1,000 events; the checkpoint of the first 500 saved to `old_checkpoint`."""
    send(daemon, 0, 500)
    wait_checkpointed(daemon, 500)
    old_checkpoint.write_bytes(get(daemon, "/checkpoint")[1])
    send(daemon, 500, 500)
    wait_committed(daemon, 1000)
    wait_sealed_through(daemon, 768)
    wait_checkpointed(daemon, 1000)


def copy_store(source: DaemonProcess, root: Path) -> Path:
    """A copy of the (stopped) daemon's storage and a config naming it; the config."""
    root.mkdir(parents=True)
    shutil.copytree(source.storage, root / "lib")
    config = root / "auditd.toml"
    write_config(config, {"storage": {"path": str(root / "lib")}})
    return config


def cli(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auditd.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=120, input=stdin)


def verify(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    done = cli(config, "verify", "--json", *args)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def sql(db: Path, script: str) -> None:
    """Run `script` with the sqlite3 command-line shell, as an attacker would."""
    done = subprocess.run(["sqlite3", str(db)], input=script, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and not done.stderr, done.stderr
