"""The parameters of GET /counts, parsed once; a bad one raises BadParameter naming it.

`by` is a projected field (type, actor, uid, comm); `interval` 1h (default) or 1d: the
projections keep hourly rows, a day is 24 of them, and 1m is refused (no minute rows:
they would cost the writer 60 times the rows for a timeline few read). `since` and
`until` (RFC 3339, unix seconds, or a duration before now: 30m, 1h, 7d) select the
buckets that overlap [since, until): the hour holding `since` is counted whole. Filters
may name the counted field itself (`type=a&type=b` with `by=type`: those values only,
OR) and `uid` (every projection is keyed by uid too); any other filter is refused,
since a count of one field cannot be narrowed by another.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from auditd.errors import AuditdError
from auditd.projections.definitions import COUNTS_BY_FIELD, NOT_PROJECTED
from auditd.query import spec

INTERVALS: Final = {"1h": 1, "1d": 24}  # in hours
# Filters of /events that /counts does not take (it names them in its 400).
_EVENT_FILTERS: Final = ("type", "actor", "target", "stream", "correlation_id",
                         "causation_id", "comm", "tag", "q")


class BadParameter(AuditdError):
    """`parameter` is wrong; str() says what was expected."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True, slots=True)
class CountsQuery:
    by: str
    interval: str = "1h"
    since_ns: int | None = None
    until_ns: int | None = None
    values: tuple[str, ...] | None = None  # of the counted field (not uid); None: all
    uids: tuple[int, ...] | None = None  # None: every uid the caller may see

    @property
    def hours_per_bucket(self) -> int:
        return INTERVALS[self.interval]

    def restricted_to(self, uid: int | None) -> CountsQuery:
        """As a caller allowed only `uid`'s events runs it (None: no restriction);
        asking for other uids leaves none: the buckets are empty."""
        if uid is None:
            return self
        uids = (uid,) if self.uids is None or uid in self.uids else ()
        return CountsQuery(self.by, self.interval, self.since_ns, self.until_ns,
                           self.values, uids)


def parse_counts(pairs: Iterable[tuple[str, str]], now_ns: int | None = None) -> CountsQuery:
    params = list(pairs)
    single: dict[str, str] = {}
    for name, value in params:
        if name in ("by", "interval", "since", "until"):
            if name in single:
                raise BadParameter(name, f"{name}: given twice; expected one value")
            single[name] = value
    by = single.get("by")
    projected = ", ".join(COUNTS_BY_FIELD)
    if by is None or by == "":
        raise BadParameter("by", f"by: required; expected one of {projected}")
    if by in NOT_PROJECTED:
        raise BadParameter("by", f"by={by}: {NOT_PROJECTED[by]}; projected: {projected}")
    if by not in COUNTS_BY_FIELD:
        raise BadParameter("by", f"by={by!r}: expected one of {projected}")
    interval = single.get("interval", "1h")
    if interval not in INTERVALS:
        raise BadParameter("interval", f"interval={interval!r}: expected 1h or 1d (the "
                           "projections keep hourly counts; there are no minute rows)")
    values: list[str] = []
    uids: list[int] = []
    for name, value in params:
        if name in single:
            continue
        if name == "uid":
            uids.append(_uid(value))
        elif name == by and by != "uid":
            if value == "":
                raise BadParameter(name, f"{name}: expected a non-empty value")
            values.append(value)
        elif name in _EVENT_FILTERS or name.startswith("tag."):
            raise BadParameter(name, f"{name}: /counts?by={by} filters only on {by} and uid "
                               "(a count of one field cannot be narrowed by another)")
        else:
            raise BadParameter(name, f"{name}: unknown parameter; known: by, interval, "
                               f"since, until, uid, and the counted field ({by})")
    now = time.time_ns() if now_ns is None else now_ns
    since = parse_time("since", single["since"], now) if "since" in single else None
    until = parse_time("until", single["until"], now) if "until" in single else None
    if since is not None and until is not None and until <= since:
        raise BadParameter("until", "until: expected a time after since")
    return CountsQuery(by, interval, since, until, tuple(values) if values else None,
                       tuple(uids) if uids else None)


def _uid(value: str) -> int:
    try:
        uid = int(value)
    except ValueError:
        raise BadParameter("uid", f"uid={value!r}: expected an integer") from None
    if not 0 <= uid < 2**32:
        raise BadParameter("uid", f"uid={uid}: expected an integer from 0 to {2**32 - 1}")
    return uid


def parse_time(name: str, value: str, now_ns: int | None = None) -> int:
    """As /events takes `since`/`until` (auditd.query.spec.parse_time): RFC 3339, unix
    seconds, or a duration before now (`30m`, `1h`, `7d`)."""
    try:
        return spec.parse_time(name, value, now_ns)
    except spec.BadQuery as exc:
        raise BadParameter(name, str(exc)) from None


def rfc3339(ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(ns // 10**9, datetime.UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = ns % 10**9
    return f"{text}Z" if not fraction else f"{text}.{fraction:09d}Z"
