"""Shutdown closes each part on its own: one that fails (a real failure: the journal's
directory made immutable, so releasing segments cannot delete them) is logged once, the
steps after it still run, and the exit code says the stop was not clean."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import DaemonProcess, wait_committed, wait_for, write_config

MakeDaemon = Callable[..., DaemonProcess]
EVENTS = 400  # about ten 4 KB journal segments


@contextmanager
def immutable(path: Path) -> Iterator[None]:
    """chattr +i: not even root may create or delete entries in the directory."""
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chattr") is None,
                    reason="making a directory immutable needs root and chattr")
def test_a_failed_journal_release_is_logged_and_the_rest_still_closes(
        make_daemon: MakeDaemon) -> None:
    daemon = make_daemon({"storage": {"journal_segment_bytes": "4KB"}})
    journal = daemon.storage / "journal"
    # A reader's snapshot, taken before the events, keeps every WAL checkpoint partial,
    # and the daemon releases journal segments only behind a complete one: they stay.
    reader = sqlite3.connect(daemon.db_path)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM events").fetchall()
    try:
        with daemon.connect() as conn:
            for start in range(0, EVENTS, 20):
                reply = conn.request([{"type": "segmented", "id": f"e{i}"}
                                      for i in range(start, start + 20)])
                assert reply["ok"] == 20, reply
        wait_committed(daemon, EVENTS)
        assert len(list(journal.glob("*.journal"))) >= 3
    finally:
        reader.close()  # from now on the checkpoints complete and releases are tried

    with immutable(journal):
        code = daemon.stop()
        segments_left = len(list(journal.glob("*.journal")))

    assert code == 1, daemon.log_text()[-3000:]
    lines = daemon.log_events()
    failed = [line for line in lines if line["event"] == "shutdown_step_failed"]
    assert [line["step"] for line in failed] == ["journal_release"], failed
    assert "Operation not permitted" in failed[0]["error"]
    assert segments_left >= 3  # nothing was deleted
    # The steps after it ran: the journal and the store were closed (the store's last
    # connection checkpointed the WAL and removed it) and the daemon said it stopped.
    stopped = [line for line in lines if line["event"] == "daemon_stopped"]
    assert len(stopped) == 1 and stopped[0]["failed_steps"] == ["journal_release"]
    assert not Path(f"{daemon.db_path}-wal").exists()
    assert daemon.query("SELECT count(*) FROM events") == [(EVENTS,)]

    daemon.start()  # and the next start releases what this one could not
    wait_for(lambda: len(list(journal.glob("*.journal"))) < segments_left, 30,
             "the segments to be released")


def test_a_start_that_fails_part_way_closes_what_it_opened_and_exits(
        make_daemon: MakeDaemon) -> None:
    """The metrics port is taken, so the start fails after the database, projections
    and dead-letter store are open: each is closed (the store last, so its connection
    checkpoints the WAL and removes it), nothing keeps the process alive, one line says
    why, and the exit code is not 0."""
    daemon = make_daemon()
    with daemon.connect() as conn:
        assert conn.request([{"type": "before", "id": f"b{i}"} for i in range(20)])["ok"] == 20
    wait_committed(daemon, 20)
    assert daemon.stop() == 0
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon.sections["status"]["metrics_listen"] = f"127.0.0.1:{port}"
        write_config(daemon.config_path, daemon.sections)
        daemon.start(wait=False)
        assert daemon.proc is not None
        code = daemon.proc.wait(60)
    finally:
        taken.close()
    assert code != 0, daemon.log_text()[-3000:]
    assert daemon.log_since_start().rstrip().splitlines()[-1] == (
        f"auditd: status.metrics_listen = '127.0.0.1:{port}': cannot listen: error while "
        f"attempting to bind on address ('127.0.0.1', {port}): address already in use")
    lines = daemon.log_events()
    assert not [line for line in lines if line["event"] == "shutdown_step_failed"], lines
    assert "Traceback" not in daemon.log_since_start()
    assert not Path(f"{daemon.db_path}-wal").exists(), "the store was not closed"
    assert daemon.query("SELECT count(*) FROM events") == [(20,)]
