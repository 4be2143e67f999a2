"""`--count-by FIELD [--interval 1h]`: counts per bucket from the daemon's projections.

Kept apart from the `query` command so that whichever parser builds `auditd query`
adds these two options (`add_count_arguments`) and hands over when `--count-by` is
given (`run_counts`). On a TTY every bucket is a line with a bar, so a timeline reads
at a glance; otherwise (or with --json) the /counts document is printed as it came.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import urllib.parse
from collections.abc import Iterable
from typing import Any, TextIO

COUNT_FIELDS = ("type", "actor", "uid", "comm")
_EIGHTHS = " ▏▎▍▌▋▊▉"


def add_count_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count-by", metavar="FIELD", choices=COUNT_FIELDS,
                        help="instead of events, count them per time bucket and value of "
                             f"FIELD ({', '.join(COUNT_FIELDS)}), from the projections; "
                             "filters may name FIELD itself and --uid")
    parser.add_argument("--interval", choices=("1h", "1d"), default="1h",
                        help="the bucket of --count-by: 1h (default) or 1d; the "
                             "projections keep hourly counts, so no minutes")


def count_params(field: str, interval: str, filters: Iterable[tuple[str, str]],
                 since: str | None = None, until: str | None = None) -> list[tuple[str, str]]:
    """The /counts query parameters; `filters` are (name, value) pairs, repeated to OR."""
    params = [("by", field), ("interval", interval), *filters]
    if since:
        params.append(("since", since))
    if until:
        params.append(("until", until))
    return params


def run_counts(socket_path: str, params: list[tuple[str, str]], as_json: bool,
               out: TextIO | None = None) -> int:
    from auditd.cli.operator import EXIT_OK, _refusal, call  # aiohttp: only when it talks

    stream = sys.stdout if out is None else out
    code, document = call(socket_path, "GET", "/counts?" + urllib.parse.urlencode(params))
    if code != 200:
        return _refusal(code, document)
    if as_json or not stream.isatty():
        print(json.dumps(document), file=stream)
    else:
        width = shutil.get_terminal_size((100, 24)).columns
        print(render_counts(document, width), file=stream)
    return EXIT_OK


def render_counts(document: dict[str, Any], width: int = 100) -> str:
    """A line per bucket and value: start (shown once per bucket), value, count, bar."""
    buckets: list[list[Any]] = document.get("buckets", [])
    by = document.get("by", "?")
    if not buckets:
        return f"no events to count by {by}"
    shown = [("-" if value is None else str(value)) for _, value, _ in buckets]
    value_width = min(40, max(len(by), *(len(v) for v in shown)))
    count_width = max(5, *(len(f"{n:,}") for _, _, n in buckets))
    start_width = max(len(str(b[0])) for b in buckets)
    bar_width = max(10, width - start_width - value_width - count_width - 6)
    top = max(n for _, _, n in buckets) or 1
    lines = [f"{'bucket (' + document.get('interval', '') + ')':<{start_width}}  "
             f"{by:<{value_width}}  {'count':>{count_width}}"]
    previous = None
    for (start, _, n), value in zip(buckets, shown, strict=True):
        label = start if start != previous else ""
        previous = start
        lines.append(f"{label:<{start_width}}  {value[:value_width]:<{value_width}}  "
                     f"{n:>{count_width},}  {_bar(n / top * bar_width)}")
    total = sum(n for _, _, n in buckets)
    lines.append(f"{'total':<{start_width}}  {'':<{value_width}}  {total:>{count_width},}")
    if document.get("complete") is False:
        lines.append("(the projection is being rebuilt: counts are partial)")
    return "\n".join(lines)


def _bar(cells: float) -> str:
    whole = int(cells)
    part = int((cells - whole) * 8)
    return "█" * whole + (_EIGHTHS[part] if part else "") or "▏"
