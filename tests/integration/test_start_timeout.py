"""A start longer than the unit's TimeoutStartSec= is extended while it makes progress,
and a start that stops making progress is still killed: the daemon against an emulated
service manager that enforces the start timeout as systemd does."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import DaemonProcess, committed_seq, stored_seqs, wait_committed, write_lock

from auditd.bench.micro import write_journal
from auditd.store.connection import connect_sync
from auditd.store.migrations import migrate

MakeDaemon = Callable[..., DaemonProcess]

# The emulated unit's TimeoutStartSec=. Past the daemon's first words (Python's start
# and imports, a few seconds on a loaded machine).
UNIT_TIMEOUT_S = 6.0
# A replay made to outlast that whatever the machine's speed: another process holds the
# database's write lock HOLD_S at a time (inside one extension: EXTEND_FACTOR looks of
# 1 s), letting go only until the daemon commits something, at least HOLDS times and
# until the unit's timeout is past. A replay that raced through unhindered would prove
# nothing; one that is slowed by a busy database is what a real long start looks like.
JOURNALED = 30_000
HOLD_S = 2.0
HOLDS = 3
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


class PulsedWriteLock(threading.Thread):
    """Holds `daemon`'s write lock HOLD_S at a time until `until` (monotonic) has passed
    and HOLDS holds ended with a commit; between holds, only until committed_seq moves
    (so that the journal cannot drain in a gap). `held` is set once the first hold is."""

    def __init__(self, daemon: DaemonProcess, until: float) -> None:
        super().__init__(daemon=True)
        self.target, self.until = daemon, until
        self.held, self.stopping = threading.Event(), threading.Event()
        self.commits_let_through = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                with write_lock(self.target):
                    self.held.set()
                    self.stopping.wait(HOLD_S)
                    before = committed_seq(self.target)
                if self.stopping.is_set() or (
                        self.commits_let_through >= HOLDS and time.monotonic() > self.until):
                    return
                while committed_seq(self.target) == before:
                    if self.stopping.wait(0.002):
                        return
                self.commits_let_through += 1
        except BaseException as exc:  # reported by the test's thread
            self.error = exc
            self.held.set()

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


def migrated_store(daemon: DaemonProcess) -> None:
    """The daemon's database made beforehand, so that another process can lock it."""
    daemon.storage.mkdir()
    conn = connect_sync(daemon.db_path)
    migrate(conn)
    conn.close()


def test_a_long_start_is_extended_while_it_progresses(make_daemon: MakeDaemon,
                                                      manager: EmulatedManager) -> None:
    daemon = make_daemon({"buffer": {"capacity": 1000}, "writer": {"retry_max_delay": "200ms"}},
                         start=False)
    migrated_store(daemon)
    write_journal(daemon.storage, JOURNALED)  # as a crash leaves it: nothing committed
    pulses = PulsedWriteLock(daemon, time.monotonic() + UNIT_TIMEOUT_S + 1)
    pulses.start()
    pulses.held.wait(30)  # before the fork: the replay waits from its first commit
    try:
        outcome = start_under(manager, daemon)
    finally:
        pulses.stop()
    assert pulses.error is None, repr(pulses.error)
    assert outcome.ready_at is not None, (
        f"the emulated manager killed the start (exit {outcome.exited}): "
        f"{outcome.messages}\n{daemon.log_text()[-3000:]}")
    forked_at = outcome.messages[0][0]
    # Without this the test proves nothing: the start must outlast the unit's timeout.
    assert outcome.ready_at - forked_at > UNIT_TIMEOUT_S, (
        f"ready {outcome.ready_at - forked_at:.1f} s after the fork, "
        f"{pulses.commits_let_through} commits let through")

    extensions = [(at, int(usec)) for at, usec in outcome.values("EXTEND_TIMEOUT_USEC")]
    assert len(extensions) >= 2, outcome.messages
    # Bounded: a few seconds each, so a start that stalls is not given minutes.
    assert all(1_000_000 <= usec <= 60_000_000 for _, usec in extensions), extensions
    assert extensions[0][0] - forked_at < UNIT_TIMEOUT_S  # in time for the unit's timeout
    statuses = [status for _, status in outcome.values("STATUS")]
    assert all(status.startswith("starting: ") for status in statuses[:-1]), statuses
    replaying = replay_statuses(outcome)
    assert replaying, statuses
    assert all(total == JOURNALED and 0 <= done <= total for done, total in replaying)
    dones = [done for done, _ in replaying]
    assert dones == sorted(dones), replaying

    daemon.wait_ready()
    wait_committed(daemon, JOURNALED)  # sealed or hot: every replayed event is stored
    assert sorted(stored_seqs(daemon)) == list(range(1, JOURNALED + 1))


def test_a_start_that_stops_progressing_is_killed(make_daemon: MakeDaemon,
                                                 manager: EmulatedManager) -> None:
    # Held write lock: the writer commits nothing, the replay stops once the buffer is
    # full, and the start makes no more progress.
    daemon = make_daemon({"buffer": {"capacity": 1000}, "writer": {"retry_max_delay": "200ms"}},
                         start=False)
    migrated_store(daemon)
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
