"""Run a piece of test code as another uid, whatever the checkout's permissions.

The child starts as root with this interpreter and this environment, so it can import
auditd and the standard library from wherever they live: a checkout under a 0700
directory, a pyenv under a 0700 /root. It imports every module the code needs, then
drops to the other uid for good (setgroups, setgid, setuid: no root privilege is left)
and only then runs the code, so a socket it connects reports that uid through
SO_PEERCRED, which the kernel takes at connect(). From the drop on, an import that
was not done before fails loudly, here as it would where the files are unreadable.

Coverage is stripped from the child's environment: as the other uid it could not write
its data file (the measured code is the daemon's, which keeps its coverage).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence

# Modules every caller gets imported before the drop (what the snippets here use).
BASE_IMPORTS = ("json", "socket", "sys", "http.client", "email.parser", "encodings.idna",
                "encodings.latin_1")

_CHILD = r"""
import importlib, json, os, sys
spec = json.loads(sys.argv[1])
for name in spec["imports"]:
    importlib.import_module(name)


class ImportAfterDrop:
    # Everything was imported as root; an import now would read files this uid may not.
    def find_spec(self, name, path=None, target=None):
        raise ImportError(f"{name} imported after dropping to uid {spec['uid']}: "
                          "add it to the imports of run_as()")


os.setgroups(spec["groups"])
os.setgid(spec["gid"])
os.setuid(spec["uid"])
assert os.getresuid() == (spec["uid"],) * 3 and os.getresgid() == (spec["gid"],) * 3
sys.meta_path.insert(0, ImportAfterDrop())
sys.argv = [sys.argv[0], *spec["argv"]]
exec(compile(spec["code"], "<run_as>", "exec"), {"__name__": "__main__"})
"""


def can_run_as_other_uid() -> bool:
    """Only root may become another uid."""
    return os.geteuid() == 0


def child_env() -> dict[str, str]:
    """This process's environment without coverage's variables (COVERAGE_PROCESS_CONFIG
    and the like start measurement in every Python child)."""
    return {key: value for key, value in os.environ.items()
            if not key.startswith("COVERAGE_")}


def run_as(uid: int, code: str, *argv: str, gid: int | None = None,
           groups: Sequence[int] = (), imports: Sequence[str] = (),
           timeout: float = 60.0) -> str:
    """Run `code` (a script; `sys.argv[1:]` is `argv`) as `uid`, after importing
    BASE_IMPORTS and `imports` as root; return its stdout.

    gid defaults to uid; `groups` are the supplementary groups (none by default).
    Fails with the child's stderr if it exits non-zero.
    """
    spec = {"uid": uid, "gid": uid if gid is None else gid, "groups": list(groups),
            "imports": [*BASE_IMPORTS, *imports], "argv": list(argv), "code": code}
    result = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)],
                            capture_output=True, text=True, timeout=timeout, cwd="/",
                            env=child_env())
    assert result.returncode == 0, f"child as uid {uid} failed:\n{result.stderr}"
    return result.stdout
