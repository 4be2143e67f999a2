"""The route table and its handlers.

A route names its method, path, handler and whether it is an admin action; the
server registers the table and does access control and auditing around every
handler, so a later table (/events, /streams/{stream}, /correlations/{id}, /tail)
is added by appending `Route`s whose handlers read `call.caller.uid_filter`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import msgspec
from aiohttp import web

from auditd.ingest import depth
from auditd.lifecycle import origins
from auditd.projections.params import BadParameter, parse_counts
from auditd.proofs.prove import ProofError
from auditd.query.feed import FeedRefused
from auditd.query.follow import FollowSession, parse_tail
from auditd.query.spec import BadQuery, QuerySpec
from auditd.schema import StoredEvent
from auditd.status.access import Caller
from auditd.status.events import get_correlation, get_event, get_events, get_stream
from auditd.status.figures import RateSampler, stats_document
from auditd.status.health import evaluate, inputs_from
from auditd.status.metrics import MetricsExposition
from auditd.status.replies import Problem, reply
from auditd.status.source import StatusSource

DLQ_DEFAULT_LIMIT = 100
DLQ_MAX_LIMIT = 1000
T = TypeVar("T")


@dataclass(slots=True)
class Call:
    """One request as a handler sees it."""

    request: web.Request
    caller: Caller | None  # None on the TCP metrics listener
    source: StatusSource
    sampler: RateSampler
    metrics: MetricsExposition
    # What an admin handler asked for, recorded in the auditd.admin.* event.
    audit: dict[str, Any] = field(default_factory=dict)


ReadHandler = Callable[[Call], Awaitable[web.StreamResponse]]
AdminHandler = Callable[[Call], Awaitable[dict[str, Any]]]


@dataclass(slots=True, frozen=True)
class Route:
    method: str
    path: str
    read: ReadHandler | None = None  # answers the request itself
    admin: AdminHandler | None = None  # returns the result body; needs an admin uid
    action: str = ""  # the admin event's name: auditd.admin.<action>


# -- reads ---------------------------------------------------------------------------


async def get_health(call: Call) -> web.StreamResponse:
    health = evaluate(inputs_from(call.source))
    return reply(health.document(), health.http_status)


async def get_stats(call: Call) -> web.StreamResponse:
    return reply(stats_document(call.source, call.sampler))


async def get_metrics(call: Call) -> web.StreamResponse:
    body, content_type = call.metrics.render(call.request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def get_dlq(call: Call) -> web.StreamResponse:
    query = call.request.query
    limit = _int_param(query.get("limit"), "limit", 1, DLQ_MAX_LIMIT)
    limit = DLQ_DEFAULT_LIMIT if limit is None else limit
    after = _int_param(query.get("after"), "after", 0, None)
    # Others' dead letters hold their raw events: a plain user sees only its own, and a
    # caller without credentials (a TCP listener) nothing.
    if call.caller is None:
        raise Problem(403, "forbidden", "dead letters are served only on the status socket")
    entries = await call.source.dlq_list(limit, after, call.caller.uid_filter)
    following = entries[-1].get("id") if len(entries) == limit else None
    return reply({"dead_letters": entries, "next": following})


async def get_counts(call: Call) -> web.StreamResponse:
    """Counts per bucket from the projections; a non-reader's from its own uid's rows."""
    try:
        query = parse_counts(call.request.query.items())
    except BadParameter as exc:
        raise Problem(400, "bad_request", str(exc)) from None
    document = await call.source.projection_counts(query, _uid_filter(call))
    buckets = document.pop("buckets_json")
    # The buckets come as JSON text from SQLite: spliced in, never decoded and encoded
    # again (thousands of them for a month by the hour).
    head = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    return web.Response(text=f'{head[:-1]},"buckets":{buckets}}}',
                        content_type="application/json")


async def get_actor(call: Call) -> web.StreamResponse:
    """An actor's summary; 404 when the caller may see none of its events (another
    uid's actor is absent to a non-reader, so its existence does not leak)."""
    actor = call.request.match_info["actor"]
    summary = await call.source.actor_summary(actor, _uid_filter(call))
    if summary is None:
        raise Problem(404, "not_found", f"actor {actor!r}: no events")
    return reply(summary)


async def get_projections(call: Call) -> web.StreamResponse:
    return reply({"last_committed_seq": call.source.stats.last_committed_seq,
                  "projections": call.source.gauges().projections})


async def get_checkpoint(call: Call) -> web.StreamResponse:
    text = call.source.checkpoint_text()
    if text is None:
        raise Problem(404, "no_checkpoint", "no checkpoint has been issued yet")
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def get_inclusion_proof(call: Call) -> web.StreamResponse:
    """A non-reader gets proofs of its own events only (403 for another's)."""
    raw = call.request.match_info["seq"]
    seq = _int_param(raw, "seq", 1, 2**63 - 1)
    size = _int_param(call.request.query.get("size"), "size", 1, 2**63 - 1)
    assert seq is not None
    try:
        return reply(await call.source.proof(seq, size, _uid_filter(call)))
    except ProofError as exc:
        raise Problem(exc.status, exc.code, str(exc)) from None


