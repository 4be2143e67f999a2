"""retention_plan.plan: the oldest go first, by age and by size, archives before
partitions; the hot table is never a candidate."""

from __future__ import annotations

from auditd.lifecycle.retention_plan import Candidate, archive_name, archives_by_seq, plan
from auditd.store.sealing.catalog import CatalogEntry


def _candidates(*newest: int, size: int = 100) -> list[Candidate]:
    found = []
    for index, ns in enumerate(newest):
        first = index * 10 + 1
        entry = CatalogEntry(first, first + 9, f"p{first:012d}-{first + 9:012d}.db", 10,
                             size, 1, ns, 0.1)
        found.append(Candidate(entry, size, ns))
    return found


def test_by_age_only_the_leading_old_partitions_go() -> None:
    decided = plan(_candidates(5, 8, 20, 6), [], 1000, 0, cutoff_ns=10)
    # The fourth is old too, but the third is not: deletion is from the front only.
    assert [d.first_seq for d in decided.drops] == [1, 11]
    assert {d.reason for d in decided.drops} == {"max_age"}
    assert decided.used_after == 800 and not decided.short


def test_by_size_archives_first_then_partitions_until_under() -> None:
    archives = archives_by_seq({archive_name("h", 1, 9): 30, "notes.txt": 500,
                                archive_name("g", 1, 9): 7, archive_name("h", 10, 19): 30},
                               "h")
    # Foreign files, another host's archives among them, are never deleted.
    assert [(a[0][:1], a[1]) for a in archives] == [("h", 1), ("h", 10)]
    decided = plan(_candidates(50, 60, 70), archives, 400, 200, cutoff_ns=None)
    assert [(d.kind, d.first_seq) for d in decided.drops] == [
        ("archive", 1), ("archive", 10), ("partition", 1), ("partition", 11)]
    assert decided.used_after == 140 and not decided.short


def test_a_limit_nothing_can_meet_is_short() -> None:
    decided = plan(_candidates(50), [], 1000, 100, cutoff_ns=None)
    assert len(decided.drops) == 1 and decided.short and decided.used_after == 900


def test_no_limits_drop_nothing() -> None:
    decided = plan(_candidates(1, 2), [], 10**9, 0, cutoff_ns=None)
    assert decided.drops == [] and not decided.short
