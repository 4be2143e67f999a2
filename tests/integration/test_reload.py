"""SIGHUP reload: safe keys apply at once, a broken file is refused and the old config runs."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import DaemonProcess, UnixHTTPConnection, write_config

MakeDaemon = Callable[..., DaemonProcess]


def _hup_and_wait(daemon: DaemonProcess, event: str) -> dict[str, Any]:
    before = sum(1 for e in daemon.log_events() if e.get("event") == event)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        matches = [e for e in daemon.log_events() if e.get("event") == event]
        if len(matches) > before:
            return matches[-1]
        time.sleep(0.05)
    raise AssertionError(f"no {event} after SIGHUP:\n{daemon.log_text()}")


def test_sighup_applies_a_changed_log_level(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon()
    sections = {**daemon.sections, "log": {"level": "error", "format": "json"},
                "buffer": {"capacity": 128}}
    write_config(daemon.config_path, sections)
    reloaded = _hup_and_wait(daemon, "config_reloaded")
    assert reloaded["applied"] == ["log.level"]
    assert reloaded["needs_restart"] == ["buffer.capacity"]
    with daemon.connect() as conn:
        assert conn.request({"type": "after"})["ok"] == 1
    assert daemon.stop() == 0
    # At level error the info lines of the stop are no longer written.
    events = [e.get("event") for e in daemon.log_events()]
    assert "daemon_ready" in events and "daemon_stopped" not in events


def test_sighup_with_a_broken_file_keeps_the_old_config(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon()
    daemon.config_path.write_text("[buffer]\noverflow = \"sometimes\"\n")
    refused = _hup_and_wait(daemon, "config_reload_refused")
    assert refused["reason"] == (
        "buffer.overflow = 'sometimes': expected one of \"block\", \"reject\"")
    assert refused["level"] == "error"
    with daemon.connect() as conn:  # still serving on the old config
        assert conn.request({"type": "still.here"}) == {"ok": 1, "first": 1, "last": 1}
    daemon.config_path.write_text("this is not toml [")
    refused = _hup_and_wait(daemon, "config_reload_refused")
    assert "not valid TOML" in refused["reason"]
    assert daemon.running


def _refusals(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("event") == "config_reload_refused"]


@pytest.mark.parametrize("kind", ["latin1", "directory", "fifo"])
def test_sighup_with_an_unreadable_file_refuses_and_runs_on(make_daemon: MakeDaemon,
                                                            kind: str) -> None:
    daemon = make_daemon()
    good = daemon.config_path.read_bytes()
    daemon.config_path.unlink()
    if kind == "latin1":
        daemon.config_path.write_bytes(good + b"# caf\xe9\n")
        reason = f"{daemon.config_path}: not UTF-8: byte 0xe9 at offset {len(good) + 5}"
    elif kind == "directory":
        daemon.config_path.mkdir()
        reason = f"{daemon.config_path}: is a directory, not a config file"
    else:
        os.mkfifo(daemon.config_path)  # reading it would wait for a writer forever
        reason = f"{daemon.config_path}: not a regular file (a FIFO, socket or device)"
    refused = _hup_and_wait(daemon, "config_reload_refused")
    assert refused["reason"] == reason
    assert len(_refusals(daemon)) == 1
    assert "Traceback" not in daemon.log_text()
    assert not [e for e in daemon.log_events() if e.get("event") == "task_failed"]
    with daemon.connect() as conn:  # still serving on the old config
        assert conn.request({"type": "still.here"}) == {"ok": 1, "first": 1, "last": 1}
    assert daemon.running
    # Mended, the next SIGHUP reloads.
    if kind == "directory":
        daemon.config_path.rmdir()
    else:
        daemon.config_path.unlink()
    daemon.config_path.write_bytes(good)
    _hup_and_wait(daemon, "config_reloaded")
    assert daemon.stop() == 0


def test_post_reload_with_an_unreadable_file_answers_400_with_the_reason(
        make_daemon: MakeDaemon) -> None:
    daemon = make_daemon({"status": {"admin_uids": [os.geteuid()]}})
    daemon.config_path.write_bytes(b"[log]\nlevel = \"\xff\"\n")
    conn = UnixHTTPConnection(daemon.status_socket)
    try:
        conn.request("POST", "/reload")
        response = conn.getresponse()
        body = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 400, body
    assert body == {"error": "invalid_config", "message":
                    f"{daemon.config_path}: not UTF-8: byte 0xff at offset 15"}
    assert "Traceback" not in daemon.log_text()
    with daemon.connect() as conn2:
        assert conn2.request({"type": "still.here"})["ok"] == 1
    assert daemon.stop() == 0
