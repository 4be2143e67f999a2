"""The `auditd` command line end to end: the real entry point (`python -m auditd.cli`)
against a real daemon subprocess, asserting output and exit codes (0 ok, 1 operational
failure with one line on stderr, 2 usage error).

Foreign answers on the status socket (an HTML error page, a closed connection, the
ingest protocol) come from real servers on real sockets, as an operator pointing
`--status-socket` at the wrong thing would meet them.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import socket
import socketserver
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from as_other_uid import child_env
from conftest import DaemonProcess, wait_for

from auditd.cli import operator
from auditd.cli.main import build_parser, main

MakeDaemon = Callable[..., DaemonProcess]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auditd.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False, cwd=cwd)


def assert_one_line_failure(done: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert done.returncode == code, done
    assert done.stderr.startswith("auditd"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr.strip()


def on(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """`auditd COMMAND ... --config F`, the config after the subcommand."""
    return cli(*args, "--config", str(daemon.config_path))


def dead_letters(daemon: DaemonProcess) -> list[tuple[int, str]]:
    return [(int(r[0]), str(r[1])) for r in daemon.query(
        "SELECT dlq_id, code FROM dead_letters ORDER BY dlq_id")]


# -- the parser: help on everything, --version, --config on either side -------------------

def walk(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, Any]]:
    """(command, action) for every option and positional, subcommands included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from walk(child, f"{path} {name}".strip())
        else:
            yield path, action


def test_every_option_and_positional_has_a_help_line() -> None:
    actions = list(walk(build_parser()))
    commands = {command for command, _ in actions}
    assert commands == {"", "run", "send", "status", "dlq", "backup", "recover", "migrate",
                        "bench", "projections", "query", "tail", "verify", "prove",
                        "verify-proof", "keygen", "export-vkey", "export", "import",
                        "vacuum", "restore", "forward"}
    missing = [f"auditd {command} {'/'.join(action.option_strings) or action.dest}"
               for command, action in actions
               if not action.help or action.help == argparse.SUPPRESS]
    assert missing == []
    for command in commands - {""}:  # --config after every subcommand, and said so
        config = [a for c, a in actions if c == command and "--config" in a.option_strings]
        assert len(config) == 1 and "wins" in config[0].help, command


def test_help_of_every_subcommand_prints_and_exits_0(
        capsys: pytest.CaptureFixture[str]) -> None:
    """In this process, through the entry point's main(): one interpreter start each
    would add nothing the tests below do not already cover."""
    helps = {}
    for command in ("run", "send", "status", "dlq", "backup", "recover", "migrate", "bench",
                    "projections", "query"):
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        assert exited.value.code == 0
        helps[command] = capsys.readouterr().out
        assert helps[command].startswith(f"usage: auditd {command}"), helps[command]
        assert "--config FILE" in helps[command], helps[command]
    assert "--tag K=V" in helps["send"] and "key=value" in helps["send"]
    assert "(default 100)" in helps["dlq"]
    assert "--yes-delete-events" in helps["migrate"]


def test_version_comes_from_the_installed_package() -> None:
    done = cli("--version")
    assert done.returncode == 0, done
    assert done.stdout == f"auditd {metadata.version('auditd')}\n"


def test_usage_errors_exit_2_with_one_line() -> None:
    assert "invalid choice" in assert_one_line_failure(cli("nonsense"), 2)
    assert "TYPE" in assert_one_line_failure(cli("send"), 2)
    assert assert_one_line_failure(cli("dlq", "list", "--limit", "0"), 2)


def test_config_is_accepted_after_the_subcommand_and_wins(make_daemon: MakeDaemon,
                                                          tmp_path: Path) -> None:
    daemon = make_daemon()
    config = str(daemon.config_path)
    missing = str(tmp_path / "missing.toml")
    assert cli("status", "--config", config).returncode == 0
    assert cli("--config", config, "status").returncode == 0
    assert cli("--config", missing, "status", "--config", config).returncode == 0
    failed = cli("--config", config, "status", "--config", missing)
    assert assert_one_line_failure(failed, 2) == f"auditd: {missing}: no such config file"


