"""auditd.systemd against real sockets and real child processes, no systemd needed."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from auditd import systemd

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path is often longer.
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="sd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def receiver(short_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd's notify socket, and its address."""
    path = str(short_dir / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path


def child_env() -> dict[str, str]:
    """The environment for a child Python that must import this checkout's auditd."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


# notify


def test_notify_sends_one_datagram_to_a_path(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert systemd.notify("READY=1", "STATUS=up") is True
    assert received(sock) == ["READY=1", "STATUS=up"]


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"auditd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert systemd.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name}) is True
        assert received(sock) == ["WATCHDOG=1"]


@pytest.mark.parametrize("value", [None, "", "relative/path", "vsock:2:1234"])
def test_notify_without_a_usable_socket_does_nothing(value: str | None) -> None:
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    assert systemd.notify("READY=1", env=env) is False
    assert systemd.Notifier(env).enabled is False


def test_notify_failure_returns_false(short_dir: Path) -> None:
    env = {"NOTIFY_SOCKET": str(short_dir / "nobody-listens")}
    assert systemd.Notifier(env).enabled is True
    assert systemd.notify("READY=1", env=env) is False


# watchdog_interval


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval(env) == expected


def test_watchdog_interval_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 0.5


# Notifier


def test_notifier_messages(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = systemd.Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled

    assert notifier.ready("replayed 12 events")
    assert received(sock) == ["READY=1", "STATUS=replayed 12 events"]
    assert notifier.status("two\nlines")
    assert received(sock) == ["STATUS=two lines"]

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, monotonic = received(sock)
    assert reloading == "RELOADING=1"
    key, _, usec = monotonic.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= after

    assert notifier.ready_after_reload()
    assert received(sock) == ["READY=1"]
    assert notifier.extend_timeout(2.5)
    assert received(sock) == ["EXTEND_TIMEOUT_USEC=2500000"]
    assert notifier.watchdog()
    assert received(sock) == ["WATCHDOG=1"]
    assert notifier.stopping("draining")
    assert received(sock) == ["STOPPING=1", "STATUS=draining"]


def test_notifier_keeps_the_address_it_started_with(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = systemd.Notifier()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notifier.watchdog()
    assert received(sock) == ["WATCHDOG=1"]


# listen_fds: the refusals need no fds, so they run in this process on a private env.


@pytest.mark.parametrize(
    "env",
    [
        {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "ingest:status"},
        {"LISTEN_PID": "", "LISTEN_FDS": "2"},
        {"LISTEN_FDS": "2"},
        {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"},
        {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"},
        {"LISTEN_PID": str(os.getpid())},
    ],
)
def test_listen_fds_refuses_what_is_not_for_this_process(env: dict[str, str]) -> None:
    kept = dict(env, OTHER="x")
    assert systemd.listen_fds(unset_env=False, env=kept) == {}
    assert kept == dict(env, OTHER="x")
    assert systemd.listen_fds(env=kept) == {}
    assert kept == {"OTHER": "x"}


# The child moves the sockets it inherited to fds 3, 4 (and a pipe to 5 when asked), sets
# LISTEN_PID to its own pid as systemd does between fork and exec, then serves one
# connection on every socket listen_fds() returned: it echoes "<name>:<bytes>".
CHILD = textwrap.dedent(
    """
    import fcntl, json, os, sys
    from auditd import systemd

    sources = [int(fd) for fd in sys.argv[1].split(",")]
    names, with_pipe = sys.argv[2], sys.argv[3] == "pipe"
    # Park the inherited fds above the target range first, so dup2 cannot clobber one.
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in sources]
    for fd in sources:
        os.close(fd)
    for index, fd in enumerate(parked):
        os.dup2(fd, systemd.LISTEN_FDS_START + index)
        os.close(fd)
    count = len(parked)
    if with_pipe:
        read_end, write_end = os.pipe()
        os.dup2(read_end, systemd.LISTEN_FDS_START + count)
        os.close(read_end)
        os.close(write_end)
        count += 1
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(count))
    if names != "-":
        os.environ["LISTEN_FDNAMES"] = names

    sockets = systemd.listen_fds()
    report = {
        "names": sorted(sockets),
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "inheritable": any(sock.get_inheritable() for sock in sockets.values()),
    }
    for name, sock in sorted(sockets.items()):
        conn, _ = sock.accept()
        with conn:
            conn.sendall(name.encode() + b":" + conn.recv(100))
        sock.close()
    print(json.dumps(report))
    """
)


def serve_in_child(
    paths: list[str], names: str, *, pipe: bool = False
) -> tuple[dict[str, object], dict[str, bytes]]:
    """Run CHILD on listening sockets bound at `paths`; return its report and the replies."""
    listeners = []
    for path in paths:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listeners.append(listener)
        listener.bind(path)
        listener.listen()
    fds = [listener.fileno() for listener in listeners]
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, ",".join(map(str, fds)), names, "pipe" if pipe else ""],
            pass_fds=fds,
            env=child_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
    finally:
        # The child holds its own copies now.
        for listener in listeners:
            listener.close()
    with child:
        try:
            replies = {}
            # Connections wait in the backlog until the child accepts them.
            for path in paths:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                    client.settimeout(10)
                    client.connect(path)
                    client.sendall(b"hello")
                    replies[path] = client.recv(100)
            out, _ = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
    assert child.returncode == 0
    return json.loads(out), replies


def test_listen_fds_maps_names_to_inherited_sockets(short_dir: Path) -> None:
    ingest, status = str(short_dir / "ingest.sock"), str(short_dir / "status.sock")
    report, replies = serve_in_child([ingest, status], "ingest:status")
    assert report == {"names": ["ingest", "status"], "env_left": [], "inheritable": False}
    assert replies == {ingest: b"ingest:hello", status: b"status:hello"}


def test_listen_fds_names_the_unnamed_and_skips_non_sockets(short_dir: Path) -> None:
    first, second = str(short_dir / "a.sock"), str(short_dir / "b.sock")
    report, replies = serve_in_child([first, second], "-", pipe=True)
    assert report["names"] == ["unknown", "unknown.1"]
    assert replies == {first: b"unknown:hello", second: b"unknown.1:hello"}


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate absent"
)
def test_listen_fds_under_systemd_socket_activate(short_dir: Path) -> None:
    """systemd's own implementation of the protocol hands us the sockets it names."""
    ingest, status = str(short_dir / "ingest.sock"), str(short_dir / "status.sock")
    serve = (
        "import json; from auditd import systemd\n"
        "sockets = systemd.listen_fds()\n"
        "for name, sock in sorted(sockets.items()):\n"
        "    conn, _ = sock.accept()\n"
        "    conn.sendall(name.encode() + b':' + conn.recv(100)); conn.close(); sock.close()\n"
    )
    activator = subprocess.Popen(
        [
            "systemd-socket-activate",
            f"--listen={ingest}",
            f"--listen={status}",
            "--fdname=ingest:status",
            f"--setenv=PYTHONPATH={child_env()['PYTHONPATH']}",
            sys.executable,
            "-c",
            serve,
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        replies = {}
        for path in (ingest, status):
            deadline = time.monotonic() + 10
            while True:  # the path appears at bind(), connections succeed after listen()
                try:
                    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    client.settimeout(10)
                    client.connect(path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    client.close()
                    assert time.monotonic() < deadline, f"{path} never accepted"
                    time.sleep(0.01)
            with client:
                client.sendall(b"hi")
                replies[path] = client.recv(100)
        assert replies == {ingest: b"ingest:hi", status: b"status:hi"}
        assert activator.wait(timeout=30) == 0
    finally:
        if activator.poll() is None:
            activator.kill()
            activator.wait()
