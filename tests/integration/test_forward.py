"""Forwarding to a real nats-server (one node): every seq once with the headers of
proofs.md, checkpoints after the events they cover, a SIGKILL mid-window resends
without a duplicate in the stream, a stream that would lose data is refused naming the
setting, and a server that is absent or refuses the credentials is a clear log line
and health entry while ingestion goes on."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import DaemonProcess, UnixHTTPConnection, stored_seqs_in, wait_committed, wait_for
from forward_helpers import (
    add_stream,
    forward_config,
    forward_figures,
    health,
    nats_one,
    stream_count,
    stream_messages,
    tls_files,
    wait_forwarded,
)
from proofs_store import cli, send, wait_checkpointed
from test_metrics import get, promtool

from auditd.bench.nats_servers import NatsCluster, free_port
from auditd.proofs.records import RecordSource

__all__ = ["nats_one"]  # the fixture, imported
MakeDaemon = Callable[..., DaemonProcess]


def local_records(daemon_db: str, partitions: str, last: int) -> dict[int, bytes]:
    db = sqlite3.connect(f"file:{daemon_db}?mode=ro", uri=True, isolation_level=None)
    db.execute("BEGIN")
    source = RecordSource(db, Path(partitions))
    try:
        return dict(source.records(1, last))
    finally:
        source.close()
        db.close()


def test_every_seq_once_with_its_headers_then_its_checkpoint(
        make_daemon: MakeDaemon, nats_one: NatsCluster) -> None:
    daemon = make_daemon(forward_config(nats_one.urls, max_in_flight=64, batch=50))
    send(daemon, 0, 1200)
    wait_checkpointed(daemon, 1200)
    figures = wait_forwarded(daemon, 1200)
    wait_for(lambda: forward_figures(daemon)["checkpoint_cursor"] >= 1200, 30,
             "the checkpoint of 1200 forwarded")
    messages = stream_messages(nats_one.urls[0])
    events = [m for m in messages if "Auditd-Seq" in m[1]]
    assert [int(h["Auditd-Seq"]) for _, h, _ in events] == list(range(1, 1201))
    records = local_records(str(daemon.db_path), str(daemon.storage / "partitions"), 1200)

    host = daemon.query("SELECT value FROM meta WHERE key = 'host_id'")[0][0]
    epoch = daemon.query("SELECT value FROM meta WHERE key = 'store_epoch'")[0][0]
    ids = stored_seqs_in(daemon.db_path)
    for subject, headers, body in events:
        seq = int(headers["Auditd-Seq"])
        assert body == records[seq]  # the record E, byte for byte
        assert headers["Nats-Msg-Id"] == f"{host}:{epoch}:{seq}"
        assert headers["Auditd-Id"] == ids[seq]
        assert base64.b64decode(headers["Auditd-Leaf"]) == hashlib.sha256(b"\0" + body).digest()
        assert subject == f"audit.{host}.test_proof"
    checkpoints = [m for m in messages if m[0].endswith("._checkpoint")]
    assert checkpoints, "no checkpoint was forwarded"
    # A checkpoint follows the events it covers in the stream.
    position = {int(h["Auditd-Seq"]): i for i, (_, h, _) in enumerate(messages)
                if "Auditd-Seq" in h}
    for _, headers, body in checkpoints:
        size = int(headers["Auditd-Checkpoint-Size"])
        assert body.decode().split("\n")[1] == str(size)
        index = messages.index(next(m for m in checkpoints if m[1] is headers))
        assert position[size] < index
    assert figures["published"] >= 1200 and figures["connected"]
    # Health names the single replica as a warning; figures everywhere an operator looks.
    check = health(daemon)["checks"]["forwarding"]
    assert check["ok"] and "1 replica" in check["detail"], check
    done = cli(daemon.config_path, "forward", "status")
    assert done.returncode == 0 and "cursor 1200" in done.stdout, done
    status = cli(daemon.config_path, "status")
    assert "forwarding:   connected" in status.stdout, status.stdout
    replay = cli(daemon.config_path, "forward", "replay", "--json")
    assert replay.stdout, replay.stderr
    report = json.loads(replay.stdout)
    assert replay.returncode == 0 and report["complete"], replay
    assert report["events"] == 1200 and report["compared_with_store"] == 1200
    text = get(UnixHTTPConnection(daemon.status_socket), "/metrics")[2]
    assert "auditd_forward_cursor_seq 1200.0" in text, text
    checked = subprocess.run([promtool(), "check", "metrics"], input=text,
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), (
        checked.stdout + checked.stderr)


def test_sigkill_mid_window_resends_from_the_cursor_without_a_duplicate(
        make_daemon: MakeDaemon, nats_one: NatsCluster) -> None:
    daemon = make_daemon(forward_config(nats_one.urls, max_in_flight=256, batch=64))
    # A round sends 10,000 events and SIGKILLs the daemon when /stats shows a window in
    # flight (or, missing one, when the round is forwarded): at least 3 rounds, more
    # (up to 8) until a kill fell inside a window. A first reading after the cursor
    # moved was sometimes between two windows in all 3 rounds of a loaded run.
    per_round, sent, mid_window = 10_000, 0, 0
    while sent < 3 * per_round or (not mid_window and sent < 8 * per_round):
        send(daemon, sent, per_round, batch=1000)
        sent += per_round

        def in_window_or_done(total: int = sent) -> tuple[bool, dict[str, Any]] | None:
            figures = forward_figures(daemon)
            if figures["in_flight"] > 0 and figures["lag_events"] > 0:
                return True, figures
            return (False, figures) if figures["cursor"] >= total else None

        in_window, _ = wait_for(in_window_or_done, 60, "a window in flight, or the round forwarded")
        mid_window += in_window
        daemon.kill()
        daemon.start()
    assert mid_window, "no SIGKILL fell inside a window: the test proved nothing"
    wait_committed(daemon, sent)
    wait_forwarded(daemon, sent)
    # The consumer side's read-back: each seq once, in order, gap-free, bodies intact.
    replay = cli(daemon.config_path, "forward", "replay", "--json")
    assert replay.stdout, replay.stderr
    report = json.loads(replay.stdout)
    assert replay.returncode == 0, replay
    assert (report["events"], report["gaps"], report["repeats"], report["mismatches"]) == (
        sent, [], [], []), report
    # And the stream holds nothing else: its message count is those events and the
    # checkpoints.
    assert stream_count(nats_one.urls[0]) == sent + report["checkpoints"]


def failure_kinds(daemon: DaemonProcess) -> list[str]:
    """The kinds of the forwarding failures logged, a line each."""
    events = ('"forward_connection_error"', '"forward_backing_off"')
    return [json.loads(line)["kind"] for line in daemon.log_text().splitlines()
            if any(event in line for event in events)]


def test_a_stream_that_would_lose_data_is_refused_naming_each_setting(
        make_daemon: MakeDaemon, nats_one: NatsCluster) -> None:
    add_stream(nats_one.urls[0], name="AUDIT", subjects=["audit.>"], discard="old",
               duplicate_window=120)
    daemon = make_daemon(forward_config(nats_one.urls, create_stream=False))

    def refused() -> str | None:
        check = health(daemon)["checks"].get("forwarding", {})
        return None if check.get("ok", True) else check["detail"]

    detail = wait_for(refused, 30, "the stream refused")
    for setting in ("deny_delete", "deny_purge", "discard is old", "duplicate_window"):
        assert setting in detail, detail
    send(daemon, 0, 10)  # ingestion is not affected
    wait_committed(daemon, 10)
    assert forward_figures(daemon)["cursor"] == 0
    assert daemon.log_text().count("forward_refused") == 1  # once, not once per retry


def test_an_absent_server_and_refused_credentials_are_named_and_ingest_goes_on(
        make_daemon: MakeDaemon, short_tmp: Path) -> None:
    absent = make_daemon(forward_config([f"nats://127.0.0.1:{free_port()}"]))
    secured = NatsCluster(short_tmp / "auth", extra='authorization { user: "audit", '
                          'password: "right" }').start()
    try:
        wrong = make_daemon(forward_config(secured.urls, user="audit", password="wrong"))
        for daemon, kind in ((absent, "connect"), (wrong, "auth")):
            send(daemon, 0, 20)
            wait_committed(daemon, 20)

            def named(daemon: DaemonProcess = daemon, kind: str = kind) -> Any:
                figures = forward_figures(daemon)
                return figures if figures["errors"].get(kind) else None

            figures = wait_for(named, 30, f"a {kind} error counted")
            assert figures["cursor"] == 0 and not figures["connected"]
            check = health(daemon)["checks"]["forwarding"]
            assert not check["ok"] and check["severity"] == "degraded", check
            assert kind in failure_kinds(daemon), daemon.log_text()[-2000:]
        right = make_daemon(forward_config(secured.urls, user="audit", password="right"))
        send(right, 0, 20)
        wait_forwarded(right, 20)
    finally:
        secured.stop()


def test_retention_keeps_every_unforwarded_event_and_health_says_why(
        make_daemon: MakeDaemon, short_tmp: Path) -> None:
    later = NatsCluster(short_tmp / "later")  # its port chosen, not yet listening
    daemon = make_daemon({**forward_config(later.urls, backoff_max="200ms"),
                          "storage": {"partition_events": 100},
                          "buffer": {"overflow": "reject"},  # a refusal is answered
                          "retention": {"max_age": "0s", "max_bytes": "1KB",
                                        "interval": "200ms"}})
    send(daemon, 0, 600)
    wait_committed(daemon, 600)

    def blocked() -> str | None:
        checks = health(daemon)["checks"]
        check = checks["forwarding"]
        refusing = not checks["ingest_accepting"]["ok"]
        return check["detail"] if refusing and check.get("severity") == "failing" \
            and not check["ok"] else None

    detail = wait_for(blocked, 60, "health failing: retention waits for forwarding")
    assert "waits for forwarding (forwarded through 0)" in detail, detail
    with daemon.connect() as conn:  # ingest refuses rather than delete unforwarded events
        reply = conn.request({"type": "test.refused", "id": "refused-1"})
    assert not reply["ok"] and "forwarding" in str(reply), reply
    assert daemon.query("SELECT count(*) FROM prune_points")[0][0] == 0
    later.start()
    try:
        wait_forwarded(daemon, 600)
        wait_for(lambda: daemon.query("SELECT max(size) FROM prune_points")[0][0], 60,
                 "retention deleting once forwarded")
        wait_for(lambda: all(health(daemon)["checks"][name]["ok"]
                             for name in ("forwarding", "ingest_accepting")), 60,
                 "forwarding and ingest whole again")
        with daemon.connect() as conn:
            assert conn.request({"type": "test.accepted", "id": "after-1"})["ok"]
        pruned = daemon.query("SELECT max(size) FROM prune_points")[0][0]
        cursor = daemon.query("SELECT seq FROM forward_cursor")[0][0]
        assert 0 < pruned <= cursor
        seqs = [int(h["Auditd-Seq"]) for _, h, _ in stream_messages(later.urls[0])
                if "Auditd-Seq" in h]
        assert seqs[:600] == list(range(1, 601))  # nothing was deleted before it went
    finally:
        later.stop()


def test_bench_forward_reports_forwarded_rate_and_the_ingest_ratio(short_tmp: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "auditd.cli", "bench", "--forward",
                           "--events", "3000", "--clients", "1", "--runs", "1", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=short_tmp)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)["forward"]
    assert doc["forwarded_per_s_median"] > 0 and doc["ingest_ratio_on_off"] > 0, doc
    (drain,) = doc["drain"]
    # Its servers were down while it took the flood: connect errors, and only those.
    assert set(drain["errors"]) <= {"connect"} and drain["drain_seconds"] >= 0, drain
    (run,) = doc["on"]
    assert run["errors"] == {} and run["peak_lag_events"] >= 0, run
    assert run["nats_server_cores"] > 0, run  # the server did work, and it was measured


def test_bench_forward_outage_reports_latency_and_the_drain(short_tmp: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "auditd.cli", "bench", "--forward",
                           "--forward-outage", "1", "--duration", "4", "--rate", "1000",
                           "--json"], capture_output=True, text=True, timeout=300,
                          cwd=short_tmp)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)["forward"]
    assert doc["events_committed"] == 4000, doc
    assert doc["reply_latency_ms"]["p99"] > 0 and doc["p99_ratio_outage_to_off"] > 0, doc
    # The server's death was felt (a failed reconnect, or under load only the reconnect
    # itself: the server can be back by the first attempt), and the lag drained after.
    assert doc["forward"]["errors"].get("connect") or doc["forward"]["reconnects"], doc
    assert doc["drained_s_after_server_back"] is not None, doc
    assert doc["forward"]["cursor"] == 4000 and doc["forward"]["lag_events"] == 0, doc


def worker_pids(daemon: DaemonProcess) -> list[int]:
    return [e["pid"] for e in daemon.log_events() if e.get("event") ==
            "forward_worker_started"]


def running(pid: int) -> bool:
    """Not gone and not a zombie (an orphan's reaper may be slow to reap it)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return "\nState:\tZ" not in status.read()
    except FileNotFoundError:
        return False


def test_a_sigkilled_daemon_leaves_no_forwarding_process(make_daemon: MakeDaemon,
                                                         nats_one: NatsCluster) -> None:
    # Forwarding when its daemon died, the worker outlived it, dialling its server on,
    # before PR_SET_PDEATHSIG: end of input alone did not end it.
    daemon = make_daemon(forward_config(nats_one.urls, max_in_flight=256, batch=64))
    send(daemon, 0, 10_000, batch=1000)
    wait_for(lambda: forward_figures(daemon)["cursor"] > 0, 60, "forwarding under way")
    (pid,) = worker_pids(daemon)
    daemon.kill()
    wait_for(lambda: not running(pid), 30, f"forwarding process {pid} gone with the daemon")


def test_a_killed_forwarding_process_is_restarted_and_resends_from_the_cursor(
        make_daemon: MakeDaemon, nats_one: NatsCluster) -> None:
    daemon = make_daemon(forward_config(nats_one.urls))
    send(daemon, 0, 500)
    wait_forwarded(daemon, 500)
    (first,) = worker_pids(daemon)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(worker_pids(daemon)) == 2, 30, "the forwarding process started again")
    exited = [e for e in daemon.log_events() if e.get("event") == "forward_worker_exited"]
    assert exited and exited[0]["code"] == -signal.SIGKILL, exited
    send(daemon, 500, 500)  # ingestion never noticed
    wait_forwarded(daemon, 1000)
    seqs = [int(h["Auditd-Seq"]) for _, h, _ in stream_messages(nats_one.urls[0])
            if "Auditd-Seq" in h]
    assert seqs == list(range(1, 1001))


