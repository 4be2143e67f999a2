"""The status API's query strings and JSON bodies, against a live daemon.

Property: every request is answered, never with a 500, errors as JSON
{"error", "message"}; the daemon's log holds no traceback afterwards.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fuzz_settings
import pytest
from conftest import DaemonProcess, UnixHTTPConnection
from hypothesis import given, settings
from hypothesis import strategies as st

ADMIN = ["/dlq/retry", "/dlq/drop", "/reload", "/backup", "/recover", "/projections/rebuild",
         "/checkpoint", "/import/origins"]
READ = ["/health", "/stats", "/metrics", "/dlq", "/counts", "/actors/ok", "/actors/%00",
        "/projections", "/import/origins"]


@pytest.fixture(scope="module")
def live() -> Iterator[DaemonProcess]:
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="adfs"))
    daemon = DaemonProcess(root)
    try:
        daemon.start()
        with daemon.connect() as conn:  # something in the dead-letter store to act on
            assert conn.request([{"type": "t", "actor": 5}, {"type": "ok"}])["ok"] == 1
        yield daemon
    finally:
        daemon.stop()
        log = daemon.log_text()
        shutil.rmtree(root, ignore_errors=True)
    assert "Traceback" not in log, log[-3000:]
    assert "status_request_failed" not in log and "status_handler_failed" not in log


def request(daemon: DaemonProcess, method: str, url: str,
            body: bytes | None = None) -> tuple[int, bytes, str]:
    conn = UnixHTTPConnection(daemon.status_socket)
    try:
        conn.putrequest(method, url, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body or b"")
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("Content-Type", "")
    finally:
        conn.close()


def check(status: int, data: bytes, content_type: str) -> None:
    assert status < 500, (status, data[:500])
    if status == 400 and content_type.startswith("text/plain"):
        return  # refused by aiohttp's HTTP parser (a request line over 8 KB), before routing
    if status >= 400:
        assert content_type.startswith("application/json"), (status, data[:200])
        document = json.loads(data)
        assert set(document) == {"error", "message"} and document["message"], document


query_text = st.one_of(st.text(max_size=30), st.sampled_from([
    "0", "-1", "1000", "1001", "9" * 5000, "1e3", " 5", "0x10", "\uff11\uff12", "%ZZ", "%ff",
    "null", "type", "actor", "uid", "comm", "target", "1h", "1d", "1m", "7d",
    "2026-12-02T10:00:00Z", "-99999999999999999999"]))
queries = st.lists(st.tuples(st.sampled_from(["limit", "after", "x", "", "limit[]", "by",
                                              "interval", "since", "until", "uid", "type"])
                             | st.text(max_size=8), query_text), max_size=4)


@settings(max_examples=fuzz_settings.examples(150))
@given(path=st.sampled_from(READ) | st.text(alphabet="/abcdlq%.", max_size=12).map(
    lambda p: "/" + p), query=queries, method=st.sampled_from(["GET", "GET", "HEAD", "PUT"]))
def test_reads_with_any_query(live: DaemonProcess, path: str, query: list[tuple[str, str]],
                              method: str) -> None:
    encoded = "&".join(f"{urllib.parse.quote(k)}={urllib.parse.quote(v)}" for k, v in query)
    raw = "&".join(f"{k}={v}" for k, v in query)  # unencoded: % signs as they come
    for url in (f"{urllib.parse.quote(path)}?{encoded}",
                f"{urllib.parse.quote(path)}?{urllib.parse.quote(raw, safe='=&%')}"):
        status, data, content_type = request(live, method, url)
        if method != "HEAD":
            check(status, data, content_type)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["ids", "all", "dest", "path", "x", "name"]) | st.text(max_size=5),
        inner,
        max_size=4), max_leaves=12)


def confined(value: Any, root: str) -> Any:
    """Any path a body names, moved under the test's own directory: the daemon runs as
    root here, and a backup may be written wherever `dest` says."""
    if isinstance(value, dict):
        return {k: (f"{root}/{abs(hash(str(v))) % 1000}.db" if k in ("dest", "path")
                    else confined(v, root)) for k, v in value.items()}
    if isinstance(value, list):
        return [confined(item, root) for item in value]
    return value


bodies = st.one_of(
    json_values.map(json.dumps).map(str.encode),
    st.binary(max_size=100),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(60, 70).map(lambda n: b'{"ids": ' + b"[" * n + b"]" * n + b"}"),
    st.sampled_from([b'{"ids": [1, 2]}', b'{"all": true}', b'{"ids": []}', b"{}", b"",
                     b'{"ids": [1e400]}', b'{"ids": [99999999999999999999999]}',
                     b'{"dest": "relative.db"}', b'{"path": "relative.db"}', b"\xff\xfe",
                     b'{"ids": [1], "all": true}', b'{"all": "yes"}',
                     b'{"name": "counts_by_type"}', b'{"name": "nope"}', b'{"name": 5}']))


@settings(max_examples=fuzz_settings.examples(150))
@given(path=st.sampled_from(ADMIN), body=bodies)
def test_admin_bodies(live: DaemonProcess, path: str, body: bytes) -> None:
    root = str(live.root / "confined")
    try:
        body = json.dumps(confined(json.loads(body), root)).encode()
    except ValueError:
        pass  # not JSON (or too deep for json.loads): sent as it is
    except RecursionError:
        pass
    status, data, content_type = request(live, "POST", path, body)
    check(status, data, content_type)
