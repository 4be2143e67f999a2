"""What retention deletes, decided from the catalog and the disk use, with no I/O.

The oldest go first, a whole sealed partition at a time (the hot table is never cut):
by age, every leading partition whose newest event was received before the cut-off;
by size, while disk use is over `max_bytes`, the oldest archive files (they hold the
oldest events) and then the oldest partitions. An event therefore lives up to
`max_age` plus the time its partition took to fill, as journald keeps whole files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from auditd.store.sealing.catalog import CatalogEntry

ARCHIVE_NAME = re.compile(r"(.+)-(\d{12})-(\d{12})\.msgpack\.zst")


def archive_name(host: str, first: int, last: int) -> str:
    return f"{host}-{first:012d}-{last:012d}.msgpack.zst"


@dataclass(frozen=True, slots=True)
class Candidate:
    """A catalogued partition, with its disk use and newest event's receipt time."""

    entry: CatalogEntry
    bytes: int
    newest_ns: int


@dataclass(frozen=True, slots=True)
class Drop:
    kind: str  # "partition" | "archive"
    name: str
    reason: str  # "max_age" | "max_bytes"
    bytes: int
    first_seq: int
    last_seq: int
    events: int = 0
    newest_ns: int | None = None
    candidate: Candidate | None = None

    def document(self) -> dict[str, Any]:
        return {"kind": self.kind, "file": self.name, "reason": self.reason,
                "bytes": self.bytes, "first_seq": self.first_seq, "last_seq": self.last_seq,
                "events": self.events, "newest_received_at_ns": self.newest_ns}


@dataclass(frozen=True, slots=True)
class Plan:
    drops: list[Drop]
    used_after: int  # disk use once they are gone (archives the drops make not counted)
    short: bool  # over max_bytes with nothing left that retention may delete


def archives_by_seq(files: dict[str, int], host: str) -> list[tuple[str, int, int, int]]:
    """(name, first_seq, last_seq, bytes) of the archive files this host's retention
    wrote, oldest first; other files (another host's too) count in disk use but are
    never deleted."""
    found = []
    for name, size in files.items():
        match = ARCHIVE_NAME.fullmatch(name)
        if match is not None and match[1] == host:
            found.append((name, int(match[2]), int(match[3]), size))
    return sorted(found, key=lambda item: item[1])


def plan(candidates: list[Candidate], archives: list[tuple[str, int, int, int]], used: int,
         max_bytes: int, cutoff_ns: int | None) -> Plan:
    """Drops in the order they must happen. `cutoff_ns` None: no age limit; `max_bytes`
    0: no size limit."""
    drops: list[Drop] = []
    left = list(candidates)
    while left and cutoff_ns is not None and left[0].newest_ns < cutoff_ns:
        drops.append(_partition(left.pop(0), "max_age"))
        used -= drops[-1].bytes
    if max_bytes:
        for name, first, last, size in archives:
            if used <= max_bytes:
                break
            drops.append(Drop("archive", name, "max_bytes", size, first, last))
            used -= size
        while left and used > max_bytes:
            drops.append(_partition(left.pop(0), "max_bytes"))
            used -= drops[-1].bytes
    return Plan(drops, used, bool(max_bytes) and used > max_bytes)


def _partition(candidate: Candidate, reason: str) -> Drop:
    entry = candidate.entry
    return Drop("partition", entry.file, reason, candidate.bytes, entry.first_seq,
                entry.last_seq, entry.events, candidate.newest_ns, candidate)
