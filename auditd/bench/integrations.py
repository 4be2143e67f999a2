"""What a logging call, a structlog call and an audit() block cost the caller.

    python -m auditd.bench.integrations [--calls N] [--json]

Each integration is timed call by call (perf_counter_ns around the call) against a
throw-away daemon in three states: `up` (serving), `stalled` (SIGSTOP: it accepts
nothing and answers nothing) and `down` (no daemon: nothing listens on the socket).
It prints p50, p99, p99.9 and the largest single call in microseconds, how many calls
were dropped, and for `up` how fast the sender delivered (calls/s until flush()
returned); `baseline` is the same logging or structlog call without auditd (a
NullHandler; a processor chain that drops the event), what the library costs alone.
The largest call is the bound a caller sees; the tests assert the behaviour (calls
return, drops are counted), these figures say how long it takes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from auditd.bench.daemon import ThrowawayDaemon
from auditd.bench.micro import percentile
from auditd.client import AuditHandler, AuditProcessor, BufferedSender, audit
from auditd.config import Config

Call = Callable[[int], None]


def _handler_calls(sender: BufferedSender) -> Iterator[Call]:
    logger = logging.getLogger("bench.integrations")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = AuditHandler(sender=sender)
    logger.addHandler(handler)
    try:
        yield lambda n: logger.info("request %d served", n,
                                    extra={"actor": "alice", "path": "/api/items", "ms": 3.5})
    finally:
        logger.removeHandler(handler)


def _processor_calls(sender: BufferedSender) -> Iterator[Call]:
    log = structlog.wrap_logger(structlog.ReturnLogger(), processors=[
        structlog.processors.add_log_level, AuditProcessor(sender=sender, drop=True)])
    yield lambda n: log.info("request served", n=n, actor="alice", path="/api/items", ms=3.5)


def _audit_calls(sender: BufferedSender) -> Iterator[Call]:
    def call(n: int) -> None:
        with audit("deploy.app", target="/srv/app", actor="alice", sender=sender, n=n):
            pass
    yield call


def _logging_baseline(sender: BufferedSender) -> Iterator[Call]:
    """The same call with a NullHandler: what stdlib logging costs by itself."""
    logger = logging.getLogger("bench.integrations.baseline")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.NullHandler())
    yield lambda n: logger.info("request %d served", n,
                                extra={"actor": "alice", "path": "/api/items", "ms": 3.5})


def _structlog_baseline(sender: BufferedSender) -> Iterator[Call]:
    log = structlog.wrap_logger(structlog.ReturnLogger(), processors=[
        structlog.processors.add_log_level, _drop])
    yield lambda n: log.info("request served", n=n, actor="alice", path="/api/items", ms=3.5)


def _drop(logger: Any, method_name: str, event_dict: Any) -> Any:
    raise structlog.DropEvent


BASELINES: dict[str, Callable[[BufferedSender], Iterator[Call]]] = {
    "logging": _logging_baseline, "structlog": _structlog_baseline}
INTEGRATIONS: dict[str, Callable[[BufferedSender], Iterator[Call]]] = {
    "logging": _handler_calls, "structlog": _processor_calls, "audit": _audit_calls}


def _time_calls(make: Callable[[BufferedSender], Iterator[Call]], sender: BufferedSender,
                calls: int, deliver: bool) -> dict[str, Any]:
    costs: list[float] = []
    with contextlib.contextmanager(make)(sender) as call:
        started = time.perf_counter()
        for n in range(calls):
            before = time.perf_counter_ns()
            call(n)
            costs.append((time.perf_counter_ns() - before) / 1000)
        delivered = deliver and sender.flush(60)
        elapsed = time.perf_counter() - started
    return {"p50_us": round(percentile(costs, 0.5), 1),
            "p99_us": round(percentile(costs, 0.99), 1),
            "p999_us": round(percentile(costs, 0.999), 1),
            "max_us": round(max(costs), 1), "dropped": sender.dropped,
            "calls_per_s_delivered": round(calls / elapsed) if delivered else None}


def run(calls: int) -> dict[str, Any]:
    """Figures per integration and daemon state."""
    results: dict[str, Any] = {}
    nowhere = Path(tempfile.mkdtemp(dir="/tmp", prefix="adint")) / "none.sock"
    with ThrowawayDaemon(Config(), "write", None) as daemon:
        assert daemon.proc is not None
        for name, make in INTEGRATIONS.items():
            if name in BASELINES:
                with BufferedSender(daemon.socket) as unused:
                    results[f"{name}/baseline"] = _time_calls(BASELINES[name], unused, calls,
                                                              False)
            for state in ("up", "stalled", "down"):
                sender = BufferedSender(str(nowhere) if state == "down" else daemon.socket)
                if state == "stalled":
                    daemon.proc.send_signal(signal.SIGSTOP)
                try:
                    results[f"{name}/{state}"] = _time_calls(make, sender, calls, state == "up")
                finally:
                    if state == "stalled":
                        daemon.proc.send_signal(signal.SIGCONT)
                    sender.close(0 if state == "down" else 30)
    nowhere.parent.rmdir()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50_000,
                        help="calls per integration and state (default 50000; the buffer "
                        "holds 10000 events, so down and stalled mostly time the drop path)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    results = run(args.calls)
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{'integration/state':<20} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} "
          f"{'max us':>9} {'dropped':>8} {'delivered/s':>12}")
    for key, figures in results.items():
        rate = figures["calls_per_s_delivered"]
        print(f"{key:<20} {figures['p50_us']:>8} {figures['p99_us']:>8} "
              f"{figures['p999_us']:>9} {figures['max_us']:>9} {figures['dropped']:>8} "
              f"{'-' if rate is None else rate:>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
