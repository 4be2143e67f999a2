"""What every helper process the daemon starts (the sealer, the forward worker) does
first: die with the daemon, so a SIGKILLed daemon leaves none of them running beside
the next one."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int, exit_code: int) -> None:
    """Ask the kernel to SIGKILL this process when `parent` dies (PR_SET_PDEATHSIG);
    if `parent` is gone already (before or during the call: this process was
    reparented), exit with `exit_code` now."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no such call
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(exit_code)
