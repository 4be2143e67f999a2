"""Backup under load, `backup --verify`, `restore`, `verify`: the same checkpoint root
all three ways; a damaged backup is refused with the reason; one older than a
checkpoint seen before is refused unless --force; never beside a running daemon."""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

from conftest import DaemonProcess, stored_seqs, wait_committed, wait_sealed_through
from proofs_store import cli, get, send, verify, wait_checkpointed

PARTITION = 300
SETTINGS = {"storage": {"partition_events": PARTITION},
            "proofs": {"checkpoint_every": "100ms"}}


def _root(text: str) -> tuple[int, str]:
    lines = text.split("\n")
    return int(lines[1]), lines[2]


def _backup_under_load(daemon: DaemonProcess, dest: Path) -> tuple[int, str]:
    """`auditd backup DEST --verify` while a client sends; the verified (size, root)."""
    stop = threading.Event()

    def load() -> None:
        n = 10_000
        while not stop.is_set():
            send(daemon, n, 20, batch=20)
            n += 20

    sender = threading.Thread(target=load)
    sender.start()
    try:
        done = cli(daemon.config_path, "backup", str(dest), "--verify", "--json")
    finally:
        stop.set()
        sender.join()
    assert done.returncode == 0, done.stderr
    verified = json.loads(done.stdout.strip().splitlines()[-1])
    assert verified["verified"] and verified["verify"]["status"] == "verified", verified
    return (verified["checkpoint"]["size"],
            base64.b64encode(bytes.fromhex(verified["checkpoint"]["root"])).decode())


def _filled(make_daemon: Any) -> DaemonProcess:
    daemon: DaemonProcess = make_daemon(SETTINGS)
    send(daemon, 0, 1000)
    last = int(daemon.stats()["last_seq"])
    wait_committed(daemon, last)
    wait_sealed_through(daemon, 900)
    wait_checkpointed(daemon, last)
    return daemon


def test_backup_restore_and_verify_give_the_same_root(make_daemon: Any,
                                                      short_tmp: Path) -> None:
    daemon = _filled(make_daemon)
    dest = short_tmp / "copy" / "backup.db"
    dest.parent.mkdir()
    size, root = _backup_under_load(daemon, dest)
    assert size >= 1000 and (dest.parent / "partitions").is_dir()
    refused = cli(daemon.config_path, "restore", str(dest))
    assert refused.returncode == 1 and "before restoring" in refused.stderr, refused
    daemon.stop()
    before = stored_seqs(daemon)

    done = cli(daemon.config_path, "restore", str(dest), "--json")
    assert done.returncode == 0, done.stderr
    restored = json.loads(done.stdout)
    assert restored["checkpoint"]["size"] == size
    assert base64.b64encode(bytes.fromhex(restored["checkpoint"]["root"])).decode() == root
    aside = Path(restored["replaced"])
    assert (aside / "auditd.db").is_file() and (aside / "journal").is_dir()
    code, report = verify(daemon.config_path)
    assert code == 0 and _root(report["checkpoint"]["text"]) == (size, root), report
    kept = stored_seqs(daemon)
    assert kept == {seq: i for seq, i in before.items() if seq <= max(kept)}

    daemon.start()  # the daemon runs on the restored store, after its last seq
    send(daemon, 2_000_000, 10)
    wait_committed(daemon, max(kept) + 10)
    assert max(stored_seqs(daemon)) > max(kept)


def test_a_damaged_or_older_backup_is_refused(make_daemon: Any, short_tmp: Path) -> None:
    daemon = _filled(make_daemon)
    dest = short_tmp / "copy" / "backup.db"
    dest.parent.mkdir()
    # Taken at rest, so that its checkpoint covers the hot row edited below (under load
    # it may end before the first hot row; an edit past the checkpoint is refused with
    # another detail: test_verify_attacks).
    done = cli(daemon.config_path, "backup", str(dest), "--verify")
    assert done.returncode == 0, done.stderr
    send(daemon, 1_000_000, 500)  # the store moves on past the backup
    last = int(daemon.stats()["last_seq"])
    wait_checkpointed(daemon, last)
    newer = short_tmp / "newer.checkpoint"
    newer.write_bytes(get(daemon, "/checkpoint")[1])
    daemon.stop()
    live = stored_seqs(daemon)

    edited = short_tmp / "edited"
    shutil.copytree(dest.parent, edited)
    db = sqlite3.connect(edited / "backup.db", isolation_level=None)
    try:  # one hot event's data changed behind the triggers' back
        db.execute("DROP TRIGGER events_no_update")
        (seq,) = db.execute("SELECT min(seq) FROM events").fetchone()  # checkpointed
        db.execute("UPDATE events SET data = ? WHERE seq = ?", (b"\x80", seq))
    finally:
        db.close()
    cut = short_tmp / "cut"
    shutil.copytree(dest.parent, cut)
    with (cut / "backup.db").open("r+b") as handle:
        handle.truncate((cut / "backup.db").stat().st_size // 2)
    for bad, why in ((edited, f"seq {seq}"), (cut, "backup.db")):
        done = cli(daemon.config_path, "restore", str(bad / "backup.db"))
        assert done.returncode == 1 and why in done.stderr, done.stderr
        assert done.stderr.startswith("auditd: restore refused: ") and \
            done.stderr.count("\n") == 1, done.stderr
        assert stored_seqs(daemon) == live  # nothing replaced

    older = cli(daemon.config_path, "restore", str(dest), "--checkpoint", str(newer))
    assert older.returncode == 1 and "older than the given checkpoint" in older.stderr, older
    assert stored_seqs(daemon) == live
    forced = cli(daemon.config_path, "restore", str(dest), "--checkpoint", str(newer),
                 "--force")
    assert forced.returncode == 0, forced.stderr
    assert max(stored_seqs(daemon)) < max(live)
