"""QuerySpec parsing (every parameter, and the 400s naming each) and matches()."""

from __future__ import annotations

import pytest
from multidict import MultiDict
from partition_events import event_matches, varied_items

from auditd.query.spec import MAX_LIMIT, BadQuery, QuerySpec, matches, parse_query, parse_time

NOW = 1_800_000_000 * 10**9


def parse(*pairs: tuple[str, str]) -> QuerySpec:
    return parse_query(MultiDict(pairs), now_ns=NOW)


def test_defaults() -> None:
    spec = parse()
    assert spec.limit == 100 and not spec.descending and spec.uids is None
    assert spec.values == {} and spec.words == () and not spec.empty


def test_repeated_filter_ors_and_tags_take_both_forms() -> None:
    spec = parse(("type", "a"), ("type", "b"), ("type", "a"), ("actor", "x"),
                 ("tag.env", "prod"), ("tag", "region=eu=1"), ("uid", "7"), ("uid", "8"))
    assert spec.values == {"type": ("a", "b"), "actor": ("x",),
                           "tag": ("env=prod", "region=eu=1")}
    assert spec.tags == (("env", "prod"), ("region", "eu=1"))
    assert spec.uids == (7, 8)
    assert spec.partition_filters()["uid"] == ["7", "8"]


def test_words_and_prefixes() -> None:
    spec = parse(("q", "Deploy app-7 roll*"), ("q", "deploy"))
    assert spec.words == ("deploy", "app", "7") and spec.prefixes == ("roll",)
    assert spec.partition_filters()["q"] == ["deploy app 7"]


@pytest.mark.parametrize(("value", "expected"), [
    ("1h", NOW - 3600 * 10**9), ("30m", NOW - 1800 * 10**9), ("1.5s", NOW - 15 * 10**8),
    ("1700000000", 1_700_000_000 * 10**9), ("1700000000.25", 1_700_000_000_250_000_000),
    ("2026-12-02T10:00:00Z", 1_796_205_600 * 10**9),
    ("2026-12-02T10:00:00.000000123Z", 1_796_205_600 * 10**9 + 123),
    ("2026-12-02T11:00:00+01:00", 1_796_205_600 * 10**9),
    ("2026-12-02", 1_796_169_600 * 10**9),
])
def test_times(value: str, expected: int) -> None:
    assert parse_time("since", value, NOW) == expected


def test_order_limit_cursor() -> None:
    spec = parse(("order", "desc"), ("limit", str(MAX_LIMIT)), ("after", "5"), ("before", "9"))
    assert spec.descending and spec.limit == MAX_LIMIT and (spec.after, spec.before) == (5, 9)
    assert parse(("after", "5"), ("before", "6")).empty
    assert parse(("since", "10"), ("until", "10")).empty


@pytest.mark.parametrize(("pairs", "parameter"), [
    ([("limit", str(MAX_LIMIT + 1))], "limit"),
    ([("limit", "0")], "limit"),
    ([("limit", "ten")], "limit"),
    ([("after", "-1")], "after"),
    ([("before", "x")], "before"),
    ([("order", "sideways")], "order"),
    ([("since", "yesterday")], "since"),
    ([("until", "2026-13-45T00:00:00Z")], "until"),
    ([("uid", "root")], "uid"),
    ([("tag", "novalue")], "tag"),
    ([("tag.", "x")], "tag."),
    ([("type", "")], "type"),
    ([("q", "!!!")], "q"),
    ([("colour", "red")], "colour"),
    ([("limit", "1"), ("limit", "2")], "limit"),
])
def test_bad_parameters_name_themselves(pairs: list[tuple[str, str]], parameter: str) -> None:
    with pytest.raises(BadQuery) as caught:
        parse(*pairs)
    assert caught.value.parameter == parameter
    assert str(caught.value).startswith(parameter)


def test_allowed_names_are_skipped() -> None:
    spec = parse_query([("follow", "1"), ("n", "5"), ("type", "a")], allow=("follow", "n"))
    assert spec.values == {"type": ("a",)}


def test_restriction_to_a_uid() -> None:
    assert parse().restricted_to(None).uids is None
    assert parse().restricted_to(7).uids == (7,)
    assert parse(("uid", "7"), ("uid", "8")).restricted_to(7).uids == (7,)
    mine = parse(("uid", "8")).restricted_to(7)
    assert mine.uids == () and mine.empty


FILTER_CASES: list[list[tuple[str, str]]] = [
    [("type", "file.read")],
    [("type", "file.read"), ("type", "user.login")],
    [("actor", "Zoë Ünal"), ("comm", "curl")],
    [("target", "/srv/obj/003.json")],
    [("stream", "acct-3")],
    [("correlation_id", "op-4")],
    [("uid", "1000"), ("type", "db.query")],
    [("tag.note", "a=b")],
    [("tag.region", "us-east-1"), ("tag.region", "ap")],
    [("q", "gamma")],
    [("q", "grüße omega")],
    [("q", "ÉCOLE"), ("type", "admin.grant")],
]


@pytest.mark.parametrize("pairs", FILTER_CASES)
def test_matches_agrees_with_brute_force(pairs: list[tuple[str, str]]) -> None:
    spec = parse(*pairs)
    filters = spec.partition_filters()
    events = [event for _, _, event in varied_items(600) if event is not None]
    found = [e.seq for e in events if matches(e, spec)]
    assert found == [e.seq for e in events if event_matches(e, filters)]
    assert found  # the cases are chosen to match something


def test_tags_of_different_keys_and() -> None:
    spec = parse(("tag.env", "prod"), ("tag.region", "ap"), ("tag.region", "us-east-1"))
    assert spec.tag_groups == {"env": ("env=prod",),
                               "region": ("region=ap", "region=us-east-1")}
    assert spec.rechecked and spec.partition_filters()["tag"] == ["env=prod"]
    events = [event for _, _, event in varied_items(600) if event is not None]
    both = [e.seq for e in events if event_matches(e, {"tag": ["env=prod"]})
            and event_matches(e, {"tag": ["region=ap", "region=us-east-1"]})]
    assert [e.seq for e in events if matches(e, spec)] == both and both


def test_matches_prefix_ranges_and_gaps() -> None:
    # The same 600 events as above: partition_events caches words by (seq, id).
    events = [event for _, _, event in varied_items(600) if event is not None]
    prefix = parse(("q", "gam*"))
    assert [e.seq for e in events if matches(e, prefix)] == \
        [e.seq for e in events if event_matches(e, {"q": ["gamma"]})]
    ranged = parse(("after", "10"), ("before", "20"))
    assert [e.seq for e in events if matches(e, ranged)] == \
        [e.seq for e in events if 10 < e.seq < 20]
    ts = events[50].ts
    timed = parse(("since", str(ts // 10**9)))
    assert all(e.ts >= (ts // 10**9) * 10**9 for e in events if matches(e, timed))
    assert not matches(object(), parse())
