"""The batch aggregation against a plain per-event reference, on every shape of batch
its fast paths tell apart: one hour and one uid, several of either, ts out of order,
events without an actor, times before 1970."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from auditd.projections.aggregate import NO_ACTOR, Columns, aggregate, named, strings_in
from auditd.projections.definitions import HOUR_NS, PROJECTIONS


def reference(columns: Columns) -> tuple[dict[str, Counter[Any]], dict[Any, list[int]]]:
    counts: dict[str, Counter[Any]] = {p.name: Counter() for p in PROJECTIONS
                                       if p.kind == "counts"}
    actors: dict[Any, list[int]] = {}
    for seq, ts, kind, actor, uid, comm in zip(*columns, strict=True):
        hour = ts // HOUR_NS
        counts["counts_by_type"][(hour, kind, uid)] += 1
        counts["counts_by_actor"][(hour, NO_ACTOR if actor is None else actor, uid)] += 1
        counts["counts_by_uid"][(hour, uid)] += 1
        counts["counts_by_comm"][(hour, comm, uid)] += 1
        if actor is not None:
            entry = actors.setdefault((actor, uid), [ts, ts, 0, seq])
            entry[0], entry[1] = min(entry[0], ts), max(entry[1], ts)
            entry[2] += 1
            entry[3] = max(entry[3], seq)
    return counts, actors


def batch(rng: random.Random, size: int, hours: int, uids: int, ordered: bool,
          base: int) -> Columns:
    ts = [base + rng.randrange(hours * HOUR_NS) for _ in range(size)]
    if ordered:
        ts.sort()
    return Columns(list(range(100, 100 + size)), ts,
                   [rng.randrange(1, 5) for _ in range(size)],
                   [None if rng.random() < 0.2 else rng.randrange(5, 40) for _ in range(size)],
                   [rng.randrange(uids) * 1000 for _ in range(size)],
                   [rng.randrange(40, 43) for _ in range(size)])


@pytest.mark.parametrize("hours", [1, 3])
@pytest.mark.parametrize("uids", [1, 4])
@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("base", [1_764_000_000 * 10**9, -5 * HOUR_NS - 7])
def test_aggregates_equal_the_per_event_reference(hours: int, uids: int, ordered: bool,
                                                  base: int) -> None:
    rng = random.Random(f"{hours}-{uids}-{ordered}-{base}")
    for size in (1, 7, 500):
        columns = batch(rng, size, hours, uids, ordered, base - base % HOUR_NS)
        got = aggregate(columns, PROJECTIONS)
        counts, actors = reference(columns)
        assert got.counts == counts
        assert (got.actors or {}) == actors


def test_string_keys_of_a_sealed_chunk_become_names_ids() -> None:
    columns = Columns([1, 2, 3], [0, 1, HOUR_NS], ["t", "t", "u"], ["a", None, "a"],
                      [5, 5, 5], ["c", "c", "c"])
    found = aggregate(columns, PROJECTIONS)
    assert strings_in(found) == {"t", "u", "a", "c"}
    ids = {"t": 1, "u": 2, "a": 3, "c": 4}
    renamed = named(found, ids.__getitem__)
    assert renamed.counts["counts_by_type"] == Counter({(0, 1, 5): 2, (1, 2, 5): 1})
    assert renamed.counts["counts_by_actor"] == Counter({(0, 3, 5): 1, (0, NO_ACTOR, 5): 1,
                                                         (1, 3, 5): 1})
    assert renamed.counts["counts_by_uid"] == Counter({(0, 5): 2, (1, 5): 1})
    assert renamed.actors == {(3, 5): [0, HOUR_NS, 2, 3]}
    assert aggregate(Columns([], [], [], [], [], []), PROJECTIONS).empty
