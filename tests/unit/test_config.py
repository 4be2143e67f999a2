"""Config: defaults for every key, human sizes and durations, errors naming key and value."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from as_other_uid import child_env

from auditd.config import Config, config_from_dict, load_config, parse_duration_ms, parse_size
from auditd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def error_of(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, "test.toml")
    return str(info.value)


def test_defaults_match_interfaces_md() -> None:
    config = config_from_dict({})
    assert config.ingest.socket == "/run/auditd/ingest.sock"
    assert config.mode("ingest") == 0o660
    assert config.size("ingest", "max_frame_bytes") == 1_048_576
    assert config.ingest.max_batch_events == 10_000
    assert config.size("ingest", "max_event_bytes") == 262_144
    assert config.ingest.max_connections == 1024
    assert config.ingest.durability == "write"
    assert config.buffer.capacity == 65_536
    assert config.buffer.overflow == "block"
    assert config.writer.batch_max == 4096
    assert config.writer.batch_delay_ms == 5
    assert config.storage.path == "/var/lib/auditd"
    assert config.duration_ms("retention", "max_age") == 30 * 86_400_000
    assert config.size("retention", "max_bytes") == 5 * 1024**3
    assert config.status.socket == "/run/auditd/status.sock"
    assert config.mode("status") == 0o660
    assert config.status.admin_uids == [0]
    assert config.status.reader_gids == []
    assert config.status.metrics_listen == ""
    assert config.log.level == "info"
    assert config.log.format == "auto"
    assert config.source == ""
    assert Config().ingest.max_connections == config.ingest.max_connections


def test_partial_sections_keep_defaults_for_the_rest() -> None:
    config = config_from_dict({"buffer": {"capacity": 16}, "ingest": {"durability": "fsync"}},
                              "x.toml")
    assert config.buffer.capacity == 16
    assert config.buffer.overflow == "block"
    assert config.ingest.durability == "fsync"
    assert config.ingest.max_batch_events == 10_000
    assert config.source == "x.toml"


@pytest.mark.parametrize(("value", "expected"), [
    (0, 0), (1234, 1234), ("512KB", 512 * 1024), ("64MB", 64 * 1024**2),
    ("5GB", 5 * 1024**3), ("1TB", 1024**4), ("100", 100), ("100B", 100),
    ("1.5KB", 1536), ("64mib", 64 * 1024**2), (" 2 kb ", 2048), ("3KiB", 3072),
])
def test_sizes(value: int | str, expected: int) -> None:
    assert parse_size("k", value) == expected
    config = config_from_dict({"buffer": {"max_bytes": value}})
    assert config.size("buffer", "max_bytes") == expected


@pytest.mark.parametrize(("value", "expected_ms"), [
    ("250ms", 250), ("30s", 30_000), ("5m", 300_000), ("2h", 7_200_000),
    ("30d", 30 * 86_400_000), ("1w", 604_800_000), ("1.5s", 1500), (7, 7000), (0, 0),
])
def test_durations(value: int | str, expected_ms: int) -> None:
    assert parse_duration_ms("k", value) == expected_ms
    config = config_from_dict({"writer": {"retry_max_delay": value}})
    assert config.duration_ms("writer", "retry_max_delay") == expected_ms


@pytest.mark.parametrize(("raw", "message"), [
    ({"buffer": {"capacity": 0}}, "buffer.capacity = 0: expected an integer >= 1"),
    ({"ingest": {"max_connections": -3}},
     "ingest.max_connections = -3: expected an integer >= 1"),
    ({"writer": {"batch_max": 0}}, "writer.batch_max = 0: expected an integer >= 1"),
    ({"buffer": {"capacity": "big"}}, "buffer.capacity = 'big': expected int, got str"),
    ({"ingest": {"max_frame_bytes": "1 parsec"}},
     "ingest.max_frame_bytes = '1 parsec': expected a size like 512KB, 64MB or 5GB"),
    ({"ingest": {"max_event_bytes": -5}}, "ingest.max_event_bytes = -5: expected a size >= 0"),
    ({"writer": {"retry_max_delay": "5 fortnights"}},
     "writer.retry_max_delay = '5 fortnights': expected a duration like 250ms, 30s or 30d"),
    ({"retention": {"max_age": -1}}, "retention.max_age = -1: expected a duration >= 0"),
    ({"writer": {"batch_delay_ms": -1}},
     "writer.batch_delay_ms = -1: expected an integer >= 0"),
    ({"ingest": {"socket_mode": "rw"}},
     "ingest.socket_mode = 'rw': expected an octal mode like \"0660\""),
    ({"bogus": {}}, "bogus: unknown key"),
    ({"ingest": {"sockett": "/x"}}, "ingest.sockett: unknown key"),
    ({"ingest": 5}, "ingest = 5: expected object, got int"),
    ({"ingest": {"max_frame_bytes": True}},
     "ingest.max_frame_bytes = True: expected int | str, got bool"),
])
def test_errors_name_key_value_and_expectation(raw: dict[str, Any], message: str) -> None:
    assert error_of(raw) == message


def test_error_inside_a_list_names_the_bad_element() -> None:
    message = error_of({"status": {"admin_uids": [0, "root"]}})
    assert message == "status.admin_uids[1] = 'root': expected int, got str"


def test_max_frame_bytes_floor_error_names_the_value() -> None:
    message = error_of({"ingest": {"max_frame_bytes": 8}})
    assert message.startswith("ingest.max_frame_bytes = 8: "), message
    assert "16" in message


@pytest.mark.parametrize(("raw", "key", "value", "allowed"), [
    ({"buffer": {"overflow": "drop"}}, "buffer.overflow", "drop", ["block", "reject"]),
    ({"ingest": {"durability": "maybe"}}, "ingest.durability", "maybe", ["write", "fsync"]),
    ({"log": {"format": "xml"}}, "log.format", "xml", ["json", "console", "auto"]),
])
def test_enum_errors_say_what_was_expected(raw: dict[str, Any], key: str, value: str,
                                           allowed: list[str]) -> None:
    message = error_of(raw)
    assert message.startswith(f"{key} = {value!r}: "), message
    for choice in allowed:
        assert choice in message, message


def test_load_config_from_file(tmp_path: Path) -> None:
    path = tmp_path / "auditd.toml"
    path.write_text('[buffer]\ncapacity = 32\nmax_bytes = "1MB"\n[log]\nlevel = "debug"\n')
    config = load_config(str(path))
    assert config.buffer.capacity == 32
    assert config.size("buffer", "max_bytes") == 1024**2
    assert config.log.level == "debug"
    assert config.source == str(path)


def test_load_config_uses_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "env.toml"
    path.write_text("[ingest]\nmax_connections = 7\n")
    monkeypatch.setenv("AUDITD_CONFIG", str(path))
    assert load_config().ingest.max_connections == 7


def test_named_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing))
    assert str(info.value) == f"{missing}: no such config file"


def test_invalid_toml_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[ingest\nsocket = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}: not valid TOML: ")


def test_dev_config_loads() -> None:
    config = load_config(str(REPO / "config" / "dev.toml"))
    assert config.ingest.socket == "var/run/ingest.sock"
    assert config.storage.path == "var/lib"


def test_cli_run_with_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[buffer]\ncapacity = 0\n")
    done = subprocess.run(
        [sys.executable, "-m", "auditd.cli", "run", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "buffer.capacity = 0: expected an integer >= 1" in lines[0]
    assert "Traceback" not in done.stderr


# -- files that cannot be read: each a ConfigError with one line naming the file ----------

def load_error(path: Path | str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_a_file_that_is_not_utf8_is_refused_naming_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[log]\nlevel = "info" # caf\xe9\n')
    assert load_error(path) == f"{path}: not UTF-8: byte 0xe9 at offset 26"


def test_a_directory_is_refused(tmp_path: Path) -> None:
    assert load_error(tmp_path) == f"{tmp_path}: is a directory, not a config file"


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "auditd.toml"
    os.mkfifo(fifo)
    outcome: list[BaseException | Config] = []

    def load() -> None:
        try:
            outcome.append(load_config(str(fifo)))
        except BaseException as exc:
            outcome.append(exc)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(timeout=30)
    if loader.is_alive():  # blocked opening the FIFO: a writer lets it go
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        loader.join(timeout=30)
        raise AssertionError("load_config blocked on a FIFO waiting for a writer")
    assert len(outcome) == 1 and isinstance(outcome[0], ConfigError), outcome
    assert str(outcome[0]) == f"{fifo}: not a regular file (a FIFO, socket or device)"


def test_a_device_is_refused() -> None:
    # /dev/null, not /dev/zero: a loader that reads devices would read that one forever
    assert load_error("/dev/null") == (
        "/dev/null: not a regular file (a FIFO, socket or device)")


def test_a_dangling_symlink_is_a_missing_file(tmp_path: Path) -> None:
    link = tmp_path / "auditd.toml"
    link.symlink_to(tmp_path / "removed.toml")
    assert load_error(link) == f"{link}: no such config file"


def test_a_path_through_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    path = tmp_path / "plain" / "auditd.toml"
    assert load_error(path) == f"{path}: cannot open: Not a directory"


# Runs as root in a child, then drops every uid: imports first, so the child needs no
# access to the checkout, only to what it loads.
_LOAD_AS = r"""
import os, sys
from auditd.config import load_config
from auditd.errors import ConfigError
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
try:
    load_config(sys.argv[1])
except ConfigError as exc:
    print("ConfigError:", exc)
else:
    print("loaded")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_a_file_in_a_directory_that_cannot_be_searched_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)  # root's: uid 65534 may not search it
    path = locked / "auditd.toml"
    path.write_text("[log]\nlevel = \"debug\"\n")
    os.chmod(tmp_path, 0o755)
    done = subprocess.run([sys.executable, "-c", _LOAD_AS, str(path)], capture_output=True,
                          text=True, timeout=60, check=False,
                          env=child_env())  # coverage could not write as the dropped uid
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"ConfigError: {path}: cannot open: Permission denied\n"


@pytest.mark.parametrize("kind", ["latin1", "directory"])
def test_cli_run_with_an_unreadable_file_exits_2_with_one_line(tmp_path: Path,
                                                               kind: str) -> None:
    path = tmp_path / "auditd.toml"
    if kind == "latin1":
        path.write_bytes(b"# \xff\n")
    else:
        path.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "auditd.cli", "run", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert done.stderr.startswith(f"auditd: {path}: ") and done.stderr.count("\n") == 1, \
        done.stderr
