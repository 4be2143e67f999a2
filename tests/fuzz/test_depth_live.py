"""The depth rule of protocol.md against a live daemon: deep nesting is `invalid` for
the event that holds it, never a dropped connection, never a lost reply."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import msgspec
from conftest import DaemonProcess, UnixHTTPConnection

from auditd.ingest.framing import encode_frame

encode = msgspec.msgpack.encode
DEEP = 1000


def nested(depth: int, leaf: Any = 1) -> bytes:
    """`depth` arrays, one inside the other, as raw MessagePack (msgspec's own encoder
    would recurse as deep)."""
    return b"\x91" * depth + encode(leaf)


def event_with_data(data: bytes, type_: str = "deep") -> bytes:
    return b"\x82" + encode("type") + encode(type_) + encode("data") + data


def test_deeply_nested_data_is_invalid_and_the_connection_lives(
        daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        conn.send_raw(encode_frame(event_with_data(nested(DEEP))))
        assert conn.recv() == {"ok": 0, "rejected": [
            [0, "invalid", "data: nested deeper than 64 levels"]]}
        assert conn.request({"type": "after"})["ok"] == 1


def test_deep_batch_element_costs_only_itself(daemon: DaemonProcess) -> None:
    batch = (b"\x94" + encode({"type": "a"}) + event_with_data(nested(DEEP))
             + nested(DEEP) + encode({"type": "b"}))
    with daemon.connect() as conn:
        conn.send_raw(encode_frame(batch))
        reply = conn.recv()
        assert reply["ok"] == 2
        assert reply["rejected"] == [
            [1, "invalid", "data: nested deeper than 64 levels"],
            [2, "invalid", "event: expected object, got array"]]
        assert conn.request({"type": "after"})["ok"] == 1


def post(path: str, url: str, raw: bytes) -> tuple[int, dict[str, Any]]:
    conn = UnixHTTPConnection(path)
    try:
        conn.request("POST", url, body=raw, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        status, body = response.status, json.loads(response.read())
    finally:
        conn.close()
    return status, body


def test_status_body_nested_too_deep_is_a_400_naming_it(daemon: DaemonProcess) -> None:
    for url in ("/dlq/drop", "/dlq/retry", "/reload", "/backup", "/recover"):
        for raw in (b"[" * 10_000 + b"]" * 10_000,
                    b'{"ids": ' + b"[" * 65 + b"]" * 65 + b"}"):
            status, body = post(daemon.status_socket, url, raw)
            assert (status, body) == (400, {"error": "bad_request", "message":
                                            "the body is nested deeper than 64 levels"}), url
    # 64 levels are decoded as usual, and brackets inside strings do not count.
    status, body = post(daemon.status_socket, "/dlq/drop",
                        b'{"ids": ' + b"[" * 63 + b"]" * 63 + b', "x": "' + b"[" * 99 + b'"}')
    assert status == 400 and body["message"].startswith("the body does not fit"), body
    assert "Traceback" not in daemon.log_text()


def test_cli_data_json_nested_too_deep_is_a_usage_error(daemon: DaemonProcess) -> None:
    def send(data_json: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "auditd.cli", "send", "deep", "--socket",
             daemon.ingest_socket, "--data-json", data_json],
            capture_output=True, text=True, timeout=60, check=False)

    done = send('{"a": ' + "[" * 30_000 + "]" * 30_000 + "}")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "auditd: --data-json: nested deeper than 64 levels\n"
    done = send('{"a": ' + "[" * 63 + "]" * 63 + "}")  # 64 levels: the most data may nest
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] == 1
