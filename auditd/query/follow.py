"""GET /tail: the last N events or those after a seq, then (follow=1) every new one.

One `FollowSession` per request writes newline-delimited JSON: each event's line
carries its `seq`; `{"heartbeat": <unix seconds>}` goes out after `heartbeat_s`
without a line; a final `{"error": ..., "message": ..., "last_seq": N}` says why the
stream ends when the daemon ends it (a slow reader, the daemon stopping). `last_seq`
is the seq through which the client has been sent every matching event: resuming
with `after=last_seq` misses nothing and repeats nothing, across a restart too.

Catching up (after=SEQ) reads the store in pages until a page comes back short, and
only then subscribes to the commit feed: a long catch-up holds no feed memory. A
last pass reads the store once more up to the subscription's start_seq; from there
the feed carries every seq. Seqs at or below the session's position are dropped, so
the overlap between the last page and the feed is never written twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.http_writer import StreamWriter

from auditd.query.batches import EVERY_EVENT, Selector
from auditd.query.feed import (
    DAEMON_STOPPING,
    SLOW_READER,
    CommitFeed,
    FeedRefused,
    Subscription,
)
from auditd.query.lines import control_line, event_line
from auditd.query.spec import (
    MAX_LIMIT,
    TEXT_FILTERS,
    BadQuery,
    QuerySpec,
    bounded_int,
    matches,
    parse_query,
)
from auditd.schema import StoredEvent

log = structlog.get_logger("auditd.query.follow")
DEFAULT_N = 10
# Events a catch-up read asks the store for: a session whose client stops reading
# holds one page, so 256 stuck sessions hold about 256 x 200 events.
PAGE = 200
HEARTBEAT_S = 10.0
CHUNK_BYTES = 64 * 1024  # lines written at once, at most (one line may be larger)
CUT_GRACE_S = 10.0  # a cut follower has this long to read its final line
STOP_GRACE_S = 1.0  # the same while the daemon stops
_OWN = ("follow", "n", "heartbeat_s")
_REFUSED = ("before", "limit", "order")  # /events' paging: not a tail's
_FINAL_MESSAGES = {
    SLOW_READER: "the client read too slowly to keep up with commits; reconnect with "
                 "after={seq} to go on from here",
    DAEMON_STOPPING: "the daemon is stopping; reconnect with after={seq} once it is back",
    "internal": "the stream failed unexpectedly (see the daemon log); reconnect with "
                "after={seq}",
}

PageReader = Callable[[QuerySpec], Awaitable[list[StoredEvent]]]


@dataclass(frozen=True, slots=True)
class TailRequest:
    spec: QuerySpec  # the filters, restricted to what the caller may read
    follow: bool
    n: int | None  # start with the last n (None: after `spec.after`)
    heartbeat_s: float


def parse_tail(params: Mapping[str, str], uid_filter: int | None) -> TailRequest:
    """The request's parameters; BadQuery names the first bad one."""
    for name in _REFUSED:
        if name in params:
            raise BadQuery(name, f"{name}: not a /tail parameter; /tail takes n=N or "
                           "after=SEQ (use /events to page)")
    names = [name for name, _ in params.items()]
    for name in _OWN:
        if names.count(name) > 1:
            raise BadQuery(name, f"{name}: given twice; expected one value")
    follow = _flag("follow", params.get("follow", "0"))
    spec = parse_query(params, allow=_OWN).restricted_to(uid_filter)
    n: int | None = None
    if "n" in params:
        if spec.after is not None:
            raise BadQuery("n", "n: give n=N or after=SEQ, not both")
        n = bounded_int("n", params["n"], 0, MAX_LIMIT)
    elif spec.after is None:
        n = DEFAULT_N
    heartbeat = HEARTBEAT_S
    if "heartbeat_s" in params:  # not in interfaces.md: for tests, which cannot wait 10 s
        try:
            heartbeat = float(params["heartbeat_s"])
        except ValueError:
            heartbeat = -1.0
        if not 0.05 <= heartbeat <= 3600:
            raise BadQuery("heartbeat_s", f"heartbeat_s={params['heartbeat_s']!r}: "
                           "expected seconds from 0.05 to 3600")
    return TailRequest(spec, follow, n, heartbeat)


def _flag(name: str, value: str) -> bool:
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise BadQuery(name, f"{name}={value!r}: expected 1 or 0")


