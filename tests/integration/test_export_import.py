"""`auditd export` and `auditd import` end to end (proofs.md, "Export files"): a real
daemon writes a store (sealed partitions and hot rows), the CLI exports it live or
stopped, a second daemon imports the file; edited and cut files are refused."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zstandard
from conftest import (
    DaemonProcess,
    UnixHTTPConnection,
    committed_seq,
    wait_committed,
    wait_for,
    wait_sealed_through,
)
from proofs_store import SETTINGS, get, send, wait_checkpointed

from auditd.proofs.records import RecordSource
from auditd.query.rows import rfc3339
from auditd.schema import StoredEvent
from auditd.store.migrations import migrate
from auditd.store.records import event_from_record, is_dead_letter

FIELDS = ("id", "ts", "type", "actor", "target", "stream", "correlation_id",
          "causation_id", "tags", "data")


def run(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auditd.cli", *args, "--config",
                           str(daemon.config_path)], capture_output=True, text=True,
                          timeout=120)


def on_a_tty(daemon: DaemonProcess, *args: str) -> str:
    """What the command writes to stderr when stderr is a terminal (a pty)."""
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "auditd.cli", *args, "--config",
                               str(daemon.config_path)], stderr=follower,
                              stdout=subprocess.DEVNULL, timeout=120)
        assert done.returncode == 0
        os.set_blocking(leader, False)
        chunks = []
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(leader, 65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")
    finally:
        os.close(leader)
        os.close(follower)


def stored(daemon: DaemonProcess) -> dict[int, StoredEvent]:
    """seq -> event of every stored event (sealed partitions and hot rows)."""
    with contextlib.closing(sqlite3.connect(f"file:{daemon.db_path}?mode=ro", uri=True,
                                            isolation_level=None)) as db:
        db.execute("BEGIN")
        source = RecordSource(db, daemon.storage / "partitions")
        last = db.execute("SELECT value FROM meta WHERE key = 'committed_seq'").fetchone()[0]
        found = {seq: event_from_record(record) for seq, record in source.records(1, last)
                 if not is_dead_letter(record)}
        source.close()
    return found


def fields(event: StoredEvent) -> tuple[Any, ...]:
    return (*(getattr(event, name) for name in FIELDS[:-2]),
            None if event.tags is None else msgspec.msgpack.decode(event.tags),
            None if event.data is None else msgspec.msgpack.decode(event.data))


def events_of(daemon: DaemonProcess, through: int | None = None,
              imported_only: bool = False) -> dict[str, tuple[Any, ...]]:
    """id -> fields of the stored events (through a seq; or only the imported ones,
    once committed: an import returns once its events are acknowledged)."""
    if imported_only:
        ((newest,),) = daemon.query("SELECT coalesce(max(seq), 0) FROM event_origins")
        wait_committed(daemon, newest)
    origins = {row[0] for row in daemon.query("SELECT seq FROM event_origins")} \
        if imported_only else None
    return {event.id: fields(event) for seq, event in stored(daemon).items()
            if (through is None or seq <= through) and (origins is None or seq in origins)}


@pytest.fixture
def source(make_daemon: Any) -> DaemonProcess:
    """1,000 events (three sealed partitions, hot rows after them), some on a stream."""
    daemon: DaemonProcess = make_daemon(SETTINGS, name="src")
    send(daemon, 0, 900)
    with daemon.connect() as conn:
        assert conn.request([{"type": "order.placed", "stream": "order-7", "id": f"s{i}",
                              "correlation_id": "op-1", "tags": {"k": f"v{i}"},
                              "data": {"b": b"\x00\x01", "i": i}}
                             for i in range(100)])["ok"] == 100
    wait_committed(daemon, 1000)
    wait_sealed_through(daemon, 768)
    wait_checkpointed(daemon, 1000)
    return daemon


def exported(daemon: DaemonProcess, path: Path, *args: str) -> dict[str, Any]:
    done = run(daemon, "export", "-o", str(path), "--json", *args)
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def imported(daemon: DaemonProcess, path: Path, *args: str) -> dict[str, Any]:
    done = run(daemon, "import", str(path), "--json", *args)
    assert done.returncode == 0, done.stderr + done.stdout
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def vkey_of(daemon: DaemonProcess) -> str:
    done = run(daemon, "export-vkey")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_msgpack_zst_round_trip_is_idempotent_and_keeps_origins(
        source: DaemonProcess, make_daemon: Any, short_tmp: Path) -> None:
    path = short_tmp / "out.msgpack.zst"
    doc = exported(source, path, "--format", "msgpack")  # live: the daemon runs
    assert doc["first_seq"] == 1 and doc["last_seq"] >= 1000
    assert doc["count"] == doc["last_seq"] and doc["filters"] == {}
    assert doc["verifiable_alone"] and doc["checkpoint_size"] == doc["last_seq"]
    assert path.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # one zstd frame
    last = doc["last_seq"]
    target: DaemonProcess = make_daemon(name="dst")
    first = imported(target, path, "--vkey", vkey_of(source))
    assert first["new"] == last and first["duplicates"] == 0 and first["refused"] == 0
    assert first["root_checked"] and first["signature_checked"]
    wait_for(lambda: len(target.query("SELECT seq FROM event_origins")) == last, 30,
             "every origin written")
    wanted = events_of(source, last)
    assert events_of(target, imported_only=True) == wanted
    host = source.query("SELECT value FROM meta WHERE key = 'host_id'")[0][0]
    here = stored(target)
    origins = {here[seq].id: (host_, origin_seq, received) for seq, host_, origin_seq, received
               in target.query("SELECT * FROM event_origins")}
    assert origins == {event.id: (host, seq, event.received_at)
                       for seq, event in stored(source).items() if seq <= last}
    status, body = get(target, f"/events?origin_host={host}&type=order.placed&limit=1000")
    shown = json.loads(body)["events"]
    assert status == 200 and len(shown) == 100, body[:300]
    assert {e["origin_host"] for e in shown} == {host}
    by_id = {e.id: (seq, e) for seq, e in stored(source).items()}
    for event in shown:
        seq, original = by_id[event["id"]]
        assert event["origin_seq"] == seq != event["seq"]
        assert event["origin_received_at"] == rfc3339(original.received_at)
    status, body = get(target, "/events?origin_host=elsewhere")
    assert (status, json.loads(body)["events"]) == (200, [])
    done = run(target, "query", "--origin-host", host, "--jsonl", "--limit", "5")
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 5, done.stderr

    def not_admin() -> set[str]:
        return {e.id for e in stored(target).values() if not e.type.startswith("auditd.admin.")}

    before = not_admin()
    again = imported(target, path)
    assert again["new"] == 0 and again["duplicates"] == again["already_imported"] == last
    wait_for(lambda: not_admin() == before, 10, "")
    # a lost origin (an import cut between its events and their origins) is repaired:
    # the event is sent again, comes back a duplicate, and its origin is written
    with contextlib.closing(sqlite3.connect(target.db_path, timeout=10)) as db, db:
        db.execute("DELETE FROM event_origins WHERE origin_seq <= 10")
    repaired = imported(target, path)
    assert repaired["new"] == 0 and repaired["duplicates"] == last
    assert repaired["already_imported"] == last - 10
    assert len(target.query("SELECT * FROM event_origins")) == last
    assert not_admin() == before  # only the import's own admin events are new


def test_jsonl_export_of_a_stopped_store_imports_the_same_events(
        source: DaemonProcess, make_daemon: Any, short_tmp: Path) -> None:
    source.stop()
    path = short_tmp / "out.jsonl"
    doc = exported(source, path)  # the default format; no daemon answers
    assert "no daemon answers" in doc["checkpoint_note"]
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["format"] == "auditd-export"
    assert len(lines) == doc["count"] + 1
    # small frames: import cuts its batches to the daemon's frame limit
    target: DaemonProcess = make_daemon({"ingest": {"max_frame_bytes": "8KB"}}, name="dst")
    report = imported(target, path)
    assert report["new"] == doc["count"] and not report["root_checked"]
    assert any("JSON lines" in note for note in report["notes"])
    wanted = events_of(source, doc["last_seq"])
    assert events_of(target, imported_only=True) == wanted


def test_filtered_export_and_until_seq(source: DaemonProcess, short_tmp: Path) -> None:
    path = short_tmp / "actor.jsonl.zst"
    doc = exported(source, path, "--actor", "user1", "--until-seq", "500")
    assert doc["filters"] == {"actor": ["user1"]} and doc["last_seq"] == 500
    assert not doc["verifiable_alone"]
    with path.open("rb") as raw:
        lines = zstandard.ZstdDecompressor().stream_reader(raw).read().splitlines()
    events = [json.loads(line) for line in lines[1:]]
    assert len(events) == doc["count"] == 100  # ids ev-1, ev-6, ... below seq 500
    assert {e["actor"] for e in events} == {"user1"}
    done = run(source, "import", str(path), "--check-only")
    assert done.returncode == 0 and "JSON lines" in done.stdout, done.stdout
    assert "\rexport: " in on_a_tty(source, "export", "-o", str(short_tmp / "tty.jsonl"))
    # a store's own export imported back: every event a duplicate
    back = imported(source, short_tmp / "tty.jsonl")
    assert back["new"] == 0 and back["duplicates"] > 1000
    path = short_tmp / "actor.msgpack"
    exported(source, path, "--actor", "user1", "--format", "msgpack")
    done = run(source, "import", str(path), "--check-only")
    assert done.returncode == 0 and "a filtered export" in done.stdout, done.stdout


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    values: list[bytes] = []
    at = 0
    while at < len(data):  # decode one value at a time, the slow honest way
        for end in range(at + 1, len(data) + 1):
            try:
                msgspec.msgpack.decode(data[at:end])
            except msgspec.DecodeError:
                continue
            values.append(data[at:end])
            at = end
            break
    return values


def test_cut_and_edited_files_are_refused_naming_what_differs(
        source: DaemonProcess, make_daemon: Any, short_tmp: Path) -> None:
    path = short_tmp / "out.msgpack"
    doc = exported(source, path, "--format", "msgpack")  # the whole tree: root checked
    target: DaemonProcess = make_daemon(name="dst")
    data = path.read_bytes()

    def refused(content: bytes, *args: str) -> str:
        bad = short_tmp / "bad.msgpack"
        bad.write_bytes(content)
        done = run(target, "import", str(bad), *args)
        assert done.returncode == 1, done.stdout
        assert done.stderr.count("\n") == 1, done.stderr
        return done.stderr

    assert "truncated" in refused(data[:-7])  # a value cut short
    records = _records(path)
    count = doc["count"]
    assert len(records) == count + 1
    assert f"holds {count - 1} records" in refused(b"".join(records[:-1]))  # one gone
    assert "seq 10 is missing" in refused(b"".join(records[:10] + records[11:]))
    assert "out of order" in refused(b"".join([*records, records[-1]]))  # one twice
    edited = data.replace(b"event number 42", b"event number 24")
    assert edited != data
    assert "Merkle root" in refused(edited)
    wrong = run(make_daemon(name="other"), "export-vkey").stdout.strip()
    assert "no signature by the key" in refused(data, "--vkey", wrong)
    assert not [e for e in stored(target).values() if e.type == "test.proof"]


def test_a_whole_tree_export_verifies_offline(source: DaemonProcess, short_tmp: Path) -> None:
    source.stop()
    path = short_tmp / "all.msgpack"
    exported(source, path, "--format", "msgpack")
    done = run(source, "import", str(path), "--check-only", "--vkey", vkey_of(source))
    assert done.returncode == 0 and "signature checked" in done.stdout, done.stdout
    assert "not checked" not in done.stdout
    edited = short_tmp / "edited.msgpack"
    edited.write_bytes(path.read_bytes().replace(b"event number 42", b"event number 24"))
    done = run(source, "import", str(edited), "--check-only")
    assert done.returncode == 1 and "Merkle root" in done.stderr, done.stderr


def test_bad_arguments_get_one_line(source: DaemonProcess, short_tmp: Path) -> None:
    for args, code, words in (
            (("export", "--format", "xml"), 2, "invalid choice"),
            (("export", "--since", "soon"), 2, "since"),
            (("export", "--until-seq", "0"), 2, "until-seq"),
            (("export", "-o", str(short_tmp)), 2, "is a directory"),
            (("import", str(short_tmp / "nope.jsonl")), 2, "no such file"),
            (("import", str(source.config_path)), 1, "manifest")):
        done = run(source, *args)
        assert done.returncode == code, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and words in done.stderr, (args, done.stderr)
    path = short_tmp / "x.jsonl"
    exported(source, path, "--until-seq", "5")
    source.stop()
    done = run(source, "import", str(path))
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "running daemon" in done.stderr or "cannot reach" in done.stderr, done.stderr


POISON = ("CREATE TRIGGER poison BEFORE INSERT ON events"
          " WHEN NEW.type = (SELECT id FROM names WHERE value = 'poison.event')"
          " BEGIN SELECT RAISE(ABORT, 'poisoned'); END")


def test_dead_letters_are_exported_and_skipped_by_import(make_daemon: Any,
                                                         short_tmp: Path) -> None:
    """A seq the writer dead-lettered (a trigger refuses its insert) is in a complete
    export as its dead-letter record: the root still checks; import skips it."""
    source: DaemonProcess = make_daemon({"proofs": {"checkpoint_every": "100ms"}}, name="src")
    send(source, 0, 10)
    wait_committed(source, 10)
    with contextlib.closing(sqlite3.connect(source.db_path, isolation_level=None,
                                            timeout=10)) as db:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO names (value) VALUES ('poison.event') ON CONFLICT DO NOTHING")
        db.execute(POISON)
        db.execute("COMMIT")
    with source.connect() as conn:
        assert conn.request([{"type": "poison.event", "id": "p"},
                             {"type": "fine", "id": "f"}])["ok"] == 2
    wait_for(lambda: source.query("SELECT count(*) FROM dead_letters") == [(1,)], 30,
             "the dead letter")
    wait_checkpointed(source, 12)
    path = short_tmp / "dl.msgpack"
    doc = exported(source, path, "--format", "msgpack")
    jsonl_path = short_tmp / "dl.jsonl"
    exported(source, jsonl_path, "--until-seq", str(doc["last_seq"]))
    lines = [json.loads(line) for line in jsonl_path.read_text().splitlines()[1:]]
    assert [line["seq"] for line in lines if line.get("dead_letter")] == [11]
    target: DaemonProcess = make_daemon(name="dst")
    report = imported(target, path, "--vkey", vkey_of(source))
    assert report["root_checked"] and report["dead_letters_skipped"] == 1
    assert report["new"] == doc["count"] - 1
    ids = set(events_of(target, imported_only=True))
    assert "f" in ids and "p" not in ids


def test_a_cut_jsonl_file_and_a_non_admin_are_refused(source: DaemonProcess,
                                                      short_tmp: Path) -> None:
    path = short_tmp / "cut.jsonl"
    exported(source, path, "--until-seq", "50")
    text = path.read_bytes()
    cut = short_tmp / "cut2.jsonl"
    cut.write_bytes(text[:-40])
    done = run(source, "import", str(cut))
    assert done.returncode == 1 and "truncated" in done.stderr, done.stderr
    source.config_path.write_text(source.config_path.read_text().replace(
        "admin_uids = [0]", "admin_uids = [4242]"))
    assert get_post(source, "/reload")[0] == 200
    before = {e.id for e in stored(source).values() if not e.type.startswith("auditd.")}
    done = run(source, "import", str(path))
    assert done.returncode == 1 and "403" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1
    after = {e.id for e in stored(source).values() if not e.type.startswith("auditd.")}
    assert after == before and source.query("SELECT count(*) FROM event_origins") == [(0,)]


def get_post(daemon: DaemonProcess, path: str) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(daemon.status_socket)
    try:
        conn.request("POST", path, body=b"")
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_an_import_cut_by_a_daemon_crash_is_finished_by_a_rerun(
        source: DaemonProcess, make_daemon: Any, short_tmp: Path) -> None:
    """SIGKILL the receiving daemon mid-import: the import fails with one line; after
    a restart the same import sends the rest, and every event is there once, each with
    its origin (the acknowledged ones come back as duplicates and get theirs)."""
    path = short_tmp / "all.msgpack.zst"
    doc = exported(source, path, "--format", "msgpack")
    last = doc["last_seq"]
    # small frames at 400 events/s: the import takes seconds, time to cut it
    target: DaemonProcess = make_daemon({"ingest": {"max_frame_bytes": "8KB",
                                                    "rate_limit": "400/s burst 20"}},
                                        name="dst")
    running = subprocess.Popen([sys.executable, "-m", "auditd.cli", "import", str(path),
                                "--config", str(target.config_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: committed_seq(target) >= 200, 60, "part of the import committed")
        target.kill()
        out, err = running.communicate(timeout=60)
    finally:
        if running.poll() is None:
            running.kill()
            running.communicate()
    assert running.returncode == 1 and err.count("\n") == 1, (out, err)
    target.start()
    again = imported(target, path)
    assert again["new"] + again["duplicates"] == last and again["duplicates"] >= 1
    events = events_of(target, imported_only=True)
    assert events == events_of(source, last)
    ids = [e.id for e in stored(target).values()]
    assert len(ids) == len(set(ids))
    assert target.query("SELECT count(*) FROM event_origins") == [(last,)]


def test_a_store_without_a_database_or_checkpoint_is_refused(make_daemon: Any) -> None:
    never: DaemonProcess = make_daemon(start=False)
    done = run(never, "export")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "no database at" in done.stderr
    never.storage.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(never.db_path, isolation_level=None)) as db:
        migrate(db)  # a store that never signed a checkpoint
    done = run(never, "export", "-o", str(never.root / "x.jsonl"))
    assert done.returncode == 1 and "no signed checkpoint" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and not (never.root / "x.jsonl").exists()
    assert not list(never.root.glob(".x.jsonl.partial*"))
