"""Long-running clients as another uid, beside a flood (as_other_uid.run_as is for a
script run to its end): a child that imports what it needs as root, then drops to the
uid before it connects (SO_PEERCRED is taken at connect).

It never reads the checkout after dropping privileges, so it works from a checkout the
uid cannot read; coverage's variables are removed so that it does not try to write
coverage data it has no right to write.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from as_other_uid import child_env

NOBODY = 65534

as_root_only = pytest.mark.skipif(os.geteuid() != 0,
                                  reason="running a client as another uid needs root")

PRELUDE = r"""
import json, os, socket, sys
import msgspec
from auditd.ingest.framing import FrameDecoder, encode_frame

def drop_to(uid):
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
"""


def start_as(uid: int, script: str, *args: str) -> subprocess.Popen[str]:
    """`script` (after PRELUDE; it calls drop_to(uid) itself) in a child process."""
    return subprocess.Popen([sys.executable, "-c", PRELUDE + script, str(uid), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(), cwd="/")


def open_to_everyone(root: Path, sockets: list[str]) -> None:
    """Let another uid reach the sockets: the test's temp dirs are 0700."""
    for folder in (root.parent, root):
        os.chmod(folder, 0o755)
    for path in sockets:
        os.chmod(path, 0o666)


def finish(child: subprocess.Popen[str], timeout: float = 60) -> str:
    """The child's stdout once it exited 0 (its stderr in the failure otherwise)."""
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        raise AssertionError(f"child as another uid did not finish: {err}") from None
    assert child.returncode == 0, err
    return out
