"""A start longer than the unit's TimeoutStartSec= is extended while it makes progress,
and a start that stops making progress is still killed: the daemon against an emulated
service manager that enforces the start timeout as systemd does."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import DaemonProcess, stored_seqs, wait_committed, write_lock

from auditd.bench.micro import write_journal
from auditd.store.connection import connect_sync
from auditd.store.migrations import migrate

MakeDaemon = Callable[..., DaemonProcess]

# The emulated unit's TimeoutStartSec=. Past the daemon's first words (Python's start
# and imports, a few seconds on a loaded machine), short of the replays below.
UNIT_TIMEOUT_S = 6.0
# Journals whose replay (and the index build after it) outlasts that: the smaller one on
# a loaded machine, the larger on any this project runs on. The test grows to the
# larger one only when a start beat the unit's timeout (it would then prove nothing).
JOURNALS = (300_000, 1_200_000)
REPLAYING = re.compile(r"replaying journal: (\d+) of (\d+) events")
_NEVER_S = 300.0  # the emulation gives up on a daemon that extends forever


@dataclass
class Outcome:
    ready_at: float | None = None  # monotonic time READY=1 arrived
    killed_at: float | None = None  # when the emulated manager killed the start
    exited: int | None = None  # the daemon's exit code when it exited by itself
    messages: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    def values(self, key: str) -> list[tuple[float, str]]:
        return [(at, fields[key]) for at, fields in self.messages if key in fields]


class EmulatedManager:
    """systemd's side of a Type=notify start (systemd.service(5), sd_notify(3)): READY=1
    must come within TimeoutStartSec= of the fork; EXTEND_TIMEOUT_USEC=N moves the
    deadline to N µs after the message arrives, never before the unit's own; at the
    deadline the start has failed and the service is killed."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self.path = str(path)
        self.timeout_s = timeout_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def supervise(self, proc: subprocess.Popen[bytes], forked_at: float) -> Outcome:
        outcome = Outcome()
        deadline = forked_at + self.timeout_s
        while True:
            now = time.monotonic()
            assert now - forked_at < _NEVER_S, f"no READY, no end: {outcome.messages}"
            if now >= deadline:
                proc.kill()
                proc.wait()
                outcome.killed_at = now
                return outcome
            self.sock.settimeout(min(deadline - now, 0.1))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                if proc.poll() is not None:
                    outcome.exited = proc.returncode
                    return outcome
                continue
            arrived = time.monotonic()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines()
                          if "=" in line)
            outcome.messages.append((arrived, fields))
            if "EXTEND_TIMEOUT_USEC" in fields:
                deadline = max(deadline, arrived + int(fields["EXTEND_TIMEOUT_USEC"]) / 1e6)
            if fields.get("READY") == "1":
                outcome.ready_at = arrived
                return outcome

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(short_tmp: Path) -> Iterator[EmulatedManager]:
    emulated = EmulatedManager(short_tmp / "notify.sock", UNIT_TIMEOUT_S)
    yield emulated
    emulated.close()


def start_under(manager: EmulatedManager, daemon: DaemonProcess) -> Outcome:
    daemon.env = {"NOTIFY_SOCKET": manager.path}
    forked_at = time.monotonic()
    daemon.start(wait=False)
    assert daemon.proc is not None
    outcome = manager.supervise(daemon.proc, forked_at)
    outcome.messages.insert(0, (forked_at, {"forked": "1"}))
    return outcome


def replay_statuses(outcome: Outcome) -> list[tuple[int, int]]:
    found = [REPLAYING.search(status) for _, status in outcome.values("STATUS")]
    return [(int(match[1]), int(match[2])) for match in found if match]


def test_a_long_start_is_extended_while_it_progresses(make_daemon: MakeDaemon,
                                                      manager: EmulatedManager) -> None:
    for journaled in JOURNALS:
        daemon = make_daemon(start=False)
        write_journal(daemon.storage, journaled)  # as a crash leaves it: nothing committed
        outcome = start_under(manager, daemon)
        assert outcome.ready_at is not None, (
            f"the emulated manager killed the start (exit {outcome.exited}): "
            f"{outcome.messages}\n{daemon.log_text()[-3000:]}")
        forked_at = outcome.messages[0][0]
        # Without this the test proves nothing: the start must outlast the unit's timeout.
        if outcome.ready_at - forked_at > UNIT_TIMEOUT_S:
            break
        daemon.stop()
    else:
        pytest.fail(f"a replay of {JOURNALS[-1]} events beat a {UNIT_TIMEOUT_S} s timeout")

    extensions = [(at, int(usec)) for at, usec in outcome.values("EXTEND_TIMEOUT_USEC")]
    assert len(extensions) >= 2, outcome.messages
    # Bounded: a few seconds each, so a start that stalls is not given minutes.
    assert all(1_000_000 <= usec <= 60_000_000 for _, usec in extensions), extensions
    assert extensions[0][0] - forked_at < UNIT_TIMEOUT_S  # in time for the unit's timeout
    statuses = [status for _, status in outcome.values("STATUS")]
    assert all(status.startswith("starting: ") for status in statuses[:-1]), statuses
    replaying = replay_statuses(outcome)
    assert replaying, statuses
    assert all(total == journaled and 0 <= done <= total for done, total in replaying)
    dones = [done for done, _ in replaying]
    assert dones == sorted(dones), replaying

    daemon.wait_ready()
    wait_committed(daemon, journaled)  # sealed or hot: every replayed event is stored
    assert sorted(stored_seqs(daemon)) == list(range(1, journaled + 1))


def test_a_start_that_stops_progressing_is_killed(make_daemon: MakeDaemon,
                                                 manager: EmulatedManager) -> None:
    # Held write lock: the writer commits nothing, the replay stops once the buffer is
    # full, and the start makes no more progress.
    daemon = make_daemon({"buffer": {"capacity": 1000}, "writer": {"retry_max_delay": "200ms"}},
                         start=False)
    daemon.storage.mkdir()
    conn = connect_sync(daemon.db_path)
    migrate(conn)
    conn.close()
    write_journal(daemon.storage, 5000)
    with write_lock(daemon):
        outcome = start_under(manager, daemon)

    assert outcome.killed_at is not None and outcome.ready_at is None, (
        f"exit {outcome.exited}: {outcome.messages}\n{daemon.log_text()[-3000:]}")
    extensions = outcome.values("EXTEND_TIMEOUT_USEC")
    assert extensions, f"no extension at all, not even while it progressed: {outcome.messages}"
    last_extension = extensions[-1][0]
    # It went on saying what it did, stuck, and stopped asking for time.
    stuck = [REPLAYING.search(status) for at, status in outcome.values("STATUS")
             if at > last_extension]
    assert stuck and all(match and int(match[1]) < 5000 for match in stuck), \
        outcome.messages
    assert '"daemon_ready"' not in daemon.log_text()

    daemon.env = {}
    daemon.start()  # the lock gone, a start without a manager replays everything
    wait_committed(daemon, 5000)
    assert daemon.query("SELECT count(*) FROM events") == [(5000,)]
