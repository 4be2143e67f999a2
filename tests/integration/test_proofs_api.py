"""Proofs through the status socket and the CLI, checked offline: GET /checkpoint,
GET /proofs/{seq}, GET /proofs/consistency, `auditd prove`, `auditd verify-proof`;
every byte-level mutation of a proof fails; a non-reader gets proofs of its own events
only."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from as_other_uid import can_run_as_other_uid, run_as
from conftest import wait_committed, wait_for
from proofs_store import (
    SETTINGS,
    checkpoint_size,
    cli,
    get,
    get_json,
    send,
    vkey_text,
    wait_checkpointed,
)

from auditd.client import Client
from auditd.proofs.notes import parse_vkey, verify_checkpoint
from auditd.proofs.offline import ProofInvalid, check_proof

NOBODY = 65534


def test_checkpoint_and_proofs_served_and_checked_offline(make_daemon: Any,
                                                         short_tmp: Path) -> None:
    daemon = make_daemon(SETTINGS)
    status, body = get_json(daemon, "/checkpoint")
    assert (status, body["error"]) == (404, "no_checkpoint")
    send(daemon, 0, 300)
    wait_checkpointed(daemon, 300)
    old = checkpoint_size(daemon)
    send(daemon, 300, 300)
    wait_checkpointed(daemon, 600)
    vkey = vkey_text(daemon)
    stats = daemon.stats()
    assert stats["checkpoint"]["size"] == 600
    assert stats["checkpoint"]["text"] == get(daemon, "/checkpoint")[1].decode()
    for seq in (1, 2, 255, 256, 257, 300, 511, 512, 513, 599, 600):
        status, proof = get_json(daemon, f"/proofs/{seq}")
        assert status == 200, proof
        assert proof["seq"] == seq and proof["index"] == seq - 1 and proof["size"] == 600
        check_proof(json.dumps(proof), parse_vkey(vkey))
        status, older = get_json(daemon, f"/proofs/{min(seq, old)}?size={old}")
        assert status == 200 and older["size"] == old
        check_proof(json.dumps(older), parse_vkey(vkey))
    status, body = get_json(daemon, "/proofs/5?size=7")
    assert (status, body["error"]) == (404, "no_checkpoint") and "size 7" in body["message"]
    status, body = get_json(daemon, "/proofs/601")
    assert status == 404
    status, body = get_json(daemon, "/proofs/zero")
    assert status == 400 and "seq" in body["message"]
    status, consistency = get_json(daemon, f"/proofs/consistency?from={old}&to=600")
    assert status == 200 and consistency["from"] == old
    check_proof(json.dumps(consistency), parse_vkey(vkey))
    status, body = get_json(daemon, "/proofs/consistency?from=600")
    assert status == 400 and "from and to" in body["message"]
    # The CLI: the same documents, and verify-proof exits 0 / 1.
    done = cli(daemon.config_path, "prove", "257", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == get_json(daemon, "/proofs/257")[1]
    proof_file = short_tmp / "proof.json"
    proof_file.write_text(done.stdout)
    (short_tmp / "vkey").write_text(vkey + "\n")
    ok = cli(daemon.config_path, "verify-proof", str(proof_file), "--vkey",
             str(short_tmp / "vkey"))
    assert ok.returncode == 0 and "proof holds" in ok.stdout, ok.stdout + ok.stderr
    done = cli(daemon.config_path, "prove", "--consistency", str(old), "600")
    proof_file.write_text(done.stdout)
    assert cli(daemon.config_path, "verify-proof", str(proof_file), "--vkey", vkey
               ).returncode == 0
    proof_file.write_text(done.stdout.replace('"to": 600', '"to": 599'))
    bad = cli(daemon.config_path, "verify-proof", str(proof_file), "--vkey", vkey)
    assert bad.returncode == 1 and "FAILED" in bad.stdout


def _flip(text: str, at: int) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[at] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def _mutations(proof: dict[str, Any]) -> list[dict[str, Any]]:
    """Every bit-0 flip of every byte of the record, each path hash and the checkpoint
    signature; the root line; and each number one off."""
    out: list[dict[str, Any]] = []
    record = base64.b64decode(proof["record"])
    for at in range(len(record)):
        out.append({**proof, "record": _flip(proof["record"], at)})
    for i, h in enumerate(proof["path"]):
        for at in range(32):
            out.append({**proof, "path": [*proof["path"][:i], _flip(h, at),
                                          *proof["path"][i + 1:]]})
    out.append({**proof, "path": proof["path"][:-1]})
    out.append({**proof, "path": [*proof["path"], proof["path"][0]]})
    body, _, signature_line = proof["checkpoint"].rstrip("\n").rpartition("\n")
    head, stamp = signature_line.rsplit(" ", 1)
    for at in range(len(base64.b64decode(stamp))):
        out.append({**proof, "checkpoint": f"{body}\n{head} {_flip(stamp, at)}\n"})
    lines = proof["checkpoint"].split("\n")
    out.append({**proof, "checkpoint": "\n".join([*lines[:2], _flip(lines[2], 0), *lines[3:]])})
    for key in ("seq", "index", "size"):
        for delta in (-1, 1):
            out.append({**proof, key: proof[key] + delta})
    return out


def test_every_mutation_of_a_proof_fails(make_daemon: Any) -> None:
    daemon = make_daemon(SETTINGS)
    send(daemon, 0, 700)
    wait_checkpointed(daemon, 700)
    vkey = parse_vkey(vkey_text(daemon))
    proofs = [get_json(daemon, f"/proofs/{seq}")[1] for seq in (1, 300, 700)]
    for proof in proofs:
        check_proof(json.dumps(proof), vkey)
        for mutated in _mutations(proof):
            with pytest.raises(ProofInvalid):
                check_proof(json.dumps(mutated), vkey)


@pytest.mark.skipif(not can_run_as_other_uid(), reason="calling as another uid needs root")
def test_a_non_reader_gets_proofs_of_its_own_events_only(make_daemon: Any) -> None:
    daemon = make_daemon({**SETTINGS, "status": {"socket_mode": "0666"},
                          "ingest": {"socket_mode": "0666"}})
    for folder in (daemon.root.parent, daemon.root):
        os.chmod(folder, 0o755)
    with Client(daemon.ingest_socket) as client:
        client.send_batch([{"type": "root.event"} for _ in range(10)])
    run_as(NOBODY, "import sys\nfrom auditd.client import Client\n"
           "with Client(sys.argv[1]) as c:\n"
           "    c.send_batch([{'type': 'nobody.event'} for _ in range(5)])\n",
           daemon.ingest_socket, imports=["auditd.client"])
    wait_checkpointed(daemon, 15)
    script = r"""
