"""systemd integration: sd_notify, the watchdog interval and socket activation (stdlib only).

Everything here is a no-op outside systemd, so the daemon calls it unconditionally.
The protocol is documented in sd_notify(3) and sd_listen_fds(3); this module follows
the reference implementation in libsystemd where the man pages leave a choice open.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping

__all__ = ["LISTEN_FDS_START", "Notifier", "StartProgress", "extend_start_while_progressing",
           "listen_fds", "notify", "watchdog_interval"]

LISTEN_FDS_START = 3
"""The first fd systemd passes; the rest follow it without gaps."""

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _notify_address(value: str) -> str | None:
    if value.startswith("@"):
        # Abstract namespace: the kernel expects a leading NUL where systemd writes '@'.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # Anything else (e.g. "vsock:CID:PORT" from newer systemd) is not supported here.
    return None


def notify(*lines: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `KEY=VALUE` lines to $NOTIFY_SOCKET as one datagram.

    Returns True when the datagram was sent, False when there is no socket to send to
    or the send failed: a lost notification must never take the daemon down, and
    systemd's own timeouts (start, watchdog) already report the consequence.
    """
    address = _notify_address((os.environ if env is None else env).get("NOTIFY_SOCKET", ""))
    if address is None or not lines:
        return False
    payload = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(payload, address)
    except OSError:
        return False
    return True


def _positive_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value, 10)
    except ValueError:
        return None
    return number if number > 0 else None


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings, or None when systemd expects none from this process.

    Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends, so that one late ping
    does not get the service killed. WATCHDOG_PID, when set, must name this process:
    the variables leak into children, which must not think they are being watched.
    """
    env = os.environ if env is None else env
    usec = _positive_int(env.get("WATCHDOG_USEC"))
    if usec is None:
        return None
    if "WATCHDOG_PID" in env and _positive_int(env["WATCHDOG_PID"]) != os.getpid():
        return None
    return usec / 2 / 1_000_000


def listen_fds(
    unset_env: bool = True, env: MutableMapping[str, str] | None = None
) -> dict[str, socket.socket]:
    """Sockets passed by systemd socket activation, keyed by FileDescriptorName=.

    Only honoured when LISTEN_PID is this process (the variables leak into children).
    A socket without a name is keyed "unknown", as in sd_listen_fds_with_names(3);
    when a name repeats, later sockets get ".<index>" appended (index from 0) so none
    is lost. Fds that are not sockets (ListenFIFO=, ListenSpecial=) are left untouched.
    The sockets are marked close-on-exec so they do not leak into anything we spawn.
    With `unset_env`, the LISTEN_* variables are removed whatever the outcome, as
    sd_listen_fds(unset_environment=1) does.
    """
    env = os.environ if env is None else env
    pid = _positive_int(env.get("LISTEN_PID"))
    count = _positive_int(env.get("LISTEN_FDS"))
    names = env["LISTEN_FDNAMES"].split(":") if "LISTEN_FDNAMES" in env else []
    if unset_env:
        for name in _LISTEN_VARS:
            env.pop(name, None)
    if pid != os.getpid() or count is None:
        return {}

    sockets: dict[str, socket.socket] = {}
    for index in range(count):
        fd = LISTEN_FDS_START + index
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        sock.set_inheritable(False)
        name = (names[index] if index < len(names) else "") or "unknown"
        if name in sockets:
            name = f"{name}.{index}"
        sockets[name] = sock
    return sockets


class Notifier:
    """The daemon's side of Type=notify: readiness, status, reload, stop and watchdog.

    Each method returns what `notify` returned, so callers may ignore it. The socket
    address is read once, at construction, so later changes to the environment (or
    a child clearing it) do not change where notifications go.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = {"NOTIFY_SOCKET": (os.environ if env is None else env).get("NOTIFY_SOCKET", "")}

    @property
    def enabled(self) -> bool:
        """True when a notification socket is configured (we run under systemd)."""
        return _notify_address(self._env["NOTIFY_SOCKET"]) is not None

    def _send(self, *lines: str) -> bool:
        return notify(*lines, env=self._env)

    def ready(self, status: str | None = None) -> bool:
        """Startup finished: systemd starts units ordered after us from now on."""
        return self._send("READY=1", *_status_line(status))

    def status(self, text: str) -> bool:
        """Free-form text shown by `systemctl status`."""
        return self._send(*_status_line(text))

    def reloading(self) -> bool:
        """A reload began; `ready_after_reload` must follow when it ends.

        MONOTONIC_USEC lets systemd (Type=notify-reload, v253+) match this message
        to the reload it asked for and not to an older one.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def ready_after_reload(self, status: str | None = None) -> bool:
        """The reload finished (successfully or not); the service is active again."""
        return self.ready(status)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began: `systemctl status` shows "deactivating" meanwhile."""
        return self._send("STOPPING=1", *_status_line(status))

    def extend_timeout(self, seconds: float, status: str | None = None) -> bool:
        """Ask for `seconds` more before the start/stop timeout fires (long replay, drain).

        systemd counts them from when it receives the message, and never cuts the
        unit's own TimeoutStartSec= short: the extension matters only past it.
        """
        return self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}",
                          *_status_line(status))

    def watchdog(self) -> bool:
        """Still alive: call every `watchdog_interval()` seconds from the event loop."""
        return self._send("WATCHDOG=1")


def _status_line(text: str | None) -> tuple[str, ...]:
    # A newline would start a new KEY=VALUE assignment inside the datagram.
    return () if text is None else ("STATUS=" + " ".join(text.splitlines()),)


class StartProgress:
    """What start-up is doing now, and a counter that moves while it makes progress.

    `tick` may be called from any thread (the database check and the id scan run in
    threads, as SQLite progress handlers: it returns None, so SQLite carries on); a
    lost increment between threads only delays the next extension by one look.
    """

    __slots__ = ("_detail", "phase", "ticks")

    def __init__(self) -> None:
        self.phase = "starting"
        self.ticks = 0
        self._detail: Callable[[], str] | None = None

    def begin(self, phase: str, detail: Callable[[], str] | None = None) -> None:
        """A new phase; `detail`, when given, describes it with its figures."""
        self.phase, self._detail = phase, detail
        self.ticks += 1

    def describe(self) -> str:
        return self.phase if self._detail is None else self._detail()

    def tick(self) -> None:
        self.ticks += 1


EXTEND_FACTOR = 10
"""Each extension covers this many looks: a few late looks, or a writer backing off
(5 s at most by default), never get the start killed, while a start that stopped moving
is killed within EXTEND_FACTOR looks."""


async def extend_start_while_progressing(notifier: Notifier, progress: Callable[[], int],
                                         status: Callable[[], str], every_s: float) -> None:
    """Until cancelled: every `every_s`, say what start-up is doing (STATUS=) and, when
    `progress()` moved since the last look, ask for EXTEND_FACTOR * `every_s` more
    (EXTEND_TIMEOUT_USEC=). No extension is sent while `progress()` stands still, so a
    stuck start still meets systemd's timeout. The first look always extends: the start
    has just begun. `progress()` must not decrease (a sum of counters will do).
    """
    last: int | None = None
    while True:
        now = progress()
        if now != last:
            notifier.extend_timeout(EXTEND_FACTOR * every_s, status())
            last = now
        else:
            notifier.status(status())
        await asyncio.sleep(every_s)
