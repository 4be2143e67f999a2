"""`auditd recover` beside a running daemon, and moving damaged files aside."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import DaemonProcess

from auditd.store.recovery import move_aside


def test_offline_recover_refuses_while_a_daemon_listens(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon()
    damaged = daemon.root / "old.db"
    damaged.write_bytes(b"not looked at: the refusal comes first")
    done = subprocess.run(
        [sys.executable, "-m", "auditd.cli", "recover", "--config", str(daemon.config_path),
         "--status-socket", str(daemon.root / "nothing-here.sock"), str(damaged)],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr == (
        f"auditd: a daemon is listening on {daemon.ingest_socket} but its status socket "
        "does not answer; recover through it (--status-socket) or stop it first\n")


def test_move_aside_never_overwrites_an_earlier_wal(tmp_path: Path) -> None:
    db = tmp_path / "auditd.db"
    db.write_bytes(b"first")
    Path(f"{db}-wal").write_bytes(b"first wal")
    first = move_aside(db)
    first.unlink()  # an operator removed the old file but kept its WAL
    db.write_bytes(b"second")
    Path(f"{db}-wal").write_bytes(b"second wal")
    second = move_aside(db)
    assert second != first
    assert Path(f"{first}-wal").read_bytes() == b"first wal"
    assert second.read_bytes() == b"second"
    assert Path(f"{second}-wal").read_bytes() == b"second wal"
    assert not db.exists()
