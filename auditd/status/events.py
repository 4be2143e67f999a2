"""The event read endpoints: /events, /events/{seq or id}, /streams/{stream},
/correlations/{id}.

A caller who may not read every uid's events (`call.caller.uid_filter`) has its query
restricted to its own uid, and a single event of another uid answers 404 like an
absent one, so that existence does not leak.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from auditd.query.engine import Page
from auditd.query.rows import event_json, rfc3339
from auditd.query.spec import MAX_LIMIT, BadQuery, QuerySpec, parse_query
from auditd.schema import StoredEvent
from auditd.status.replies import Problem, reply

if TYPE_CHECKING:
    from auditd.status.routes import Call

_STREAM_PARAMETERS = ("from", "to", "limit")


def _uid_filter(call: Call) -> int | None:
    if call.caller is None:
        raise Problem(403, "forbidden", "events are served only on the status socket")
    return call.caller.uid_filter


def _bad(exc: BadQuery) -> Problem:
    return Problem(400, "bad_request", str(exc))


async def _with_origins(call: Call, events: list[StoredEvent]) -> list[dict[str, Any]]:
    """The events' JSON, an imported one's with its origin (interfaces.md)."""
    shown = [event_json(e) for e in events]
    if events:
        origins = await call.source.events.origins([e.seq for e in events])
        for doc in shown:
            origin = origins.get(doc["seq"])
            if origin is not None:
                doc.update(origin_host=origin[0], origin_seq=origin[1],
                           origin_received_at=rfc3339(origin[2]))
    return shown


async def _events_reply(call: Call, events: list[StoredEvent], extra: dict[str, Any],
                        page: Page | None = None) -> web.Response:
    response = reply({"events": await _with_origins(call, events), **extra})
    if page is not None:  # what `auditd bench --query` reads
        response.headers["X-Query-Ms"] = f"{page.ms:.3f}"
        response.headers["X-Query-Cpu-Ms"] = f"{page.cpu_ms:.3f}"
    return response


async def get_events(call: Call) -> web.StreamResponse:
    uid = _uid_filter(call)
    try:
        spec = parse_query(call.request.query, allow=("origin_host",))
    except BadQuery as exc:
        raise _bad(exc) from None
    hosts = call.request.query.getall("origin_host", [])
    if hosts:
        spec = spec.replace(origin_hosts=tuple(dict.fromkeys(hosts)))
    page = await call.source.events.query(spec.restricted_to(uid))
    return await _events_reply(call, page.events, {"next": page.next}, page)


async def get_event(call: Call) -> web.StreamResponse:
    uid = _uid_filter(call)
    key = call.request.match_info["key"]
    engine = call.source.events
    event = await engine.event(int(key)) if key.isdigit() and len(key) < 19 else None
    if event is None:
        event = await engine.event_by_id(key)
    if event is None or (uid is not None and event.uid != uid):
        raise Problem(404, "not_found", f"no event with seq or id {key!r}")
    return reply((await _with_origins(call, [event]))[0])


def _int(call: Call, name: str, default: int, low: int, high: int) -> int:
    value = call.request.query.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise Problem(400, "bad_request", f"{name}={value!r}: expected an integer") from None
    if not low <= number <= high:
        raise Problem(400, "bad_request",
                      f"{name}={number}: expected an integer from {low} to {high}")
    return number


async def get_stream(call: Call) -> web.StreamResponse:
    uid = _uid_filter(call)
    for name in call.request.query:
        if name not in _STREAM_PARAMETERS:
            raise Problem(400, "bad_request", f"{name}: unknown parameter; known: "
                          f"{', '.join(_STREAM_PARAMETERS)}")
    first = _int(call, "from", 1, 0, 2**63 - 1)
    last = _int(call, "to", 2**63 - 1, 0, 2**63 - 1)
    limit = _int(call, "limit", 100, 1, MAX_LIMIT)
    stream = call.request.match_info["stream"]
    events = await call.source.events.stream(stream, first, last, limit, uid)
    following = None
    if len(events) == limit and events[-1].stream_seq is not None:
        following = events[-1].stream_seq + 1
    return await _events_reply(call, events, {"stream": stream, "next": following})


async def get_correlation(call: Call) -> web.StreamResponse:
    uid = _uid_filter(call)
    for name in call.request.query:
        if name != "limit":
            raise Problem(400, "bad_request", f"{name}: unknown parameter; known: limit")
    correlation = call.request.match_info["correlation"]
    limit = _int(call, "limit", MAX_LIMIT, 1, MAX_LIMIT)
    spec = QuerySpec(values={"correlation_id": (correlation,)}, limit=limit)
    page = await call.source.events.query(spec.restricted_to(uid))
    return await _events_reply(call, page.events,
                               {"correlation_id": correlation, "next": page.next}, page)
