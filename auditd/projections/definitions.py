"""The projections auditd keeps: what each counts, its table, and its version.

A version names what a projection's rows mean. Changing how one counts (a different
bucket, a different field) bumps its version here; at the next start the daemon sees
the stored version differ, drops the rows and rebuilds them from the events.

Counted fields: `type`, `actor`, `uid`, `comm`. `target` is not projected: targets are
as many as the files and objects touched (the bench's events name 5,000 a minute), so a
row per (hour, target, uid) would cost nearly a row per event in the writer's
transaction; /counts answers `by=target` with a 400 that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

HOUR_NS: Final = 3_600_000_000_000
Kind = Literal["counts", "summary"]


@dataclass(frozen=True, slots=True)
class Projection:
    name: str
    version: int
    table: str
    kind: Kind
    field: str  # the event field counted ("actor" for the summary)


COUNTS_BY_TYPE = Projection("counts_by_type", 1, "counts_by_type", "counts", "type")
COUNTS_BY_ACTOR = Projection("counts_by_actor", 1, "counts_by_actor", "counts", "actor")
COUNTS_BY_UID = Projection("counts_by_uid", 1, "counts_by_uid", "counts", "uid")
COUNTS_BY_COMM = Projection("counts_by_comm", 1, "counts_by_comm", "counts", "comm")
ACTOR_SUMMARY = Projection("actor_summary", 1, "actor_summary", "summary", "actor")

PROJECTIONS: Final = (COUNTS_BY_TYPE, COUNTS_BY_ACTOR, COUNTS_BY_UID, COUNTS_BY_COMM,
                      ACTOR_SUMMARY)
BY_NAME: Final = {p.name: p for p in PROJECTIONS}
# /counts?by=FIELD -> the projection that answers it.
COUNTS_BY_FIELD: Final = {p.field: p for p in PROJECTIONS if p.kind == "counts"}
# Fields /counts knows of but does not project, with the reason given in its 400.
NOT_PROJECTED: Final = {
    "target": "targets are not projected (about one per event: a count row per event "
              "would cost the writer what the events do)",
}
# Fields whose values are names ids in the tables (uid is stored as itself).
NAMED_FIELDS: Final = frozenset({"type", "actor", "comm"})
