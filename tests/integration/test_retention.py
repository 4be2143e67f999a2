"""Retention end to end: by age and by bytes on a populated store, the oldest go and
the newest stay; `verify` passes and proofs of what remains verify (proofs.md "After
retention"); archive then delete; a failing archive directory stops deletion, not
ingestion, and health says so; `vacuum --dry-run` deletes nothing."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from conftest import (
    DaemonProcess,
    UnixHTTPConnection,
    catalogued,
    stored_seqs,
    wait_committed,
    wait_for,
    wait_sealed_through,
    write_config,
)
from proofs_store import (
    checkpoint_size,
    cli,
    get,
    get_json,
    send,
    verify,
    vkey_text,
    wait_checkpointed,
)

from auditd.lifecycle.files import msgpack_values, open_input
from auditd.lifecycle.manifest import decode
from auditd.proofs.notes import parse_vkey
from auditd.proofs.offline import check_proof
from auditd.store.records import record_seq

# Not a multiple of 256: the prune points cut tiles and 16-leaf groups.
PARTITION = 300
SETTINGS: dict[str, dict[str, Any]] = {
    "storage": {"partition_events": PARTITION},
    "proofs": {"checkpoint_every": "100ms"},
    "retention": {"max_age": "0s", "max_bytes": "0", "interval": "1h"},
}


def _settings(**retention: Any) -> dict[str, dict[str, Any]]:
    merged = {section: dict(keys) for section, keys in SETTINGS.items()}
    merged["retention"].update(retention)
    return merged


def _fill(daemon: DaemonProcess, count: int, first: int = 0) -> int:
    """Send `count` events, wait until they are sealed and checkpointed; the last seq
    (admin calls record events of their own, so seqs run ahead of the events sent)."""
    send(daemon, first, count)
    last = int(daemon.stats()["last_seq"])
    wait_committed(daemon, last)
    wait_sealed_through(daemon, last // PARTITION * PARTITION)
    wait_checkpointed(daemon, last)
    return last


def _post(daemon: DaemonProcess, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    conn = UnixHTTPConnection(daemon.status_socket)
    try:
        conn.request("POST", path, body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _vacuum(daemon: DaemonProcess, *args: str) -> dict[str, Any]:
    done = cli(daemon.config_path, "vacuum", "--json", *args)
    assert done.returncode in (0, 1), done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document.get("result", document)


def _reconfigure(daemon: DaemonProcess, **retention: Any) -> None:
    daemon.sections["retention"].update(retention)
    write_config(daemon.config_path, daemon.sections)
    status, body = _post(daemon, "/reload", {})
    assert status == 200, body


def test_retention_by_age_keeps_the_tree_and_the_newest(make_daemon: Any,
                                                        short_tmp: Path) -> None:
    daemon = make_daemon(SETTINGS)
    _fill(daemon, 500)
    old_checkpoint = short_tmp / "old.checkpoint"
    old_checkpoint.write_bytes(get(daemon, "/checkpoint")[1])
    _fill(daemon, 500, 500)  # partitions 1-300, 301-600, 601-900; hot 901-1000
    assert [c[:2] for c in catalogued(daemon)] == [(1, 300), (301, 600), (601, 900)]

    # No limits: nothing is due.
    assert _vacuum(daemon, "--dry-run")["would_delete"] == []
    # max_age: every sealed partition is older than 1 ms; the hot table stays.
    _reconfigure(daemon, max_age="1ms", interval="1h")
    wait_for(lambda: not catalogued(daemon), 30, "retention to drop every partition")
    assert _vacuum(daemon)["deleted"] == []  # already applied by the woken task
    kept = stored_seqs(daemon)
    assert min(kept) == 901 and {f"ev-{i}" for i in range(900, 1000)} <= set(kept.values())
    assert daemon.query("SELECT size FROM prune_points ORDER BY size") == [
        (300,), (600,), (900,)]
    assert not list((daemon.storage / "partitions").glob("p*.db"))
    stats = daemon.stats()["retention"]
    assert stats["dropped_partitions"] == 3 and stats["dropped_events"] == 900
    assert stats["pruned_through"] == 900 and stats["oldest_seq"] == 901

    status, page = get_json(daemon, "/events?limit=3")
    assert status == 200 and [e["seq"] for e in page["events"]] == [901, 902, 903]
    vkey = parse_vkey(vkey_text(daemon))
    for seq in (901, 902, 917, 1000):
        status, proof = get_json(daemon, f"/proofs/{seq}")
        assert status == 200, proof
        check_proof(json.dumps(proof), vkey)
    status, body = get_json(daemon, "/proofs/900")
    assert (status, body["error"]) == (404, "pruned"), body
    newest = checkpoint_size(daemon)
    status, proof = get_json(daemon, f"/proofs/consistency?from=900&to={newest}")
    assert status == 200, proof
    check_proof(json.dumps(proof), vkey)

    code, report = verify(daemon.config_path)
    assert code == 0 and report["status"] == "verified", report
    assert any("retention" in note for note in report["notes"])
    state = short_tmp / "verify-state.json"  # remembered above the prune point
    code, report = verify(daemon.config_path, "--state", str(state))
    assert code == 0, report
    # A checkpoint from before the prune: only its signature can be checked.
    code, report = verify(daemon.config_path, "--checkpoint", str(old_checkpoint))
    assert code == 0, report

    # More events, another seal past the prune point, a restart: still whole.
    _reconfigure(daemon, max_age="0s")
    last = _fill(daemon, 400, 1000)
    daemon.restart()
    wait_checkpointed(daemon, last)
    code, report = verify(daemon.config_path)
    assert code == 0 and report["verified_events"] >= last - 900, report
    # Incremental from the remembered checkpoint, which is the start here, not the
    # prune point below it (their roots differ: that was once taken for tampering).
    code, report = verify(daemon.config_path, "--state", str(state))
    assert code == 0 and any("incremental" in note for note in report["notes"]), report
    status, proof = get_json(daemon, "/proofs/1200")
    assert status == 200
    check_proof(json.dumps(proof), vkey)

    # A row missing above the prune point is tampering, not retention.
    daemon.stop()
    db = sqlite3.connect(daemon.db_path, isolation_level=None)
    try:
        db.execute("UPDATE meta SET value = 1 WHERE key = 'retention_gate'")
        db.execute("DELETE FROM events WHERE seq = 1300")
        db.execute("UPDATE meta SET value = 0 WHERE key = 'retention_gate'")
    finally:
        db.close()
    code, report = verify(daemon.config_path)
    assert code == 1 and report["problem"]["seq"] == 1300, report


def _send_large(daemon: DaemonProcess, count: int) -> None:
    """Events of ~3 KB that zstd cannot shrink: partitions large beside the WAL's and
    the database's own growth while the test looks."""
    with daemon.connect() as conn:
        for start in range(0, count, 50):
            assert conn.request([{"type": "test.large", "id": f"big-{i}",
                                  "data": {"blob": base64.b64encode(os.urandom(2400)).decode()}}
                                 for i in range(start, min(count, start + 50))])["ok"]
    last = int(daemon.stats()["last_seq"])
    wait_committed(daemon, last)
    wait_sealed_through(daemon, last // PARTITION * PARTITION)
    wait_checkpointed(daemon, last)


def test_retention_by_bytes_drops_the_oldest_until_under(make_daemon: Any) -> None:
    daemon = make_daemon(SETTINGS)
    _send_large(daemon, 1000)
    survey = _vacuum(daemon, "--dry-run")
    disk, parts = survey["disk"], catalogued(daemon)
    assert survey["would_delete"] == [] and disk["partition_files"] == 3
    # Room for all but about one and a half partitions: the two oldest must go.
    per_partition = disk["partitions"] // 3
    limit = disk["total"] - per_partition - per_partition // 2
    _reconfigure(daemon, max_bytes=str(limit))
    wait_for(lambda: len(catalogued(daemon)) == 1, 30, "the two oldest partitions to go")
    assert catalogued(daemon)[0][:2] == parts[-1][:2] == (601, 900)
    after = _vacuum(daemon, "--dry-run")
    assert after["disk"]["total"] <= limit and not after["over_max_bytes_after"], after
    assert min(stored_seqs(daemon)) == 601
    code, report = verify(daemon.config_path)
    assert code == 0, report

    # A limit nothing left may meet: the hot table stays, health says why.
    _reconfigure(daemon, max_bytes="1KB")
    wait_for(lambda: not catalogued(daemon), 30, "every partition to go")
    wait_for(lambda: not get_json(daemon, "/health")[1]["checks"]["retention"]["ok"], 30,
             "health to show retention short of max_bytes")
    assert min(stored_seqs(daemon)) == 901
    send(daemon, 5000, 10)  # ingest goes on
    wait_committed(daemon, int(daemon.stats()["last_seq"]))


def test_archive_then_delete_and_a_failing_archive_stops_deletion(make_daemon: Any,
                                                                  short_tmp: Path) -> None:
    blocked = short_tmp / "not-a-directory"
    blocked.write_text("a file where the archive directory should be\n")
    daemon = make_daemon(_settings(archive_dir=str(blocked)))
    _fill(daemon, 700)
    _reconfigure(daemon, max_age="1ms")
    wait_for(lambda: not get_json(daemon, "/health")[1]["checks"]["retention"]["ok"], 30,
             "health to show the archive fault")
    health = get_json(daemon, "/health")[1]["checks"]["retention"]
    assert "archiving seqs 1-300" in health["detail"], health
    assert len(catalogued(daemon)) == 2  # nothing deleted
    send(daemon, 700, 50)  # ingest goes on
    wait_committed(daemon, int(daemon.stats()["last_seq"]))

    blocked.unlink()
    archive = short_tmp / "archive"
    archive.mkdir()
    _reconfigure(daemon, archive_dir=str(archive))
    wait_for(lambda: not catalogued(daemon), 30, "both partitions archived and dropped")
    wait_for(lambda: get_json(daemon, "/health")[1]["checks"]["retention"]["ok"], 30,
             "health to clear")
    files = sorted(p.name for p in archive.iterdir())
    host = daemon.query("SELECT value FROM meta WHERE key = 'host_id'")[0][0]
    assert files == [f"{host}-000000000001-000000000300.msgpack.zst",
                     f"{host}-000000000301-000000000600.msgpack.zst"]
    for name, (first, last) in zip(files, [(1, 300), (301, 600)], strict=True):
        stream, compressed = open_input(str(archive / name))
        with stream:
            values = msgpack_values(stream)
            manifest = decode(next(values), "msgpack")
            seqs = [record_seq(record) for record in values]
        assert compressed and manifest.complete
        assert (manifest.first_seq, manifest.last_seq, manifest.count) == (first, last, 300)
        assert seqs == list(range(first, last + 1))
    assert min(stored_seqs(daemon)) == 601
    vkey = vkey_text(daemon)
    for name in files:  # each verifies offline: the second through its prune-point prefix
        done = cli(daemon.config_path, "import", str(archive / name), "--check-only",
                   "--vkey", vkey)
        assert done.returncode == 0, done.stderr
        assert "signature checked" in done.stdout and "not checked" not in done.stdout, \
            done.stdout
    assert "deleted by retention" in done.stdout
    export = archive.parent / "after.msgpack.zst"
    done = cli(daemon.config_path, "export", "--format", "msgpack", "-o", str(export))
    assert done.returncode == 0, done.stderr
    done = cli(daemon.config_path, "import", str(export), "--check-only", "--vkey", vkey)
    assert done.returncode == 0 and "seqs 601.." in done.stdout, done
    assert "not checked" not in done.stdout, done.stdout
    code, report = verify(daemon.config_path)
    assert code == 0, report


def test_retention_racing_a_flood_loses_nothing_newer_than_the_cut(make_daemon: Any) -> None:
    """Retention runs every 100 ms, dropping partitions older than 1 s, while a client
    floods: every seq above the final prune point is still stored, in one piece."""
    daemon = make_daemon(_settings(max_age="1s", interval="100ms"))
    sent = 0
    with daemon.connect() as conn:
        while sent < 6000 or not daemon.query("SELECT 1 FROM prune_points LIMIT 1"):
            assert conn.request([{"type": "test.flood", "id": f"fl-{i}"}
                                 for i in range(sent, sent + 100)])["ok"]
            sent += 100
            assert sent < 200_000, "retention never pruned under the flood"
    last = int(daemon.stats()["last_seq"])
    wait_checkpointed(daemon, last)
    pruned = int(daemon.query("SELECT max(size) FROM prune_points")[0][0])
    kept = stored_seqs(daemon)
    assert min(kept) == pruned + 1
    assert set(kept) == set(range(pruned + 1, last + 1)), "a seq above the cut is gone"
    ids = {event_id for event_id in kept.values() if event_id.startswith("fl-")}
    first_kept = min(int(i[3:]) for i in ids)
    assert ids == {f"fl-{i}" for i in range(first_kept, sent)}
    code, report = verify(daemon.config_path)
    assert code == 0, report


def test_a_partition_that_does_not_match_its_leaves_is_not_deleted(make_daemon: Any) -> None:
    """Retention checks what it deletes: a leaf fingerprint rewritten under the oldest
    partition (as an edit of its records would show) stops it, with the seq, in health."""
    daemon = make_daemon(SETTINGS)
    _fill(daemon, 700)
    daemon.stop()
    db = sqlite3.connect(daemon.db_path, isolation_level=None)
    try:
        db.execute("DROP TRIGGER merkle_nodes_no_update")
        (leaves,) = db.execute("SELECT leaves FROM merkle_nodes WHERE height = 8 AND idx = 0"
                               ).fetchone()
        changed = bytes([leaves[40] ^ 0xFF]) + leaves[41:]
        db.execute("UPDATE merkle_nodes SET leaves = ? WHERE height = 8 AND idx = 0",
                   (leaves[:40] + changed,))
    finally:
        db.close()
    daemon.start()
    _reconfigure(daemon, max_age="1ms")
    wait_for(lambda: not get_json(daemon, "/health")[1]["checks"]["retention"]["ok"], 30,
             "health to show the refusal")
    detail = get_json(daemon, "/health")[1]["checks"]["retention"]["detail"]
    assert "does not match its leaves (seq 11" in detail, detail
    assert [c[:2] for c in catalogued(daemon)] == [(1, 300), (301, 600)]  # nothing went