import http.client, json, socket, sys
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sys.argv[1])
out = []
for url in ("/proofs/3", "/proofs/12", "/proofs/consistency?from=15&to=15", "/checkpoint"):
    conn = Conn("auditd", timeout=30)
    conn.request("GET", url)
    response = conn.getresponse()
    out.append([response.status, response.read().decode()])
    conn.close()
print(json.dumps(out))
"""
    answers = json.loads(run_as(NOBODY, script, daemon.status_socket))
    assert answers[0][0] == 403 and "uid 65534" in answers[0][1]
    assert answers[1][0] == 200 and json.loads(answers[1][1])["seq"] == 12
    assert answers[2][0] == 200
    assert answers[3][0] == 200 and answers[3][1].startswith("auditd/")


def test_checkpoints_published_and_issued_at_shutdown(make_daemon: Any,
                                                      short_tmp: Path) -> None:
    """With checkpoint_every an hour, only the clean shutdowns sign: each one's
    checkpoint covers every event committed, and reaches the file and the command."""
    published, piped = short_tmp / "published.txt", short_tmp / "piped.txt"
    daemon = make_daemon({"proofs": {"checkpoint_every": "1h",
                                     "publish_file": str(published),
                                     "publish_command": f"cat >> {piped}"}})
    send(daemon, 0, 50)
    assert daemon.stop() == 0
    assert "\n50\n" in published.read_text() and "\n50\n" in piped.read_text()
    daemon.start()
    send(daemon, 50, 7)
    assert daemon.stop() == 0
    sizes = [size for (size,) in daemon.query("SELECT size FROM checkpoints ORDER BY id")]
    assert sizes == [50, 57]
    (text,) = daemon.query("SELECT text FROM checkpoints ORDER BY id DESC LIMIT 1")[0]
    assert published.read_text().endswith(text) and piped.read_text().endswith(text)
    assert sum(e["event"] == "checkpoint_at_shutdown" for e in daemon.log_events()) == 2
    assert verify_checkpoint(text, parse_vkey(vkey_text(daemon))).size == 57


def test_a_reader_on_an_old_snapshot_delays_the_shutdown_checkpoint_not_skips_it(
        make_daemon: Any) -> None:
    """A reader on an older snapshot keeps the WAL from being copied: the shutdown
    checkpoint waits for it to move on (then signs everything), and when it never does,
    says so in one line; the next start signs what was left."""
    daemon = make_daemon({"proofs": {"checkpoint_every": "1h"}})
    send(daemon, 0, 20)
    for reader_lets_go, signed in ((True, 40), (False, 60)):
        with contextlib.closing(sqlite3.connect(daemon.db_path, isolation_level=None,
                                                check_same_thread=False)) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM events").fetchone()  # a snapshot held
            send(daemon, signed - 20, 20)
            wait_committed(daemon, signed)
            assert daemon.proc is not None
            daemon.proc.terminate()
            if reader_lets_go:  # once the daemon is stopping, not before
                wait_for(lambda: '"daemon_stopping"' in daemon.log_since_start(), 30,
                         "the daemon stopping")
                reader.execute("COMMIT")
            assert daemon.proc.wait(60) == 0
        lines = daemon.log_since_start()
        newest = daemon.query("SELECT max(size) FROM checkpoints")[0][0]
        if reader_lets_go:
            assert newest == signed and '"checkpoint_at_shutdown"' in lines, lines[-2000:]
        else:
            assert newest < signed and '"checkpoint_at_shutdown_skipped"' in lines, lines
        daemon.start()
    daemon.stop()
    assert daemon.query("SELECT max(size) FROM checkpoints")[0][0] == 60