async def get_consistency_proof(call: Call) -> web.StreamResponse:
    query = call.request.query
    old = _int_param(query.get("from"), "from", 1, 2**63 - 1)
    new = _int_param(query.get("to"), "to", 1, 2**63 - 1)
    if old is None or new is None:
        raise Problem(400, "bad_request", "from and to are required: two checkpoint sizes")
    _uid_filter(call)
    try:
        return reply(await call.source.consistency_proof(old, new))
    except ProofError as exc:
        raise Problem(exc.status, exc.code, str(exc)) from None


def _uid_filter(call: Call) -> int | None:
    # A caller without credentials (the TCP listener serves /metrics only) sees nothing.
    if call.caller is None:
        raise Problem(403, "forbidden", "events are served only on the status socket")
    return call.caller.uid_filter
async def get_tail(call: Call) -> web.StreamResponse:
    """The last N events (or those after a seq), then, with follow=1, each new one."""
    if call.caller is None:
        raise Problem(403, "forbidden", "events are served only on the status socket")
    try:
        tail = parse_tail(call.request.query, call.caller.uid_filter)
    except BadQuery as exc:
        raise Problem(400, "bad_request", str(exc)) from None
    engine = call.source.events

    async def read(spec: QuerySpec) -> list[StoredEvent]:
        return (await engine.query(spec)).events

    session = FollowSession(call.request, tail, call.source.feed, read)
    try:
        return await session.run()
    except FeedRefused as exc:  # before the response began
        raise Problem(503, "unavailable", str(exc)) from None


# -- admin actions -------------------------------------------------------------------


# A dead-letter id is a SQLite rowid: 1 .. 2**63 - 1 (a larger int cannot be bound).
DlqId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]


class Selection(msgspec.Struct, forbid_unknown_fields=True):
    ids: list[DlqId] | None = None
    all: bool = False


class ReloadRequest(msgspec.Struct, forbid_unknown_fields=True):
    pass


class RecoverRequest(msgspec.Struct, forbid_unknown_fields=True):
    path: str


class BackupRequest(msgspec.Struct, forbid_unknown_fields=True):
    dest: str


class RebuildRequest(msgspec.Struct, forbid_unknown_fields=True):
    name: str


async def post_projection_rebuild(call: Call) -> dict[str, Any]:
    request = await _body(call, RebuildRequest)
    if request is None:
        raise Problem(400, "bad_request", 'the body must be {"name": "PROJECTION"}')
    call.audit["name"] = request.name
    return await call.source.rebuild_projection(request.name)


async def post_dlq_retry(call: Call) -> dict[str, Any]:
    ids = await _selection(call)
    return await call.source.dlq_retry(ids)


async def post_dlq_drop(call: Call) -> dict[str, Any]:
    ids = await _selection(call)
    return await call.source.dlq_drop(ids)


async def post_reload(call: Call) -> dict[str, Any]:
    await _body(call, ReloadRequest)  # takes no arguments; a stray one is an error
    call.audit["config"] = call.source.config.source or "defaults"
    return await call.source.reload()


async def post_backup(call: Call) -> dict[str, Any]:
    request = await _body(call, BackupRequest)
    if request is None:
        raise Problem(400, "bad_request", 'the body must be {"dest": "/absolute/path"}')
    call.audit["dest"] = request.dest
    if not os.path.isabs(request.dest):
        raise Problem(400, "bad_request", f"dest {request.dest!r} must be an absolute path: "
                      "the daemon's working directory is not the caller's")
    return await call.source.backup(request.dest)


async def post_recover(call: Call) -> dict[str, Any]:
    request = await _body(call, RecoverRequest)
    if request is None or not os.path.isabs(request.path):
        raise Problem(400, "bad_request", 'the body must be {"path": "/absolute/damaged.db"}')
    call.audit["path"] = request.path
    return await call.source.recover(request.path)


async def post_checkpoint(call: Call) -> dict[str, Any]:
    await _body(call, ReloadRequest)  # takes no arguments
    result = await call.source.issue_checkpoint()
    call.audit["size"] = result["size"]
    return result


class VacuumRequest(msgspec.Struct, forbid_unknown_fields=True):
    dry_run: bool = False


async def post_vacuum(call: Call) -> dict[str, Any]:
    body = await _body(call, VacuumRequest) or VacuumRequest()
    result = await call.source.vacuum(body.dry_run)
    call.audit["dry_run"] = body.dry_run
    call.audit["deleted"] = [[d["first_seq"], d["last_seq"]]
                             for d in result.get("deleted", []) if d["kind"] == "partition"]
    return result


