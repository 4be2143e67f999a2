"""The status server: the route table on a Unix socket, /metrics alone on optional TCP.

Runner and sites follow aiohttp's web_runner: the application is built once, the
listening sockets are bound by the caller (bind_unix or systemd) and handed in.
Shutdown: stop listening, give in-flight requests a bound, then cancel the sampler.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from auditd.config import parse_listen
from auditd.errors import AuditdError, ConfigError
from auditd.status.access import Forbidden, caller_of, require_admin
from auditd.status.figures import RateSampler
from auditd.status.metrics import MetricsExposition
from auditd.status.replies import Problem, error_reply, reply
from auditd.status.routes import METRICS_ROUTES, ROUTES, Call, Route
from auditd.status.source import ActionRefused, StatusSource

log = structlog.get_logger("auditd.status")

_SHUTDOWN_S = 5.0  # in-flight requests get this long once the daemon stops
_MAX_BODY = 64 * 1024
_AUDIT_LIST_MAX = 100
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StatusServer:
    """Serves the status API for one daemon; `start(sock)` then `aclose()`."""

    def __init__(self, source: StatusSource, routes: Sequence[Route] = ROUTES) -> None:
        self.source = source
        self.routes = routes
        self.sampler = RateSampler(source.stats)
        self.metrics = MetricsExposition(source)
        self._runners: list[web.AppRunner] = []
        self._sampler_task: asyncio.Task[None] | None = None

    async def start(self, sock: socket.socket, metrics_listen: str | None = None) -> None:
        """Serve on the listening Unix socket `sock`; also on TCP when metrics_listen
        (default: config.status.metrics_listen) is not empty."""
        listen = self.source.config.status.metrics_listen if metrics_listen is None \
            else metrics_listen
        try:
            await self._serve(self._app(self.routes), sock=sock)
            if listen:
                host, port = parse_listen(listen)
                if not _is_loopback(host):
                    log.warning("metrics_listen_not_loopback", listen=listen,
                                note="anyone who reaches it can read the metrics")
                try:
                    await self._serve(self._app(METRICS_ROUTES), host=host, port=port)
                except OSError as exc:
                    raise AuditdError(f"status.metrics_listen = {listen!r}: cannot listen: "
                                      f"{exc.strerror or exc}") from exc
        except BaseException:
            await self.aclose()
            raise
        self._sampler_task = asyncio.get_running_loop().create_task(
            self.sampler.run(), name="status_sampler")
        log.info("status_listening", socket=str(sock.getsockname()), metrics=listen or None)

    async def aclose(self) -> None:
        """Stop listening and finish in-flight requests (bounded); reverse order of start."""
        errors: list[BaseException] = []
        for runner in reversed(self._runners):
            try:
                await runner.cleanup()
            except Exception as exc:  # close the other runner regardless
                errors.append(exc)
        self._runners.clear()
        if self._sampler_task is not None:
            self._sampler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler_task
            self._sampler_task = None
        if errors:
            raise errors[0]

    # -- building ------------------------------------------------------------------

    def _app(self, routes: Sequence[Route]) -> web.Application:
        app = web.Application(middlewares=[_json_errors], client_max_size=_MAX_BODY)
        for route in routes:
            app.router.add_route(route.method, route.path, partial(self._dispatch, route))
        return app

    async def _serve(self, app: web.Application, *, sock: socket.socket | None = None,
                     host: str = "", port: int = 0) -> None:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_S,
                               logger=_HTTP_LOG)
        await runner.setup()
        self._runners.append(runner)
        site = web.SockSite(runner, sock) if sock is not None else web.TCPSite(
            runner, host, port)
        await site.start()

    # -- one request ---------------------------------------------------------------

    async def _dispatch(self, route: Route, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        caller = caller_of(sock, self.source.config.status)
        call = Call(request, caller, self.source, self.sampler, self.metrics)
        if route.read is not None:
            return await route.read(call)
        assert route.admin is not None, f"route {route.path} has no handler"
        return await self._admin(route, route.admin, call)

    async def _admin(self, route: Route, handler: Callable[[Call], Awaitable[dict[str, Any]]],
                     call: Call) -> web.StreamResponse:
        """Authorize, run, and record the action whatever its outcome."""
        try:
            operator = require_admin(call.caller)
        except Forbidden as exc:
            if call.caller is not None:
                call.audit = {"attempted": route.action, "outcome": "forbidden"}
                await self._record(call, "denied")
            raise Problem(403, "forbidden", str(exc)) from None
        try:
            result = await handler(call)
        except Exception as exc:
            problem = _as_problem(exc, route.action)
            outcome = "refused" if problem.status < 500 else "failed"
            call.audit = _bounded({**call.audit, "outcome": outcome,
                                   "message": problem.message})
            await self._record(call, route.action)
            log.warning("admin_action", action=route.action, outcome=outcome,
                        reason=problem.message, uid=operator.uid, pid=operator.pid,
                        comm=operator.comm)
            raise problem from exc
        call.audit = _bounded({**call.audit, "outcome": "ok", "result": result})
        recorded = await self._record(call, route.action)
        log.info("admin_action", action=route.action, outcome="ok", uid=operator.uid,
                 pid=operator.pid, comm=operator.comm)
        if recorded != "recorded":
            result = {**result, "audit": _AUDIT_NOTES[recorded]}
        return reply(result)

    async def _record(self, call: Call, action: str) -> str:
        """"recorded", "queued" (ingest cannot take it now; it is kept and recorded
        later), "suppressed" (the queue is full: counted) or "failed"; bounded, so that an
        admin call answers while ingest refuses."""
        caller = call.caller
        assert caller is not None
        try:
            recorded = await self.source.record_admin(
                action, caller.uid, caller.gid, caller.pid, caller.comm, call.audit)
        except Exception as exc:  # the action stands; the operator and the log are told
            log.error("admin_event_failed", action=action, uid=caller.uid, error=str(exc))
            return "failed"
        return recorded


_AUDIT_NOTES = {
    "queued": "ingest is not accepting events now; the admin event is queued and recorded "
              "as soon as it does",
    "suppressed": "ingest is not accepting events now and the admin events queued meanwhile "
                  "are at their bound; this one is counted in an auditd.admin.suppressed "
                  "event and logged in full",
    "failed": "the admin event could not be recorded; see the log",
}


def _bounded(value: Any, most: int = _AUDIT_LIST_MAX) -> Any:
    """The value with long lists cut short: an admin event must stay a small event."""
    if isinstance(value, dict):
        return {key: _bounded(item, most) for key, item in value.items()}
    if isinstance(value, list) and len(value) > most:
        return [*value[:most], f"... {len(value) - most} more"]
    return value


def _as_problem(exc: Exception, action: str) -> Problem:
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, web.HTTPException):  # e.g. 413 from reading an oversized body
        return Problem(exc.status, _HTTP_CODES.get(exc.status, "http_error"),
                       exc.text or exc.reason)
    if isinstance(exc, ConfigError):
        return Problem(400, "invalid_config", str(exc))
    if isinstance(exc, ActionRefused):
        return Problem(409, "refused", str(exc))
    if isinstance(exc, AuditdError):
        return Problem(500, "failed", str(exc))
    if isinstance(exc, OSError):
        return Problem(500, "failed", f"{exc.strerror or exc}")
    log.exception("status_handler_failed", action=action)
    return Problem(500, "internal", f"{action} failed unexpectedly; see the daemon log")


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Every error leaves as {"error", "message"}; aiohttp's HTML pages and tracebacks never."""
    try:
        return await handler(request)
    except Problem as exc:
        return error_reply(exc.status, exc.error, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_reply(exc.status, _HTTP_CODES.get(exc.status, "http_error"),
                           _http_message(request, exc))
    except Exception:
        log.exception("status_request_failed", method=request.method, path=request.path)
        return error_reply(500, "internal", "the request failed unexpectedly; see the "
                           "daemon log")


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


class _RefusedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (a 9 KB request line, a bad header) with a
    traceback; that is the caller's mistake, answered 400 before any route runs: one
    structured line instead. Anything else aiohttp logs keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            log.warning("status_request_refused", status=exc.code, reason=exc.message)
            return False
        return True


_HTTP_LOG = logging.getLogger("auditd.status.http")
_HTTP_LOG.addFilter(_RefusedRequests())


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no such endpoint: {request.method} {request.path}"
    if exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        return f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
    return exc.text or exc.reason


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: not resolved here, so not assumed private
