"""The shared daemon fixture itself: a start waits for that start's ready mark, however
early the daemon writes it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from conftest import DaemonProcess

# Stands in for `auditd run`: says it is ready at once, then runs until signalled.
FAKE_DAEMON = """
import signal, sys
print('{"event": "daemon_ready"}', flush=True)
signal.sigwait({signal.SIGTERM})
"""


class EarlyReadyDaemon(DaemonProcess):
    """A daemon whose ready line lands before the test process looks at the log again,
    as when the test is descheduled just after Popen on a loaded machine: the first
    look at the log after the process exists waits for that line."""

    looked_after_start = True
    logged_before = 0

    def command(self) -> list[str]:  # called by start() just before Popen
        self.logged_before = len(super().log_text())
        self.looked_after_start = False
        return [sys.executable, "-c", FAKE_DAEMON]

    def log_text(self) -> str:
        if self.proc is not None and not self.looked_after_start:
            self.looked_after_start = True
            deadline = time.monotonic() + 30
            while '"daemon_ready"' not in super().log_text()[self.logged_before:]:
                assert time.monotonic() < deadline, "the fake daemon never wrote its line"
                time.sleep(0.01)
        return super().log_text()


def test_a_ready_mark_written_before_the_fixture_looks_counts(short_tmp: Path) -> None:
    daemon = EarlyReadyDaemon(short_tmp)
    try:
        daemon.start(timeout=5)  # before the fix: waited for a second mark and failed
        assert daemon.running
        daemon.stop()
        daemon.start(timeout=5)  # a restart waits for its own mark, not the first one
        assert daemon.log_text().count('"daemon_ready"') == 2
    finally:
        daemon.stop()