async def get_import_origins(call: Call) -> web.StreamResponse:
    """{"host", "runs": [[first, last], ...]}: the seqs at `host` imported here (what a
    re-run of an import skips). For callers who may read every event."""
    if _uid_filter(call) is not None:
        raise Problem(403, "forbidden", "origins are for admins and readers")
    host = call.request.query.get("host")
    if not host:
        raise Problem(400, "bad_request", "host: required (the origin host id)")
    return reply({"host": host, "runs": await call.source.events.origin_runs(host)})


async def post_import_origins(call: Call) -> dict[str, Any]:
    """A large body (20,000 origins a post): read past the app's 64 KiB bodies, bounded."""
    raw = bytearray()
    async for chunk in call.request.content.iter_chunked(1 << 16):
        raw += chunk
        if len(raw) > origins.MAX_BODY:
            raise Problem(413, "too_large", f"the body is over {origins.MAX_BODY} bytes")
    try:
        request = msgspec.json.decode(bytes(raw), type=origins.OriginsRequest)
    except msgspec.DecodeError as exc:  # ValidationError too: it names the field
        raise Problem(400, "bad_request", f"the body does not fit: {exc}") from None
    call.audit.update(host=request.host, origins=len(request.origins))
    return await call.source.record_origins(request.host, request.origins)


async def _selection(call: Call) -> list[int] | None:
    """{"ids": [...]} -> those ids; {"all": true} -> None (every entry)."""
    selection = await _body(call, Selection)
    if selection is None or (selection.ids is None) == (not selection.all):
        raise Problem(400, "bad_request",
                      'the body must be {"ids": [ID, ...]} or {"all": true}, not both')
    if selection.ids is not None:
        if not selection.ids:
            raise Problem(400, "bad_request", "ids is empty; to select everything send "
                          '{"all": true}')
        call.audit["ids"] = selection.ids
        return selection.ids
    call.audit["all"] = True
    return None


async def _body(call: Call, kind: type[T]) -> T | None:
    """The JSON body decoded into `kind`; None when there is no body."""
    raw = await call.request.read()
    if not raw.strip():
        return None
    if not depth.json_within(raw):  # msgspec's JSON decoder recurses once per level
        raise Problem(400, "bad_request",
                      f"the body is nested deeper than {depth.MAX_DEPTH} levels")
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:  # first: a subclass of DecodeError
        raise Problem(400, "bad_request", f"the body does not fit: {exc}") from None
    except msgspec.DecodeError as exc:
        raise Problem(400, "bad_request", f"the body is not valid JSON: {exc}") from None


def _int_param(value: str | None, name: str, low: int, high: int | None) -> int | None:
    """A query parameter as an int within bounds; None when absent."""
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise Problem(400, "bad_request", f"{name}={value!r}: expected an integer") from None
    if number < low or (high is not None and number > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise Problem(400, "bad_request", f"{name}={number}: expected an integer {bounds}")
    return number


ROUTES: tuple[Route, ...] = (
    Route("GET", "/health", read=get_health),
    Route("GET", "/stats", read=get_stats),
    Route("GET", "/metrics", read=get_metrics),
    Route("GET", "/dlq", read=get_dlq),
    Route("GET", "/events", read=get_events),
    # `.+`: ids, stream names and correlation ids may hold a "/" (sent as %2F).
    Route("GET", "/events/{key:.+}", read=get_event),
    Route("GET", "/streams/{stream:.+}", read=get_stream),
    Route("GET", "/correlations/{correlation:.+}", read=get_correlation),
    Route("GET", "/tail", read=get_tail),
    Route("POST", "/dlq/retry", admin=post_dlq_retry, action="dlq.retry"),
    Route("POST", "/dlq/drop", admin=post_dlq_drop, action="dlq.drop"),
    Route("POST", "/reload", admin=post_reload, action="reload"),
    Route("POST", "/backup", admin=post_backup, action="backup"),
    Route("POST", "/recover", admin=post_recover, action="recover"),
    Route("POST", "/checkpoint", admin=post_checkpoint, action="checkpoint"),
    Route("POST", "/vacuum", admin=post_vacuum, action="vacuum"),
    Route("POST", "/import/origins", admin=post_import_origins, action="import"),
    Route("GET", "/import/origins", read=get_import_origins),
    Route("GET", "/counts", read=get_counts),
    Route("GET", "/actors/{actor:.+}", read=get_actor),  # an actor may hold a "/"
    Route("GET", "/projections", read=get_projections),
    Route("GET", "/checkpoint", read=get_checkpoint),
    Route("GET", "/proofs/consistency", read=get_consistency_proof),
    Route("GET", "/proofs/{seq}", read=get_inclusion_proof),
    Route("POST", "/projections/rebuild", admin=post_projection_rebuild,
          action="projections.rebuild"),
)

# The TCP listener (status.metrics_listen) has no peer credentials: only this.
METRICS_ROUTES: tuple[Route, ...] = (Route("GET", "/metrics", read=get_metrics),)
