"""Who is calling: SO_PEERCRED on the status socket, plus the peer's groups from /proc.

Roles, as interfaces.md fixes them: admins (status.admin_uids) may do everything;
readers (a member of status.reader_gids) read every event; anyone else reads health,
stats and metrics, and only the events and dead letters their own uid wrote.
The config is read per request, so a reload takes effect on the next call.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Literal

from auditd.config import StatusConfig
from auditd.ingest.connection import peer_of

Role = Literal["admin", "reader", "user"]


@dataclass(slots=True, frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int
    comm: str
    groups: frozenset[int]  # the primary gid and every supplementary group
    role: Role

    @property
    def sees_all(self) -> bool:
        """Whether the caller reads every uid's events and dead letters."""
        return self.role != "user"

    @property
    def uid_filter(self) -> int | None:
        """The uid to restrict reads to, None for no restriction."""
        return None if self.sees_all else self.uid


class Forbidden(Exception):
    """The caller may not do this; the message says why, for a 403 body."""


def caller_of(sock: socket.socket | None, config: StatusConfig) -> Caller | None:
    """The caller on a Unix socket; None on a socket without peer credentials (TCP)."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    peer = peer_of(sock)
    groups = frozenset({peer.gid, *_supplementary_groups(peer.pid, peer.uid)})
    return Caller(peer.pid, peer.uid, peer.gid, peer.comm, groups,
                  role_of(peer.uid, groups, config))


def role_of(uid: int, groups: frozenset[int], config: StatusConfig) -> Role:
    if uid in config.admin_uids:
        return "admin"
    if groups.intersection(config.reader_gids):
        return "reader"
    return "user"


def require_admin(caller: Caller | None) -> Caller:
    if caller is None:
        raise Forbidden("admin calls are served only on the status socket")
    if caller.role != "admin":
        raise Forbidden(f"uid {caller.uid} is not in status.admin_uids")
    return caller


def _supplementary_groups(pid: int, uid: int) -> list[int]:
    """The `Groups:` line of /proc/<pid>/status.

    SO_PEERCRED carries the peer's effective uid and gid, and no supplementary groups;
    those are the `Groups:` line, which belongs to the process whatever its uids.
    A peer that has exited (or a /proc mounted with hidepid) yields no supplementary
    groups: access then falls back to the uid and primary gid, which can only narrow
    what the caller sees. The effective uid on the `Uid:` line (real, effective,
    saved, filesystem) must match, so a recycled pid never lends its groups to the
    caller, and a setuid caller (real uid not its effective one) keeps its own.
    """
    if pid <= 0:
        return []
    fields: dict[str, list[str]] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("Uid", "Groups"):
                    fields[key] = rest.split()
    except OSError:
        return []
    uids = fields.get("Uid", [])
    if len(uids) < 2 or uids[1] != str(uid):
        return []
    return [int(g) for g in fields.get("Groups", []) if g.isdigit()]
