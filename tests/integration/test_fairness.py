"""Fair share per uid against the real daemon: one uid floods, another still gets in.

The flooder is this process (uid 0); the well-behaved writer is a child that drops to
uid 65534 before it connects. The buffer is made the bottleneck the real way: another
connection holds SQLite's write lock, so the writer commits nothing meanwhile.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

import msgspec
import pytest
from conftest import (
    FAST_RETRY,
    DaemonProcess,
    UnixHTTPConnection,
    wait_committed,
    wait_for,
    write_config,
    write_lock,
)
from other_uid import NOBODY, as_root_only, child_env, finish, open_to_everyone, start_as

from auditd.ingest.framing import encode_frame

pytestmark = as_root_only

CAPACITY = 64
BATCH = 8
OPEN = {"ingest": {"socket_mode": "0666"}, "buffer": {"capacity": CAPACITY}}

# One event a frame, each reply read before the next frame: a well-behaved writer.
POLITE = r"""
path, count, prefix = sys.argv[2], int(sys.argv[3]), sys.argv[4]
drop_to(int(sys.argv[1]))
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(30)
sock.connect(path)
print("connected", flush=True)
sys.stdin.readline()
decoder, replies = FrameDecoder(1 << 20), []
for i in range(count):
    event = {"type": "polite", "id": f"{prefix}{i}"}
    sock.sendall(encode_frame(msgspec.msgpack.encode(event)))
    bodies = []
    while not bodies:
        data = sock.recv(65536)
        if not data:
            raise SystemExit(f"the daemon closed the connection after {i} replies")
        bodies = decoder.feed(data)
    replies += [msgspec.msgpack.decode(body) for body in bodies]
