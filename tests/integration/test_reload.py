"""SIGHUP reload: safe keys apply at once, a broken file is refused and the old config runs."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from conftest import DaemonProcess, write_config

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
