"""QuerySpec: what a query asks for, parsed once from query parameters, and the
in-memory match of one committed event against it.

Filters: `type actor target stream correlation_id causation_id comm uid tag q`. The
values of one filter OR (a repeated parameter, as journalctl does); different
filters AND. `tag` values are `KEY=VALUE` (`tag.KEY=VALUE` in a URL). `q` is words,
all of which must match, whole and case-insensitively, in the event's text (type,
actor, target, tag values, the string values inside `data`); a trailing `*` makes
a word a prefix. `since <= ts < until` (event time), `after < seq < before`.

A filter with no value left (a non-reader asking for another uid) matches nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from auditd.errors import AuditdError
from auditd.schema import StoredEvent
from auditd.store.partition.fields import data_strings
from auditd.store.partition.layout import words

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 10_000
# Filters whose values are strings compared whole; `uid` (ints), `tag` and `q` aside.
TEXT_FILTERS: Final = ("type", "actor", "target", "stream", "correlation_id",
                       "causation_id", "comm")
FILTERS: Final = (*TEXT_FILTERS, "uid", "tag", "q")
_OTHER_PARAMETERS: Final = ("since", "until", "after", "before", "limit", "order")
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_NS: Final = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9,
                   "d": 86400 * 10**9, "w": 7 * 86400 * 10**9}
_SECONDS = re.compile(r"(\d+)(?:\.(\d*))?")
_PREFIX_WORD = re.compile(r"[^\W_]+\*")


class BadQuery(AuditdError):
    """A query parameter is wrong: `parameter` names it; str() says what was expected."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True, slots=True)
class QuerySpec:
    """One query. `values` maps each given filter to its values (OR); `words` are the
    whole words of `q` and `prefixes` its `word*` stems, all lower-case (AND)."""

    values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    uids: tuple[int, ...] | None = None  # None: any uid
    words: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    since_ns: int | None = None
    until_ns: int | None = None
    after: int | None = None
    before: int | None = None
    limit: int = DEFAULT_LIMIT
    descending: bool = False
    # Imported events of these origin hosts only (GET /events?origin_host=; None: any
    # event). Not a field of StoredEvent: the engine reads it from event_origins.
    origin_hosts: tuple[str, ...] | None = None

    @property
    def tags(self) -> tuple[tuple[str, str], ...]:
        return tuple(_split_tag(value) for value in self.values.get("tag", ()))

    @property
    def tag_groups(self) -> dict[str, tuple[str, ...]]:
        """The `k=v` values by key: tags of one key OR, of different keys AND (each
        key is a filter of its own, as journalctl's fields are)."""
        groups: dict[str, list[str]] = {}
        for value in self.values.get("tag", ()):
            groups.setdefault(_split_tag(value)[0], []).append(value)
        return {key: tuple(values) for key, values in groups.items()}

    @property
    def rechecked(self) -> bool:
        """Whether a sealed partition's answer is only a superset (it indexes neither
        prefixes nor more than one tag key: those are checked against the records)."""
        return bool(self.prefixes) or len(self.tag_groups) > 1

    @property
    def empty(self) -> bool:
        """Whether no event can match (a filter with no value, an empty range)."""
        if any(not values for values in self.values.values()) or self.uids == ():
            return True
        if self.since_ns is not None and self.until_ns is not None \
                and self.since_ns >= self.until_ns:
            return True
        return self.after is not None and self.before is not None \
            and self.after + 1 >= self.before

    def restricted_to(self, uid: int | None) -> QuerySpec:
        """This query as a caller allowed to read only `uid`'s events may run it (None:
        every uid). Asking for other uids leaves no uid: nothing matches."""
        if uid is None:
            return self
        uids = (uid,) if self.uids is None or uid in self.uids else ()
        return dataclasses.replace(self, uids=uids)

    def partition_filters(self) -> dict[str, list[str]]:
        """The filters as SealedPartition.query takes them (prefixes are rechecked by
        the caller: a sealed partition indexes whole words only)."""
        filters = {name: list(values) for name, values in self.values.items()}
        if "tag" in filters:  # the first key's; the others are rechecked
            filters["tag"] = list(next(iter(self.tag_groups.values())))
        if self.uids is not None:
            filters["uid"] = [str(uid) for uid in self.uids]
        if self.words:
            filters["q"] = [" ".join(self.words)]
        return filters

    def replace(self, **changes: Any) -> QuerySpec:
        return dataclasses.replace(self, **changes)