def feed_key(spec: QuerySpec) -> Hashable:
    """Equal for specs that select the same events (the feed shares their matching)."""
    return (tuple(sorted(spec.values.items())), spec.uids, spec.words, spec.prefixes,
            spec.since_ns, spec.until_ns)


def selector_of(spec: QuerySpec) -> Selector:
    """The feed's selector for a spec's filters (its seq range aside): equality on the
    indexed fields, and `matches` only for what those cannot say (tags, words, time)."""
    equal: list[tuple[str, frozenset[Any]]] = [
        (name, frozenset(spec.values[name])) for name in TEXT_FILTERS if name in spec.values]
    if spec.uids is not None:
        equal.append(("uid", frozenset(spec.uids)))
    rest = "tag" in spec.values or spec.words or spec.prefixes \
        or spec.since_ns is not None or spec.until_ns is not None
    if not equal and not rest:
        return EVERY_EVENT
    filters = spec.replace(after=None, before=None)
    predicate = (lambda event: matches(event, filters)) if rest else None
    return Selector(feed_key(spec), tuple(equal), predicate)


class _LineStream(web.StreamResponse):
    """A streamed body whose writes never wait for the client by themselves: the
    session decides when to wait, and for what (a write that waited in aiohttp's drain
    could not see a cut meanwhile; a task per write to race it cost the loop)."""

    async def write_buffered(self, data: bytes) -> None:
        writer = self._payload_writer
        assert isinstance(writer, StreamWriter), "prepare() first"
        await writer.write(data, drain=False)

    async def drained(self) -> None:
        """Until the transport's buffer is back under its low-water mark."""
        assert self._payload_writer is not None, "prepare() first"
        await self._payload_writer.drain()


class _Ended(Exception):
    """The stream ends: `reason` is a final line's error, or None for a plain end."""

    def __init__(self, reason: str | None) -> None:
        self.reason = reason


