"""The shipped systemd units: systemd's own tools accept them, and the sandbox holds."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS_DIR = Path(__file__).resolve().parents[2] / "systemd"
SERVICE = "audit-events.service"
SOCKETS = {"ingest": "audit-events-ingest.socket", "status": "audit-events-status.socket"}
UNITS = [SERVICE, *SOCKETS.values()]
SHIPPED_BINARY = "/usr/local/bin/auditd"
MAX_EXPOSURE = 2.0

# Only the tests that run systemd's own tool need it; the unit-file checks are pure.
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze absent"
)


def directives(unit: str) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file; keys may repeat, so values are lists."""
    found: dict[str, list[str]] = {}
    for line in (UNITS_DIR / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The units copied to a directory, ExecStart pointing at a stub that exists.

    `systemd-analyze verify` rejects a unit whose binary is missing, and the test
    machine has no installed auditd; the rest of the command line is kept as shipped.
    """
    stub = tmp_path / "bin" / "auditd"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copy = tmp_path / "units"
    copy.mkdir()
    for unit in UNITS:
        text = (UNITS_DIR / unit).read_text()
        if unit == SERVICE:
            assert f"ExecStart={SHIPPED_BINARY} " in text
            text = text.replace(f"ExecStart={SHIPPED_BINARY} ", f"ExecStart={stub} ")
        (copy / unit).write_text(text)
    return copy


def verify(units: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", *(str(units / unit) for unit in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def complaints(result: subprocess.CompletedProcess[str]) -> list[str]:
    # verify reports unknown keys and bad values as warnings with exit 0, so a clean run
    # is one that says nothing about our files (it may chat about the host's own units).
    output = result.stdout + result.stderr
    return [line for line in output.splitlines() if any(unit in line for unit in UNITS)]


@needs_analyze
def test_verify_accepts_the_units(units: Path) -> None:
    result = verify(units)
    assert result.returncode == 0, result.stderr
    assert complaints(result) == []


@needs_analyze
def test_verify_would_notice_a_mistake(units: Path) -> None:
    """Guards the test above: a silent verify would otherwise pass anything."""
    service = units / SERVICE
    service.write_text(service.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    assert any("NoNewPrivilege" in line for line in complaints(verify(units)))


@needs_analyze
def test_security_exposure_is_low(units: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(units / SERVICE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_sandbox_does_not_hide_peers() -> None:
    """SO_PEERCRED and /proc/<pid>/comm must tell the truth about clients (interfaces.md)."""
    service = directives(SERVICE)
    assert service.get("PrivateUsers", ["no"])[-1] in {"no", "false", "0"}
    assert "ProtectProc" not in service
    assert "ProcSubset" not in service
    assert "DynamicUser" not in service
    assert service["User"] == ["auditd-events"]
    assert service["Sockets"] == [" ".join(SOCKETS.values())]


@pytest.mark.parametrize("name", sorted(SOCKETS))
def test_socket_units_match_the_default_config(name: str) -> None:
    socket = directives(SOCKETS[name])
    assert socket["ListenStream"] == [f"/run/auditd/{name}.sock"]
    assert socket["FileDescriptorName"] == [name]
    assert socket["SocketMode"] == ["0660"]
    assert socket["Service"] == [SERVICE]
    assert socket["RemoveOnStop"] == ["no"]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers absent")
def test_sysusers_creates_the_service_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(
        [
            "systemd-sysusers",
            f"--root={tmp_path}",
            str(UNITS_DIR / "audit-events.sysusers.conf"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    passwd = (tmp_path / "etc" / "passwd").read_text()
    group = (tmp_path / "etc" / "group").read_text()
    assert re.search(r"^auditd-events:x:\d+:\d+:.*:/usr/sbin/nologin$", passwd, re.M)
    assert re.search(r"^auditd-events:x:\d+:", group, re.M)