# -- parsing ---------------------------------------------------------------------------


def parse_query(params: Mapping[str, str] | Iterable[tuple[str, str]], *,
                allow: Iterable[str] = (), now_ns: int | None = None) -> QuerySpec:
    """A QuerySpec from query parameters (an aiohttp MultiDict, or (name, value) pairs;
    `tag.K=V` and `tag=K=V` both). Names in `allow` are the caller's own and skipped
    here. Raises BadQuery naming the first bad parameter."""
    pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
    allowed = frozenset(allow)
    values: dict[str, list[str]] = {}
    single: dict[str, str] = {}
    uids: list[int] = []
    texts: list[str] = []
    for name, value in pairs:
        if name in allowed:
            continue
        if name.startswith("tag."):
            key = name[4:]
            if not key:
                raise BadQuery(name, f"{name}: expected tag.KEY=VALUE with a key")
            values.setdefault("tag", []).append(f"{key}={value}")
        elif name == "tag":
            if "=" not in value or value.startswith("="):
                raise BadQuery("tag", f"tag={value!r}: expected KEY=VALUE")
            values.setdefault("tag", []).append(value)
        elif name in TEXT_FILTERS:
            if value == "":
                raise BadQuery(name, f"{name}: expected a non-empty value")
            values.setdefault(name, []).append(value)
        elif name == "uid":
            uids.append(bounded_int(name, value, 0, 2**32 - 1))
        elif name == "q":
            texts.append(value)
        elif name in _OTHER_PARAMETERS:
            if name in single:
                raise BadQuery(name, f"{name}: given twice; expected one value")
            single[name] = value
        else:
            known = ", ".join([*FILTERS, "tag.KEY", *_OTHER_PARAMETERS, *sorted(allowed)])
            raise BadQuery(name, f"{name}: unknown parameter; known: {known}")
    whole, prefixes = parse_words(texts)
    now = time.time_ns() if now_ns is None else now_ns
    since = parse_time("since", single["since"], now) if "since" in single else None
    until = parse_time("until", single["until"], now) if "until" in single else None
    limit = bounded_int("limit", single["limit"], 1, MAX_LIMIT) if "limit" in single else None
    order = single.get("order", "asc")
    if order not in ("asc", "desc"):
        raise BadQuery("order", f"order={order!r}: expected asc or desc")
    return QuerySpec(
        values={name: tuple(dict.fromkeys(found)) for name, found in values.items()},
        uids=tuple(dict.fromkeys(uids)) if uids else None, words=whole, prefixes=prefixes,
        since_ns=since, until_ns=until,
        after=_cursor(single, "after"), before=_cursor(single, "before"),
        limit=DEFAULT_LIMIT if limit is None else limit, descending=order == "desc")


