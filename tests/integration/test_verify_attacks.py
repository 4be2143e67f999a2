"""`auditd verify` against an attacker who drops the triggers and edits the files.

One store is built once (1,000 events: three sealed partitions of 256 and hot rows,
checkpoints at >= 500 and at 1,000); each test edits its own copy with the sqlite3
shell, then verify must exit 1 naming the first bad seq and the kind.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess
from proofs_store import SETTINGS, build, cli, copy_store, send, sql, verify

UNGUARD = ("DROP TRIGGER events_no_update; DROP TRIGGER events_no_delete;"
           " DROP TRIGGER checkpoints_no_update; DROP TRIGGER checkpoints_no_delete;")
COLUMNS = ("id, id_hash, ts, received_at, type, actor, target, stream, stream_seq,"
           " correlation_id, causation_id, tags, data, pid, uid, gid, comm")


@pytest.fixture(scope="module")
def pristine() -> Iterator[tuple[DaemonProcess, Path]]:
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="adv"))
    (root / "d").mkdir()
    daemon = DaemonProcess(root / "d", SETTINGS)
    old = root / "old.ckpt"
    daemon.start()
    try:
        build(daemon, old)
    finally:
        assert daemon.stop() == 0
    yield daemon, old
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def store(pristine: tuple[DaemonProcess, Path], short_tmp: Path) -> tuple[Path, Path, Path]:
    """(config, db, old checkpoint file) of a fresh copy, with a state file verified."""
    daemon, old = pristine
    config = copy_store(daemon, short_tmp / "copy")
    return config, short_tmp / "copy" / "lib" / "auditd.db", old


def _problem(config: Path, *args: str) -> dict[str, Any]:
    code, doc = verify(config, *args)
    assert code == 1, doc
    assert doc["status"] == "tampered"
    problem: dict[str, Any] = doc["problem"]
    return problem


def test_the_untouched_store_verifies(store: tuple[Path, Path, Path]) -> None:
    config, _, old = store
    code, doc = verify(config, "--checkpoint", str(old))
    assert code == 0, doc
    assert doc["verified_events"] == 1000 and doc["checkpoint"]["size"] == 1000
    assert doc["not_yet_checkpointed"] == 0


def test_one_events_data_edited(store: tuple[Path, Path, Path]) -> None:
    config, db, _ = store
    sql(db, UNGUARD + "UPDATE events SET data = X'81a16ecd0384' WHERE seq = 900;")
    problem = _problem(config)
    assert (problem["seq"], problem["kind"]) == (900, "modified")


def test_an_edit_past_the_newest_checkpoint_is_found(store: tuple[Path, Path, Path]) -> None:
    """Records no checkpoint covers yet are still checked against their stored leaves:
    without the newest checkpoints, seqs past the one left are that tail."""
    config, db, _ = store
    sql(db, UNGUARD + "DELETE FROM checkpoints WHERE size > 950;")
    code, doc = verify(config)
    assert code == 0 and doc["not_yet_checkpointed"] > 50, doc
    assert any("checked against their leaves" in note for note in doc["notes"]), doc
    sql(db, "UPDATE events SET data = X'81a16ecd0384' WHERE seq = 990;")
    problem = _problem(config)
    assert (problem["seq"], problem["kind"]) == (990, "modified"), problem
    assert "past the newest checkpoint" in problem["detail"], problem


def test_a_middle_row_deleted(store: tuple[Path, Path, Path]) -> None:
    config, db, _ = store
    sql(db, UNGUARD + "DELETE FROM events WHERE seq = 850;")
    problem = _problem(config)
    assert (problem["seq"], problem["kind"]) == (850, "missing")


def test_two_rows_swapped(store: tuple[Path, Path, Path]) -> None:
    config, db, _ = store
    sql(db, UNGUARD + f"CREATE TEMP TABLE t AS SELECT seq, {COLUMNS} FROM events"
        " WHERE seq IN (800, 801);"
        f" UPDATE events SET ({COLUMNS}) = (SELECT {COLUMNS} FROM t"
        " WHERE t.seq = 1601 - events.seq) WHERE seq IN (800, 801);")
    problem = _problem(config)
    assert (problem["seq"], problem["kind"]) == (800, "reordered")


def test_a_row_inserted_and_the_rest_renumbered(store: tuple[Path, Path, Path]) -> None:
    config, db, _ = store
    sql(db, UNGUARD + "UPDATE events SET seq = -(seq + 1) WHERE seq >= 870;"
        " UPDATE events SET seq = -seq WHERE seq < 0;"
        f" INSERT INTO events (seq, {COLUMNS}) SELECT 870, 'forged-id', id_hash, ts,"
        " received_at, type, actor, target, stream, stream_seq, correlation_id,"
        " causation_id, tags, data, pid, uid, gid, comm FROM events WHERE seq = 871;")
    problem = _problem(config)
    assert (problem["seq"], problem["kind"]) == (870, "inserted")


def test_the_newest_rows_truncated_with_their_checkpoints(store: tuple[Path, Path, Path],
                                                          short_tmp: Path) -> None:
    config, db, old = store
    state = short_tmp / "state.json"
    assert verify(config, "--state", str(state))[0] == 0
    newest = sqlite3.connect(db).execute(
        "SELECT text FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()[0]
    (short_tmp / "newest.ckpt").write_text(newest)
    old_size = int(old.read_text().split("\n")[1])
    # The attacker rolls the store back to the old checkpoint: rows, checkpoints, edge.
    sql(db, UNGUARD + "DELETE FROM events WHERE seq > 990;"
        f" DELETE FROM checkpoints WHERE size > {old_size};")
    for args in (("--state", str(state)), ("--checkpoint", str(short_tmp / "newest.ckpt"))):
        problem = _problem(config, *args)
        assert (problem["seq"], problem["kind"]) == (991, "truncated"), args


def test_a_sealed_partition_file_edited(store: tuple[Path, Path, Path]) -> None:
    config, db, _ = store
    part = db.parent / "partitions" / "p000000000257-000000000512.db"
    conn = sqlite3.connect(part)
    row, data = conn.execute("SELECT row, data FROM record_stream ORDER BY row LIMIT 1"
                             ).fetchone()
    edited = bytearray(data)
    edited[len(edited) // 2] ^= 0x01
    conn.execute("UPDATE record_stream SET data = ? WHERE row = ?", (bytes(edited), row))
    conn.commit()
    conn.close()
    problem = _problem(config)
    assert problem["kind"] == "modified"
    assert 257 <= problem["seq"] <= 512


def test_a_checkpoint_signature_altered(store: tuple[Path, Path, Path]) -> None:
    config, db, _ = store
    text = sqlite3.connect(db).execute(
        "SELECT id, text FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()
    signature = text[1].rstrip("\n").rsplit(" ", 1)[1]
    forged = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    conn = sqlite3.connect(db)
    conn.executescript(UNGUARD)
    conn.execute("UPDATE checkpoints SET text = ? WHERE id = ?",
                 (text[1].replace(signature, forged), text[0]))
    conn.commit()
    conn.close()
    assert _problem(config)["kind"] == "forged checkpoint"


def test_a_checkpoint_root_altered(store: tuple[Path, Path, Path]) -> None:
    config, db, _ = store
    conn = sqlite3.connect(db)
    ident, text = conn.execute("SELECT id, text FROM checkpoints ORDER BY id DESC LIMIT 1"
                               ).fetchone()
    lines = text.split("\n")
    lines[2] = "A" + lines[2][1:] if lines[2][0] != "A" else "B" + lines[2][1:]
    conn.executescript(UNGUARD)
    conn.execute("UPDATE checkpoints SET text = ? WHERE id = ?", ("\n".join(lines), ident))
    conn.commit()
    conn.close()
    assert _problem(config)["kind"] == "forged checkpoint"


def test_an_older_checkpoint_replayed_as_newest(store: tuple[Path, Path, Path],
                                                short_tmp: Path) -> None:
    config, db, old = store
    state = short_tmp / "state.json"
    assert verify(config, "--state", str(state))[0] == 0
    old_size = int(old.read_text().split("\n")[1])
    sql(db, UNGUARD + f"DELETE FROM checkpoints WHERE size > {old_size};")
    assert verify(config)[0] == 0  # without a remembered checkpoint it looks fine
    problem = _problem(config, "--state", str(state))
    assert problem["kind"] == "inconsistent history"


def test_the_whole_store_replaced_by_one_signed_with_another_key(
        store: tuple[Path, Path, Path], short_tmp: Path, make_daemon: Any) -> None:
    config, db, _ = store
    state = short_tmp / "state.json"
    assert verify(config, "--state", str(state))[0] == 0
    other = make_daemon(SETTINGS)
    send(other, 0, 300)
    assert other.stop() == 0
    shutil.rmtree(db.parent)
    shutil.copytree(other.storage, db.parent)
    assert verify(config)[0] == 0  # its own key signs it...
    problem = _problem(config, "--state", str(state))  # ...not the pinned one
    assert problem["kind"] == "forged checkpoint"
    assert "no signature by the key" in problem["detail"]


def test_verify_without_a_key_cannot_verify(store: tuple[Path, Path, Path]) -> None:
    config, db, _ = store
    (db.parent / "checkpoint.key").unlink()
    done = cli(config, "verify")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no verifier key" in done.stderr