class FollowSession:
    """One /tail response. run() writes until the end; the feed's session count and the
    subscription are released whatever happens (cancellation included)."""

    def __init__(self, request: web.Request, tail: TailRequest, feed: CommitFeed,
                 read: PageReader) -> None:
        self.request = request
        self.tail = tail
        self.feed = feed
        self.read = read
        # Filters alone: seqs are the session's business (its position), not the spec's.
        self.filters = tail.spec.replace(after=None, before=None, descending=False)
        self.position = 0  # every matching event through this seq has been written
        self.response = _LineStream(
            headers={"Content-Type": "application/x-ndjson",
                     "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
        self._subscription: Subscription | None = None
        self._stalled: asyncio.Task[None] | None = None  # a write waiting for the client
        self._last_line = time.monotonic()

    async def run(self) -> web.StreamResponse:
        self.feed.open_session()  # FeedRefused: the route answers 503
        try:
            await self.response.prepare(self.request)
            reason: str | None = None
            try:
                await self._stream()
            except _Ended as ended:
                reason = ended.reason
            except FeedRefused:  # the daemon began to stop while this one caught up
                reason = DAEMON_STOPPING
            except ConnectionError:
                return self.response  # the client left: nobody to tell
            except Exception as exc:  # the body has begun: end it with a final line
                log.exception("tail_failed", error=str(exc))
                reason = "internal"
            await self._finish(reason)
        finally:
            if self._subscription is not None:
                self._subscription.close()
            if self._stalled is not None:
                self._stalled.cancel()
            self.feed.close_session()
        return self.response

    async def _stream(self) -> None:
        tail, feed = self.tail, self.feed
        if tail.n is None:
            self.position = tail.spec.after or 0
            await self._pages(through=None if tail.follow else feed.last_seq)
            if not tail.follow:
                return
            self._subscription = feed.subscribe(selector_of(self.filters))
            await self._pages(through=self._subscription.start_seq)
        else:
            if tail.follow:
                self._subscription = feed.subscribe(selector_of(self.filters))
                through = self._subscription.start_seq
            else:
                through = feed.last_seq
            await self._last(tail.n, through)
            if not tail.follow:
                return
        await self._live()

    async def _last(self, n: int, through: int) -> None:
        """The last `n` matching events up to `through`, oldest first."""
        if n:
            page = await self.read(self.filters.replace(before=through + 1, limit=n,
                                                        descending=True))
            await self._write_events(sorted(page, key=lambda event: event.seq))
        self.position = max(self.position, through)

    async def _pages(self, through: int | None) -> None:
        """Matching events after the position, up to `through` (None: until a page
        comes back short), page by page; the position ends at `through` when given."""
        while True:
            if self.feed.closed:
                raise _Ended(DAEMON_STOPPING)
            page = await self.read(self.filters.replace(after=self.position, limit=PAGE))
            wanted = [e for e in page if through is None or e.seq <= through]
            await self._write_events(wanted)
            if len(page) < PAGE or len(wanted) < len(page):
                break
        if through is not None:
            self.position = max(self.position, through)

    async def _live(self) -> None:
        subscription = self._subscription
        assert subscription is not None
        # From here the feed carries exactly the seqs after the position: the catch-up
        # stopped at the subscription's start_seq, and the feed begins after it.
        heartbeat, feed = self.tail.heartbeat_s, self.feed
        while True:
            gap = self._last_line + feed.write_gap() - time.monotonic()
            if gap > 0.001:  # many followers: let batches gather rather than wake often
                await asyncio.sleep(gap)
            wait = self._last_line + heartbeat - time.monotonic()
            if wait > 0:
                await subscription.wait(wait)
            self.position = max(self.position, subscription.covered_seq)
            if subscription.ended.done():
                raise _Ended(subscription.ended.result())
            self._check_connected()
            pieces = subscription.take(CHUNK_BYTES)
            self.position = max(self.position, subscription.covered_seq)
            if pieces:
                await self._write(pieces[0] if len(pieces) == 1 else b"".join(pieces))
                if subscription.oldest_taken is not None:
                    feed.delivery_ms.observe(
                        (time.monotonic() - subscription.oldest_taken) * 1000)
                    subscription.oldest_taken = None
            elif time.monotonic() - self._last_line >= heartbeat:
                await self._write(control_line({"heartbeat": int(time.time())}))

    async def _write_events(self, events: list[StoredEvent]) -> None:
        chunk: list[bytes] = []
        size = 0
        for event in events:
            if event.seq <= self.position:
                continue
            line = event_line(event)
            chunk.append(line)
            size += len(line)
            self.position = event.seq
            if size >= CHUNK_BYTES:
                await self._write(b"".join(chunk))
                chunk, size = [], 0
        if chunk:
            await self._write(b"".join(chunk))

    async def _write(self, data: bytes) -> None:
        """Hand `data` to the connection; while the client does not read (the buffer
        over its high-water mark), wait for it or for the end (a cut, the daemon
        stopping), whichever comes first. The data is in the transport's buffer either
        way, ahead of any final line."""
        transport = self._check_connected()
        self._last_line = time.monotonic()
        await self.response.write_buffered(data)  # the kernel usually takes it at once
        _, high = transport.get_write_buffer_limits()
        if transport.get_write_buffer_size() <= high:
            return
        ended = self._subscription.ended if self._subscription is not None \
            else self.feed.stopped()
        drained = asyncio.ensure_future(self.response.drained())
        await asyncio.wait((drained, ended), return_when=asyncio.FIRST_COMPLETED)
        if drained.done():
            drained.result()
            return
        self._stalled = drained
        raise _Ended(ended.result() if self._subscription is not None else DAEMON_STOPPING)

    def _check_connected(self) -> asyncio.WriteTransport:
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise _Ended(None)  # the client left: nobody to tell
        # uvloop's transports have the methods without being asyncio's subclasses.
        return cast(asyncio.WriteTransport, transport)

    async def _finish(self, reason: str | None) -> None:
        """The final line when the daemon ends the stream, then the end of the body;
        a client that does not read them within the grace is dropped."""
        if self._stalled is not None:  # its data is in the buffer; the wait is ours now
            self._stalled.cancel()
            self._stalled = None
        transport = self.request.transport
        if transport is None or transport.is_closing():
            return
        if reason == "closed":
            reason = None
        if reason is not None:
            self.response.force_close()
        grace = STOP_GRACE_S if self.feed.closed else CUT_GRACE_S
        try:
            async with asyncio.timeout(grace):
                if reason is not None:
                    message = _FINAL_MESSAGES.get(reason, reason).format(seq=self.position)
                    await self.response.write(control_line(
                        {"error": reason, "message": message, "last_seq": self.position}))
                await self.response.write_eof()
        except TimeoutError:
            transport.abort()
        except ConnectionError:
            pass  # the client left meanwhile