print(json.dumps(replies), flush=True)
"""


def post(daemon: DaemonProcess, path: str) -> tuple[int, dict[str, Any]]:
    conn = UnixHTTPConnection(daemon.status_socket)
    try:
        conn.request("POST", path)
        response = conn.getresponse()
        document: dict[str, Any] = json.loads(response.read())
        return response.status, document
    finally:
        conn.close()


def metrics(daemon: DaemonProcess) -> str:
    conn = UnixHTTPConnection(daemon.status_socket)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def by_uid(daemon: DaemonProcess, uid: int) -> dict[str, Any]:
    found: dict[str, Any] = daemon.stats()["fairness"]["by_uid"].get(
        str(uid), {"pending": 0, "held": {}, "refused": {}})
    return found


class Flood(threading.Thread):
    """One connection of uid 0 pipelining `frames` batches; keeps every reply."""

    def __init__(self, daemon: DaemonProcess, name: str, frames: int) -> None:
        super().__init__(daemon=True)
        self.conn = daemon.connect()
        self.conn.sock.settimeout(120)
        self.batches = [[{"type": "flood", "id": f"{name}-{n}-{i}"} for i in range(BATCH)]
                        for n in range(frames)]
        self.replies: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        sender = threading.Thread(target=self._send, daemon=True)
        sender.start()
        try:
            for _ in self.batches:
                self.replies.append(self.conn.recv())
        except BaseException as exc:
            self.error = exc
        sender.join(60)
        self.conn.close()

    def _send(self) -> None:
        self.conn.send_raw(b"".join(encode_frame(msgspec.msgpack.encode(batch))
                                    for batch in self.batches))

    def acknowledged(self) -> dict[str, int]:
        acks: dict[str, int] = {}
        for batch, reply in zip(self.batches, self.replies, strict=True):
            if reply.get("ok"):
                assert reply["ok"] == BATCH, reply
                acks.update({e["id"]: reply["first"] + i for i, e in enumerate(batch)})
        return acks


def polite_writer(daemon: DaemonProcess, count: int, prefix: str) -> subprocess.Popen[str]:
    child = start_as(NOBODY, POLITE, daemon.ingest_socket, str(count), prefix)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "connected", finish(child)
    return child


def go(child: subprocess.Popen[str]) -> list[dict[str, Any]]:
    assert child.stdin is not None
    child.stdin.write("go\n")
    child.stdin.flush()
    replies: list[dict[str, Any]] = json.loads(finish(child))
    return replies


def stored(daemon: DaemonProcess) -> dict[str, tuple[int, int]]:
    return {event_id: (seq, uid) for event_id, seq, uid
            in daemon.query("SELECT id, seq, uid FROM events")}


def test_with_the_buffer_full_of_one_uid_another_still_gets_in_overflow_block(
        make_daemon: Any) -> None:
    daemon = make_daemon({**OPEN, **FAST_RETRY})
    open_to_everyone(daemon.root, [daemon.ingest_socket])
    polite = polite_writer(daemon, 6, "p")  # present (connected) before the flood
    floods = [Flood(daemon, f"f{n}", 100) for n in range(3)]
    with write_lock(daemon):
        for flood in floods:
            flood.start()
        # The flood fills the buffer up to the reserve and is then held back.
        wait_for(lambda: by_uid(daemon, 0)["held"].get("share", 0) > 0, 30,
                 "uid 0 held back for its share")
        before = daemon.stats()
        assert CAPACITY - 16 <= before["pending"] <= CAPACITY - 8 + BATCH, before
        replies = go(polite)  # while the lock is still held and uid 0 is still flooding
        during = daemon.stats()
    # Each polite event was answered with a commit-less buffer: the reserve took them.
    assert [r["ok"] for r in replies] == [1] * 6, replies
    assert during["committed"] == 0
    assert by_uid(daemon, NOBODY)["held"] == {}
    for flood in floods:
        flood.join(120)
        assert not flood.is_alive() and flood.error is None, flood.error
    acks = {f"p{i}": r["first"] for i, r in enumerate(replies)}
    for flood in floods:
        assert len(flood.replies) == 100 and all(r["ok"] == BATCH for r in flood.replies)
        acks.update(flood.acknowledged())
    assert len(acks) == 3 * 100 * BATCH + 6
    wait_committed(daemon, max(acks.values()))
    rows = stored(daemon)
    assert {event_id: seq for event_id, (seq, _) in rows.items()} == acks
    assert {uid for event_id, (_, uid) in rows.items() if event_id.startswith("p")} == {NOBODY}
    held = by_uid(daemon, 0)["held"]
    assert held["share"] >= BATCH, held
    assert daemon.stats()["fairness"]["by_uid"][str(0)]["pending"] == 0


def test_with_the_buffer_full_of_one_uid_another_still_gets_in_overflow_reject(
        make_daemon: Any) -> None:
    daemon = make_daemon({**OPEN, "buffer": {**OPEN["buffer"], "overflow": "reject"},
                          **FAST_RETRY})
    open_to_everyone(daemon.root, [daemon.ingest_socket])
    polite = polite_writer(daemon, 6, "p")
    floods = [Flood(daemon, f"f{n}", 50) for n in range(2)]
    with write_lock(daemon):
        for flood in floods:
            flood.start()
        for flood in floods:
            flood.join(60)
            assert not flood.is_alive() and flood.error is None, flood.error
        replies = go(polite)
    assert [r["ok"] for r in replies] == [1] * 6, replies
    refusals = [r for flood in floods for r in flood.replies if not r.get("ok")]
    assert refusals, "the flood was never refused"
    shares = [r for r in refusals if "fair share" in r["message"]]
    assert shares, refusals[:3]
    assert shares[0]["error"] == "overloaded" and shares[0]["retry_after_ms"] == 100
    assert "uid 0 holds" in shares[0]["message"], shares[0]
    refused = by_uid(daemon, 0)["refused"]
    assert refused["share"] == BATCH * len(shares), refused
    assert refused.get("buffer", 0) == BATCH * (len(refusals) - len(shares)), refused
    assert by_uid(daemon, NOBODY)["refused"] == {}
    acks = {f"p{i}": r["first"] for i, r in enumerate(replies)}
    for flood in floods:
        acks.update(flood.acknowledged())
    wait_committed(daemon, max(acks.values()))
    assert {event_id: seq for event_id, (seq, _) in stored(daemon).items()} == acks
    text = metrics(daemon)
    assert f'auditd_events_refused_total{{reason="share",uid="0"}} {refused["share"]}.0' \
        in text, text
    if shutil.which("promtool") is not None:
        checked = subprocess.run(["promtool", "check", "metrics"], input=text,
                                 capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), (
            checked.stdout + checked.stderr)


RATE = 10
BURST = 40


@pytest.mark.parametrize("overflow", ["reject", "block"])
def test_rate_limit_holds_a_uid_at_its_rate_and_no_other(make_daemon: Any,
                                                         overflow: str) -> None:
    daemon = make_daemon({"ingest": {"socket_mode": "0666",
                                     "rate_limit": f"{RATE}/s burst {BURST}"},
                          "buffer": {"overflow": overflow}})
    open_to_everyone(daemon.root, [daemon.ingest_socket])
    frames = 60 if overflow == "reject" else BURST + 15
    started = time.monotonic()
    with daemon.connect() as conn:  # uid 0: every frame at once, pipelined
        conn.send_raw(b"".join(encode_frame(msgspec.msgpack.encode(
            {"type": "fast", "id": f"r{i}"})) for i in range(frames)))
        replies = [conn.recv() for _ in range(frames)]
    elapsed = time.monotonic() - started
    # Another uid has a bucket of its own: all of its events go in.
    polite = go(polite_writer(daemon, BURST // 2, "p"))
    assert [r["ok"] for r in polite] == [1] * (BURST // 2), polite

    accepted = [r for r in replies if r.get("ok")]
    refused = [r for r in replies if not r.get("ok")]
    figures = by_uid(daemon, 0)
    # At most the burst plus the rate over the time it took: the uid is held at its rate.
    assert len(accepted) <= BURST + RATE * elapsed + 1, (len(accepted), elapsed)
    if overflow == "reject":
        assert refused and len(accepted) >= BURST
        assert refused[0]["error"] == "overloaded", refused[0]
        assert refused[0]["message"] == (f"uid 0 is over ingest.rate_limit ({RATE}/s burst "
                                         f"{BURST}); nothing of the frame was accepted")
        assert 0 < refused[0]["retry_after_ms"] <= 1000 // RATE + 1
        assert figures["refused"] == {"rate_limit": len(refused)}, figures
        assert figures["held"] == {}
    else:  # every frame answered, in order; those past the burst were held first
        assert not refused and [r["first"] for r in replies] == list(range(1, frames + 1))
        assert figures["held"]["rate_limit"] >= frames - BURST - RATE * elapsed - 1, figures
        assert figures["refused"] == {}
    assert by_uid(daemon, NOBODY)["held"] == by_uid(daemon, NOBODY)["refused"] == {}
    acks = {f"r{i}": r["first"] for i, r in enumerate(replies) if r.get("ok")}
    acks.update({f"p{i}": r["first"] for i, r in enumerate(polite)})
    wait_committed(daemon, max(acks.values()))
    assert {event_id: seq for event_id, (seq, _) in stored(daemon).items()} == acks
    assert daemon.stats()["fairness"]["rate_limit"] == f"{RATE}/s burst {BURST}"


def test_a_batch_over_its_share_still_goes_into_an_empty_buffer(make_daemon: Any) -> None:
    daemon = make_daemon(OPEN)
    open_to_everyone(daemon.root, [daemon.ingest_socket])
    polite = polite_writer(daemon, 1, "p")  # present: uid 0's share is half the buffer
    with daemon.connect() as conn:
        batch = [{"type": "big", "id": f"b{i}"} for i in range(CAPACITY - 1)]
        assert conn.request(batch) == {"ok": CAPACITY - 1, "first": 1, "last": CAPACITY - 1}
    assert [r["ok"] for r in go(polite)] == [1]
    assert by_uid(daemon, 0)["held"] == {}


def test_rate_limit_reloads_and_a_bad_value_is_refused_naming_it(make_daemon: Any) -> None:
    daemon = make_daemon({"ingest": {"rate_limit": "1/s burst 1"},
                          "buffer": {"overflow": "reject"}})
    with daemon.connect() as conn:
        assert conn.request({"type": "one"})["ok"] == 1
        assert conn.request({"type": "two"})["error"] == "overloaded"
        daemon.sections["ingest"]["rate_limit"] = "100000/s burst 1000"
        write_config(daemon.config_path, daemon.sections)
        assert post(daemon, "/reload") == (200, {"applied": ["ingest.rate_limit"],
                                                 "needs_restart": []})
        replies = [conn.request({"type": "more"}) for _ in range(200)]
        assert all(r["ok"] == 1 for r in replies), [r for r in replies if not r["ok"]][:1]
        daemon.sections["ingest"]["rate_limit"] = "lots"
        write_config(daemon.config_path, daemon.sections)
        assert post(daemon, "/reload") == (400, {
            "error": "invalid_config", "message": "ingest.rate_limit = 'lots': expected a "
            'rate per uid like "5000/s burst 20000" (a positive rate, a burst >= 1), or "" '
            "for no limit"})
        assert daemon.stats()["fairness"]["rate_limit"] == "100000/s burst 1000"
        daemon.sections["ingest"]["rate_limit"] = ""
        write_config(daemon.config_path, daemon.sections)
        assert post(daemon, "/reload")[1]["applied"] == ["ingest.rate_limit"]
        assert daemon.stats()["fairness"]["rate_limit"] is None


def test_bench_fair_reports_both_uids() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "auditd.cli", "bench", "--fair", "--json", "--duration", "1",
         "--clients", "1", "--rate", "200"], capture_output=True, text=True, timeout=180,
        env=child_env(), check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["fair"]
    polite, flood = report["polite"], report["flood"]
    assert polite["uid"] == NOBODY and flood["uid"] == 0
    assert polite["events_acknowledged"] == polite["events_committed"] > 0
    assert flood["events_acknowledged"] == flood["events_committed"] > 0
    assert polite["frame_errors"] == flood["frame_errors"] == {}
    assert set(polite["latency_ms"]) == {"p50", "p99", "max"}
    assert report["fairness"]["rate_limit"] is None