# -- send ------------------------------------------------------------------------------------

def test_send_prints_the_reply_and_a_duplicate_is_success(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon()
    first = on(daemon, "send", "user.login", "--actor", "alice", "--target", "/srv/app",
               "--tag", "outcome=ok", "--data", "shell=bash", "--data-json", '{"n": 1}',
               "--id", "cli-1")
    assert first.returncode == 0, first
    assert json.loads(first.stdout) == {"ok": 1, "first": 1, "last": 1}
    again = on(daemon, "send", "user.login", "--id", "cli-1")
    assert again.returncode == 0, again  # stored before: that is success
    assert json.loads(again.stdout) == {"ok": 0, "duplicates": [[0, 1]]}
    rows = daemon.query("SELECT type, actor, target, tags, data FROM events_view")
    assert len(rows) == 1 and rows[0][:3] == ("user.login", "alice", "/srv/app"), rows


def test_send_exits_1_when_the_event_is_rejected(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon()
    tags = [arg for i in range(33) for arg in ("--tag", f"k{i}=v")]  # the limit is 32
    done = on(daemon, "send", "too.many.tags", *tags)
    assert done.returncode == 1, done
    reply = json.loads(done.stdout)
    assert reply["ok"] == 0 and reply["rejected"][0][:2] == [0, "invalid"], reply


def test_send_usage_errors_exit_2_before_anything_is_sent(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon()
    assert "key=value" in assert_one_line_failure(on(daemon, "send", "t", "--tag", "x"), 2)
    assert "JSON object" in assert_one_line_failure(
        on(daemon, "send", "t", "--data-json", "[1]"), 2)
    assert "not JSON" in assert_one_line_failure(
        on(daemon, "send", "t", "--data-json", "{"), 2)
    assert daemon.query("SELECT count(*) FROM events") == [(0,)]


def test_send_to_no_daemon_is_one_line(tmp_path: Path) -> None:
    done = cli("send", "t", "--socket", str(tmp_path / "none.sock"))
    assert "none.sock" in assert_one_line_failure(done)


# -- status ----------------------------------------------------------------------------------

def test_status_readable_and_json(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon()
    readable = on(daemon, "status")
    assert readable.returncode == 0, readable
    assert readable.stdout.startswith("state:        ok\n"), readable.stdout
    assert "dead letters:" in readable.stdout
    as_json = on(daemon, "status", "--json")
    assert as_json.returncode == 0, as_json
    document = json.loads(as_json.stdout)
    assert document["health"]["status"] == "ok"
    assert "accepted" in document["stats"]


def test_status_of_no_daemon_is_one_line(tmp_path: Path) -> None:
    done = cli("status", "--status-socket", str(tmp_path / "none.sock"))
    assert "cannot reach the daemon" in assert_one_line_failure(done)


class _HtmlPage(http.server.BaseHTTPRequestHandler):
    """What a proxy in front of a dead backend answers."""

    def do_GET(self) -> None:  # http.server calls do_<METHOD>
        self._page()

    def do_POST(self) -> None:
        self._page()

    def _page(self) -> None:
        body = b"<html><body><h1>502 Bad Gateway</h1>\n<p>nginx</p></body></html>\n"
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a Unix peer has no address to log


@contextlib.contextmanager
def html_server(path: str) -> Iterator[None]:
    server = socketserver.ThreadingUnixStreamServer(path, _HtmlPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


@contextlib.contextmanager
def closing_server(path: str) -> Iterator[None]:
    """Accepts each connection and closes it at once, reading nothing."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                accepted, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
        listener.close()


def test_a_foreign_answer_on_the_status_socket_is_one_line(
        short_tmp: Path, make_daemon: MakeDaemon) -> None:
    html, closing = str(short_tmp / "html.sock"), str(short_tmp / "close.sock")
    daemon = make_daemon()
    never = short_tmp / "never-written.db"
    commands = [["status"], ["dlq", "list"], ["dlq", "drop", "--all"], ["backup", str(never)]]
    with html_server(html), closing_server(closing):
        for command in commands:
            page = assert_one_line_failure(cli(*command, "--status-socket", html))
            assert "HTTP 502" in page and "not JSON" in page and "<html>" in page, page
            closed = assert_one_line_failure(cli(*command, "--status-socket", closing))
            assert "did not answer" in closed, closed
            # The ingest socket speaks the wire protocol: frame_too_large, then a close.
            ingest = assert_one_line_failure(
                cli(*command, "--status-socket", daemon.ingest_socket))
            assert daemon.ingest_socket in ingest, ingest
    assert not never.exists()



def test_an_answer_sent_before_the_body_was_read_is_still_read(short_tmp: Path) -> None:
    # The page comes once the headers are in and the server closes without reading the
    # body: a body larger than the socket's buffer cannot all be sent (EPIPE), and the
    # answer waiting in the client's buffer is what the operator must see.
    html = str(short_tmp / "html.sock")
    with html_server(html), pytest.raises(operator.StatusReplyError) as caught:
        operator.call(html, "POST", "/dlq/drop", {"ids": list(range(400_000))})
    assert "HTTP 502" in str(caught.value) and "<html>" in str(caught.value), caught.value

# -- dlq -------------------------------------------------------------------------------------

def rejects(daemon: DaemonProcess, count: int) -> list[int]:
    """`count` events the daemon refuses (and keeps as dead letters); their dlq ids."""
    with daemon.connect() as conn:
        reply = conn.request([{"type": 7, "id": f"bad-{i}"} for i in range(count)])
    assert reply["ok"] == 0 and len(reply["rejected"]) == count, reply
    entries = wait_for(lambda: len(dead_letters(daemon)) == count and dead_letters(daemon),
                       30, "the dead letters")
    return [dlq_id for dlq_id, _ in entries]


def test_dlq_list_retry_and_drop(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon()
    ids = rejects(daemon, 3)
    listed = on(daemon, "dlq", "list")
    assert listed.returncode == 0, listed
    lines = listed.stdout.splitlines()
    assert [int(line.split()[0]) for line in lines] == ids, listed.stdout
    assert all("invalid" in line for line in lines)
    as_json = json.loads(on(daemon, "dlq", "list", "--json", "--limit", "2").stdout)
    assert [entry["id"] for entry in as_json["dead_letters"]] == ids[:2]
    assert as_json["next"] == ids[1]

    retried = on(daemon, "dlq", "retry", str(ids[0]))  # still invalid: fails again
    assert retried.returncode == 0, retried
    assert json.loads(retried.stdout) == {"retried": 1, "accepted": 0, "failed": 1,
                                          "missing": []}
    dropped = on(daemon, "dlq", "drop", str(ids[0]), "999")
    assert dropped.returncode == 0, dropped
    assert json.loads(dropped.stdout) == {"dropped": 1, "missing": [999]}
    assert [dlq_id for dlq_id, _ in dead_letters(daemon)] == ids[1:]
    everything = on(daemon, "dlq", "drop", "--all")
    assert everything.returncode == 0, everything
    assert json.loads(everything.stdout) == {"dropped": 2, "missing": []}
    assert dead_letters(daemon) == []


def test_dlq_usage_errors_exit_2_and_touch_nothing(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon()
    ids = rejects(daemon, 2)
    for action in ("drop", "retry"):
        both = assert_one_line_failure(on(daemon, "dlq", action, str(ids[0]), "--all"), 2)
        assert both == f"auditd: dlq {action}: name dead-letter ids or --all, not both"
        neither = assert_one_line_failure(on(daemon, "dlq", action), 2)
        assert neither == (f"auditd: dlq {action}: name dead-letter ids, or --all for every "
                           "entry")
    assert "takes no ids" in assert_one_line_failure(on(daemon, "dlq", "list", "1"), 2)
    assert "invalid int" in assert_one_line_failure(on(daemon, "dlq", "drop", "x"), 2)
    assert [dlq_id for dlq_id, _ in dead_letters(daemon)] == ids
    # No admin action reached the daemon: none was recorded.
    assert daemon.query("SELECT count(*) FROM events") == [(0,)]


# A caller whose real and effective uids differ, as under a setuid program: started as
# root, it imports what it needs first (the other uids may not read the interpreter's
# own library: it can live under a 0700 home), takes the groups and uids and then runs
# the real CLI's main().
_SETUID_CALLER = r"""
import encodings.idna, os, sys
import auditd.cli.operator
from auditd.cli.main import main
from auditd.cli.main import build_parser, main
build_parser()  # its lazy imports (the bench's options) happen now, as root
ruid, euid, gid, group = (int(v) for v in sys.argv[1:5])
os.setgroups([group])
os.setresgid(gid, gid, gid)
os.setresuid(ruid, euid, euid)
sys.exit(main(sys.argv[5:]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="changing uids needs root")
def test_a_setuid_caller_keeps_its_groups_on_the_status_socket(
        make_daemon: MakeDaemon) -> None:
    reader_gid, nobody, setuid_owner = 65532, 65534, 65533
    daemon = make_daemon({"status": {"socket_mode": "0666", "reader_gids": [reader_gid]}})
    for folder in (daemon.root.parent, daemon.root):  # the temp dirs are 0700
        os.chmod(folder, 0o755)
    ids = rejects(daemon, 1)  # written by root: only readers and admins see it

    def listing(ruid: int, euid: int) -> list[int]:
        done = subprocess.run(
            [sys.executable, "-c", _SETUID_CALLER, str(ruid), str(euid), str(nobody),
             str(reader_gid), "dlq", "list", "--json", "--config", str(daemon.config_path)],
            capture_output=True, text=True, timeout=60, check=False, cwd="/",
            env=child_env())  # coverage could not write its data as the dropped uid
        assert done.returncode == 0, done
        return [entry["id"] for entry in json.loads(done.stdout)["dead_letters"]]

    assert listing(setuid_owner, setuid_owner) == ids  # the plain case
    # Real uid nobody, effective uid the setuid program's owner: SO_PEERCRED says the
    # effective one, and the process's groups still make it a reader.
    assert listing(nobody, setuid_owner) == ids


# -- backup ----------------------------------------------------------------------------------

def test_backup_writes_a_consistent_copy_and_never_overwrites(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    daemon = make_daemon()
    with daemon.connect() as conn:
        assert conn.request([{"type": "b", "id": f"b{i}"} for i in range(50)])["ok"] == 50
    wait_for(lambda: daemon.query("SELECT count(*) FROM events") == [(50,)], 30, "commit")
    dest = tmp_path / "copy.db"
    done = cli("backup", "copy.db", "--config", str(daemon.config_path), cwd=tmp_path)
    assert done.returncode == 0, done
    assert done.stdout.startswith(f"backup written to {dest}: "), done.stdout
    copy = sqlite3.connect(f"file:{dest}?mode=ro", uri=True)
    try:
        assert copy.execute("SELECT count(*) FROM events").fetchone()[0] >= 50
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        copy.close()
    size = dest.stat().st_size
    again = on(daemon, "backup", str(dest))
    assert "already exists" in assert_one_line_failure(again)
    assert dest.stat().st_size == size
    as_json = on(daemon, "backup", str(tmp_path / "second.db"), "--json")
    assert as_json.returncode == 0, as_json
    assert json.loads(as_json.stdout)["dest"] == str(tmp_path / "second.db")