def test_a_record_past_the_servers_max_payload_stops_forwarding_there_naming_it(
        make_daemon: MakeDaemon, short_tmp: Path) -> None:
    small = NatsCluster(short_tmp / "small", extra="max_payload: 2048").start()
    try:
        daemon = make_daemon(forward_config(small.urls))
        send(daemon, 0, 5)
        with daemon.connect() as conn:
            big = {"type": "test.big", "id": "big", "data": {"blob": "x" * 4000}}
            assert conn.request([big])["ok"]
        send(daemon, 5, 5)
        wait_committed(daemon, 11)

        def stuck() -> str | None:
            check = health(daemon)["checks"].get("forwarding", {})
            return None if check.get("ok", True) else check["detail"]

        detail = wait_for(stuck, 30, "forwarding stopped at the big record")
        assert "seq 6 is " in detail and "max_payload of 2048" in detail, detail
        figures = forward_figures(daemon)
        assert figures["cursor"] == 5 and figures["errors"].get("server"), figures
        assert stream_count(small.urls[0]) == 5
    finally:
        small.stop()


def test_a_tls_mismatch_is_named_and_ingest_goes_on(make_daemon: MakeDaemon,
                                                   short_tmp: Path) -> None:
    ca, cert, key = tls_files(short_tmp / "tls")
    secured = NatsCluster(short_tmp / "tls-nats", extra=f'tls {{ cert_file: "{cert}", '
                          f'key_file: "{key}" }}').start()
    try:
        # No CA configured: the server's certificate is not one the system trusts.
        untrusting = make_daemon(forward_config(secured.urls))
        send(untrusting, 0, 20)
        wait_committed(untrusting, 20)

        def named() -> Any:
            figures = forward_figures(untrusting)
            return figures if figures["errors"].get("tls") else None

        figures = wait_for(named, 30, "a tls error counted")
        assert figures["cursor"] == 0 and not figures["connected"], figures
        check = health(untrusting)["checks"]["forwarding"]
        assert not check["ok"] and "certificate verify failed" in check["detail"], check
        # One log line for it, however often nats-py retries.
        assert failure_kinds(untrusting) == ["tls"], untrusting.log_text()[-2000:]
        assert "certificate verify failed" in untrusting.log_text()
        trusting = make_daemon(forward_config(secured.urls, tls_ca=str(ca)))
        send(trusting, 0, 20)
        wait_forwarded(trusting, 20)
    finally:
        secured.stop()
