"""`auditd bench --query N`: query latencies on a store of N soak-shaped events.

Builds the store (query_store), starts a throw-away daemon on it, and times each query
`--query-repeat` times: server side (X-Query-Ms, the daemon's wall time around its
engine, and X-Query-Cpu-Ms, what the engine's thread ran of it: on a shared machine
the rest is waiting for a core) and through the status socket (the whole exchange).
Bars (issue 13): at N = 1M, median <= 5 ms and p99 <= 50 ms server side; a 100-event
correlation <= 5 ms; a word in 0.1 % of events, newest 100, <= 50 ms.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from auditd.bench.daemon import ThrowawayDaemon, peak_rss_mb
from auditd.bench.micro import percentile
from auditd.bench.query_store import (
    LONG_CORRELATION_EVERY,
    RARE_WORD,
    BenchEvents,
    build_store,
    split,
)
from auditd.bench.sealed_events import SPACING_NS, START_NS
from auditd.cli.operator import UnixHTTPConnection
from auditd.config import Config
from auditd.errors import AuditdError

HOUR_S = 3600


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--query", type=int, metavar="N",
        help="only the query bench: a store of N soak-shaped events (sealed partitions and "
             "a hot tail), each filter alone, with a 1-hour range, OR, newest 100, the "
             "page after a cursor, a 100-event correlation, a rare word; ms per query")
    add("--query-repeat", type=int, default=50, metavar="R",
        help="runs of each query in --query (default 50)")
    add("--query-store", metavar="DIR",
        help="with --query: build the store in DIR once (kept), and copy it into each "
             "run's throw-away daemon (default: build it afresh in the daemon's temp dir)")


def _get(conn: UnixHTTPConnection, url: str) -> tuple[dict[str, Any], float, float, float]:
    started = time.perf_counter()
    conn.request("GET", url)
    response = conn.getresponse()
    body = json.loads(response.read())
    elapsed = (time.perf_counter() - started) * 1000
    if response.status != 200:
        raise AuditdError(f"GET {url}: {response.status} {body}")
    return (body, float(response.getheader("X-Query-Ms") or "nan"),
            float(response.getheader("X-Query-Cpu-Ms") or "nan"), elapsed)


def queries(count: int) -> dict[str, str | Callable[[UnixHTTPConnection], str]]:
    """name -> URL (or a function of the connection that makes it, for a cursor)."""
    sample = BenchEvents(long_correlation_every=LONG_CORRELATION_EVERY).events(
        count // 2, count // 2 + 50)
    middle = sample[7]
    hour_start = (START_NS + count // 2 * SPACING_NS) // 10**9 - HOUR_S // 2
    hour = [("since", str(hour_start)), ("until", str(hour_start + HOUR_S))]
    filters: dict[str, list[tuple[str, str]]] = {
        "type": [("type", middle.type)], "actor": [("actor", middle.actor or "")],
        "target": [("target", middle.target or "")], "stream": [("stream", middle.stream or "")],
        "correlation_id": [("correlation_id", middle.correlation_id or "")],
        "causation_id": [("causation_id", sample[8].id)],
        "uid": [("uid", str(middle.uid))], "comm": [("comm", middle.comm)],
        "tag": [("tag.region", "eu-central-1")], "q": [("q", "firefox")],
    }
    made: dict[str, str | Callable[[UnixHTTPConnection], str]] = {}
    for name, pairs in filters.items():
        made[name] = _url([*pairs, ("order", "desc")])
        made[f"{name}+1h"] = _url([*pairs, *hour, ("order", "desc")])
    made["or_two_actors"] = _url([("actor", middle.actor or ""),
                                  ("actor", sample[9].actor or ""), ("order", "desc")])
    made["or_two_types"] = _url([("type", middle.type), ("type", sample[11].type),
                                 ("order", "desc")])
    made["newest_100"] = _url([("order", "desc")])
    made["oldest_100"] = _url([])

    def after_cursor(conn: UnixHTTPConnection) -> str:
        pairs = [("type", middle.type), ("order", "desc")]
        first, _, _, _ = _get(conn, _url(pairs))
        cursor = first["next"] or (first["events"][-1]["seq"] if first["events"] else None)
        return _url(pairs if cursor is None else [*pairs, ("before", str(cursor))])

    made["page_after_cursor"] = after_cursor
    made["correlation_100"] = f"/correlations/op-long-{count // LONG_CORRELATION_EVERY // 2:06d}"
    made["rare_word_0.1%"] = _url([("q", RARE_WORD), ("order", "desc")])
    made["rare_word+type"] = _url([("q", RARE_WORD), ("type", middle.type), ("order", "desc")])
    return made


def _url(pairs: list[tuple[str, str]]) -> str:
    return "/events" + ("?" + urllib.parse.urlencode(pairs) if pairs else "")


def _stats(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 0.5), 3), "p99": round(percentile(values, 0.99), 3)}


def run_query_bench(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    count, repeat = args.query, args.query_repeat
    if count < 1 or repeat < 1:
        raise AuditdError("--query and --query-repeat: expected positive numbers")
    partition = config.storage.partition_events
    built: dict[str, float] = {}

    def say(line: str) -> None:
        print(line, file=sys.stderr)

    def prepare(lib: Path) -> None:
        if args.query_store is None:
            built.update(build_store(lib, count, partition, say=say))
            return
        kept = Path(args.query_store)
        marker = kept / f"built-{count}-{partition}"
        if not marker.exists():
            shutil.rmtree(kept, ignore_errors=True)
            built.update(build_store(kept, count, partition, say=say))
            marker.write_text(json.dumps(built))
        built.update(json.loads(marker.read_text()))
        shutil.copytree(kept, lib, ignore=shutil.ignore_patterns("built-*"))

    results: dict[str, Any] = {}
    with ThrowawayDaemon(config, "write", None, prepare=prepare) as daemon:
        status = daemon.status_socket
        conn = UnixHTTPConnection(status, timeout=120)
        for name, url in queries(count).items():
            server, cpu, through, found = [], [], [], 0
            for _ in range(repeat):
                target = url(conn) if callable(url) else url
                body, server_ms, cpu_ms, socket_ms = _get(conn, target)
                server.append(server_ms)
                cpu.append(cpu_ms)
                through.append(socket_ms)
                found = len(body["events"])
            results[name] = {"events": found, "server_ms": _stats(server),
                             "server_cpu_ms": _stats(cpu), "socket_ms": _stats(through)}
        filters = _get(conn, "/stats")[0].get("query")  # the term filters' skips, bytes
        conn.close()
        rss = peak_rss_mb(daemon.proc.pid if daemon.proc else None)
        rebuilt = [json.loads(line) for line in daemon.log_path.read_text().splitlines()
                   if '"hot_index_rebuilt"' in line]
    medians = [r["server_ms"]["p50"] for r in results.values()]
    return {"events": count, "sealed": split(count, partition), "partition_events": partition,
            "repeat": repeat, **built, "daemon_peak_rss_mb": rss,
            "hot_index": rebuilt[0] if rebuilt else None, "term_filters": filters,
            "worst_server_p50_ms": max(medians),
            "worst_server_p99_ms": max(r["server_ms"]["p99"] for r in results.values()),
            "queries": results}
