"""HotIndex and hot_search: candidates rechecked equal a brute-force filter, both orders,
after appends in batches, a trim, and with stragglers."""

from __future__ import annotations

from itertools import islice

import pytest
from multidict import MultiDict
from partition_events import varied_items

from auditd.query.hot_index import NAME_FIELDS, HotIndex
from auditd.query.hot_search import candidate_slots, word_needle
from auditd.query.spec import QuerySpec, matches, parse_query
from auditd.schema import StoredEvent
from auditd.store.statements import event_row

EVENTS = [event for _, _, event in varied_items(2000, seed=11) if event is not None]


class Names(dict[str, int]):
    def __missing__(self, value: str) -> int:
        found = self[value] = len(self) + 1
        return found


def build(events: list[StoredEvent], names: Names, batch: int = 97) -> HotIndex:
    index = HotIndex()
    for start in range(0, len(events), batch):
        part = events[start:start + batch]
        index.append(part, [event_row(e, names.__getitem__) for e in part])
    return index


def search(index: HotIndex, names: Names, spec: QuerySpec, through: int = 0) -> list[int]:
    columns = index.columns
    lo = columns.slot_of(max(through, spec.after or 0))
    hi = columns.count if spec.before is None else columns.slot_of(spec.before - 1)
    ids = {v: names[v] for name in NAME_FIELDS for v in spec.values.get(name, ())
           if v in names}
    by_seq = {e.seq: e for e in EVENTS}
    slots = candidate_slots(columns, spec, ids, lo, hi)
    found = (columns.seqs[s] for s in slots)
    return list(islice((seq for seq in found if matches(by_seq[seq], spec)), spec.limit))


def brute(events: list[StoredEvent], spec: QuerySpec, through: int = 0) -> list[int]:
    found = [e.seq for e in events if e.seq > through and matches(e, spec)]
    if spec.descending:
        found.reverse()
    return found[:spec.limit]


CASES: list[list[tuple[str, str]]] = [
    [],
    [("type", "file.read")],
    [("type", "file.read"), ("type", "admin.grant")],
    [("actor", "Zoë Ünal"), ("comm", "curl")],
    [("target", "/srv/obj/003.json"), ("target", "/srv/obj/017.json")],
    [("stream", "acct-3")],
    [("correlation_id", "op-4")],
    [("causation_id", EVENTS[10].id)],
    [("uid", "1000"), ("type", "db.query")],
    [("uid", "0"), ("uid", "1001")],
    [("tag.note", "a=b")],
    [("tag.env", "prod"), ("tag.region", "ap"), ("tag.region", "us-east-1")],
    [("q", "gamma")],
    [("q", "grüße omega")],
    [("q", "école"), ("type", "admin.grant")],
    [("q", "gam*"), ("actor", "root")],
    [("type", "no.such.type")],
    [("after", "500"), ("before", "900"), ("type", "user.login")],
    [("since", str(EVENTS[300].ts // 10**9)), ("until", str(EVENTS[900].ts // 10**9))],
    [("since", str(EVENTS[300].ts // 10**9)), ("actor", "root")],
]


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("pairs", CASES)
def test_candidates_rechecked_equal_brute_force(pairs: list[tuple[str, str]],
                                                order: str) -> None:
    names = Names()
    index = build(EVENTS, names)
    for limit in ("5", "10000"):
        spec = parse_query(MultiDict([*pairs, ("order", order), ("limit", limit)]))
        assert search(index, names, spec) == brute(EVENTS, spec)


@pytest.mark.parametrize("pairs", CASES)
def test_after_a_trim(pairs: list[tuple[str, str]]) -> None:
    names = Names()
    index = build(EVENTS[:1200], names)
    index.trim(EVENTS[700].seq)
    assert index.columns.seqs[0] == EVENTS[701].seq
    for start in range(1200, len(EVENTS), 50):  # appends after a trim, then another
        part = EVENTS[start:start + 50]
        index.append(part, [event_row(e, names.__getitem__) for e in part])
    through = EVENTS[1000].seq
    index.trim(through)
    spec = parse_query(MultiDict([*pairs, ("order", "desc"), ("limit", "10000")]))
    assert search(index, names, spec) == brute(EVENTS, spec, through)
    spec = spec.replace(descending=False)
    assert search(index, names, spec) == brute(EVENTS, spec, through)


def test_out_of_order_events_become_stragglers() -> None:
    names = Names()
    late = EVENTS[5]
    index = build([e for e in EVENTS if e is not late], names)
    index.append([late], [event_row(late, names.__getitem__)])
    assert index.stragglers == [late]
    assert late.seq not in list(index.columns.seqs)
    index.trim(late.seq)
    assert index.stragglers == []


def test_needles_survive_ascii_lowering() -> None:
    assert word_needle("gamma") == b"gamma"
    assert word_needle("école") == b"cole"
    assert word_needle("grüße") == b"gr"
    assert word_needle("日本") == "日本".encode()


def test_memory_is_counted() -> None:
    index = build(EVENTS, Names())
    per_event = index.columns.memory_bytes() / len(EVENTS)
    assert 40 < per_event < 1000
