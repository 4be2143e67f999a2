"""The journal's fsync process: fdatasyncs journal segments for the daemon, on request.

Run by path with `python -I -S` (standard library only) by `journal_sync.ProcessFsync`;
the daemon and this process share one SOCK_SEQPACKET socket given as argv[1].

A request is `token u64` followed by one kind byte per file descriptor passed with it
(SCM_RIGHTS), in order:

- `o`: a finished segment: fdatasync it, then close it;
- `c`: the segment now being written: keep it (closing the previous one) and
  fdatasync it for this and every later request;
- `d`: the journal directory: fsync it (a new segment's entry), then close it.

Every request ends with an fdatasync of the kept segment. The reply is `token u64 |
errno u32`, 0 when every sync succeeded. The process exits when the daemon's end of the
socket closes, which a killed daemon's does too; it ignores SIGINT and SIGTERM so that a
stop signal sent to the whole process group or cgroup leaves the daemon's last syncs to
it until the daemon closes the socket.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import sys

REQUEST = struct.Struct(">Q")
REPLY = struct.Struct(">QI")
MAX_FDS = 64  # file descriptors in one request; the daemon splits larger syncs


def serve(channel: socket.socket) -> None:
    kept = -1
    try:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(channel, 4096, MAX_FDS)
            except ConnectionError:
                return
            if not message:
                return
            (token,) = REQUEST.unpack_from(message)
            kept, failed = _sync(message[REQUEST.size:], fds, kept)
            try:
                channel.send(REPLY.pack(token, failed))
            except OSError:
                return
    finally:
        if kept >= 0:
            os.close(kept)


def _sync(kinds: bytes, fds: list[int], kept: int) -> tuple[int, int]:
    """One request's syncs; returns the segment kept now and the first errno (0: none)."""
    failed = 0
    for kind, fd in zip(kinds, fds, strict=False):
        if kind == ord("c"):
            if kept >= 0:
                os.close(kept)
            kept = fd
            continue
        try:
            (os.fsync if kind == ord("d") else os.fdatasync)(fd)
        except OSError as exc:
            failed = failed or exc.errno or errno.EIO
        finally:
            os.close(fd)
    if kept >= 0:
        try:
            os.fdatasync(kept)
        except OSError as exc:
            failed = failed or exc.errno or errno.EIO
    return kept, failed


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with socket.socket(fileno=int(sys.argv[1])) as channel:
        serve(channel)


if __name__ == "__main__":
    main()