def parse_words(texts: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The whole words and the prefixes (`word*`) of `q` values, lower-case, each once."""
    whole: dict[str, None] = {}
    prefixes: dict[str, None] = {}
    for text in texts:
        for piece in text.split():
            if _PREFIX_WORD.fullmatch(piece):
                prefixes[piece[:-1].lower()] = None
            else:
                whole.update(dict.fromkeys(words(piece)))
    if texts and not whole and not prefixes:
        raise BadQuery("q", "q: expected words (letters or digits; a trailing * for a "
                       "prefix)")
    return tuple(whole), tuple(prefixes)


def parse_time(name: str, value: str, now_ns: int | None = None) -> int:
    """Nanoseconds since the epoch from RFC 3339, unix seconds, or a duration before
    now (`90s`, `30m`, `1h`, `7d`)."""
    text = value.strip()
    now = time.time_ns() if now_ns is None else now_ns
    relative = _RELATIVE.fullmatch(text)
    if relative:
        return now - int(float(relative.group(1)) * _UNIT_NS[relative.group(2)])
    seconds = _SECONDS.fullmatch(text)
    if seconds:  # exact: a float would lose the nanoseconds
        whole, fraction = seconds.group(1), seconds.group(2) or ""
        return int(whole) * 10**9 + int(fraction.ljust(9, "0")[:9] or 0)
    return _rfc3339_ns(name, text)


def _rfc3339_ns(name: str, text: str) -> int:
    match = re.fullmatch(r"(.+?[T ]\d\d:\d\d(?::\d\d)?)(?:\.(\d{1,9}))?(Z|[+-]\d\d:?\d\d)?",
                         text, re.IGNORECASE)
    try:
        if match is None:  # a date alone: its midnight, UTC
            moment = datetime.datetime.fromisoformat(text)
            fraction = ""
        else:
            head, fraction, zone = match.group(1), match.group(2) or "", match.group(3) or ""
            moment = datetime.datetime.fromisoformat(head + zone.upper())
    except ValueError:
        raise BadQuery(name, f"{name}={text!r}: expected RFC 3339 (2026-12-02T10:00:00Z), "
                       "unix seconds, or a duration before now (30m, 1h, 7d)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    seconds = int(moment.timestamp())
    return seconds * 10**9 + int(fraction.ljust(9, "0") or 0)


def _cursor(single: Mapping[str, str], name: str) -> int | None:
    return bounded_int(name, single[name], 0, 2**63 - 1) if name in single else None


def bounded_int(name: str, value: str, low: int, high: int) -> int:
    """A query parameter's integer in [low, high]; BadQuery naming it otherwise."""
    try:
        number = int(value)
    except ValueError:
        raise BadQuery(name, f"{name}={value!r}: expected an integer") from None
    if not low <= number <= high:
        raise BadQuery(name, f"{name}={number}: expected an integer from {low} to {high}")
    return number


def _split_tag(value: str) -> tuple[str, str]:
    key, _, tag_value = value.partition("=")
    return key, tag_value


# -- matching one event ------------------------------------------------------------------

_tags_decoder = msgspec.msgpack.Decoder(dict[str, str])
_data_decoder = msgspec.msgpack.Decoder()


def decode_tags(raw: bytes) -> dict[str, str]:
    try:
        return _tags_decoder.decode(raw)
    except msgspec.DecodeError:
        return {}


def event_tags(event: StoredEvent) -> dict[str, str]:
    return {} if event.tags is None else decode_tags(event.tags)


def event_texts(event: StoredEvent) -> list[str]:
    """The strings `q` searches: type, actor, target, tag values, strings in `data`."""
    texts = [event.type]
    if event.actor is not None:
        texts.append(event.actor)
    if event.target is not None:
        texts.append(event.target)
    texts.extend(event_tags(event).values())
    if event.data is not None:
        with contextlib.suppress(msgspec.DecodeError):
            texts.extend(data_strings(_data_decoder.decode(event.data)))
    return texts


def event_words(event: StoredEvent) -> set[str]:
    return {word for text in event_texts(event) for word in words(text)}


def matches(event: object, spec: QuerySpec) -> bool:
    """Whether a committed event matches every filter of `spec` and its ranges (seq,
    ts). Anything but a StoredEvent (a dead letter's gap) never matches."""
    if not isinstance(event, StoredEvent):
        return False
    if spec.after is not None and event.seq <= spec.after:
        return False
    if spec.before is not None and event.seq >= spec.before:
        return False
    if spec.since_ns is not None and event.ts < spec.since_ns:
        return False
    if spec.until_ns is not None and event.ts >= spec.until_ns:
        return False
    return matches_filters(event, spec)


def matches_filters(event: StoredEvent, spec: QuerySpec) -> bool:
    """The filters alone (no seq or ts range)."""
    if spec.uids is not None and event.uid not in spec.uids:
        return False
    for name, values in spec.values.items():
        if name == "tag":
            tags = event_tags(event)
            for group in spec.tag_groups.values():
                if not any(tags.get(key) == value for key, value in map(_split_tag, group)):
                    return False
        elif getattr(event, name) not in values:
            return False
    if spec.words or spec.prefixes:
        texts = [text.lower() for text in event_texts(event)]
        for word, prefix in ((w, False) for w in spec.words):
            if not _has_word(texts, word, prefix):
                return False
        for word in spec.prefixes:
            if not _has_word(texts, word, True):
                return False
    return True


def _has_word(texts: list[str], word: str, prefix: bool) -> bool:
    """Whether a lower-cased text holds `word` whole (or as a word's start): a
    substring test first, the boundaries only where it is there."""
    pattern = _word_pattern(word, prefix)
    return any(word in text and pattern.search(text) is not None for text in texts)


@functools.lru_cache(maxsize=1024)
def _word_pattern(word: str, prefix: bool) -> re.Pattern[str]:
    # A word is a run of letters and digits ([^\W_]): not preceded by one, and (unless
    # a prefix) not followed by one.
    return re.compile(r"(?<![^\W_])" + re.escape(word) + ("" if prefix else r"(?![^\W_])"))
