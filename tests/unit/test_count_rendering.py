"""What `auditd query --count-by` and `auditd projections status` print for a person."""

from __future__ import annotations

from typing import Any

from auditd.cli.counts import count_params, render_counts
from auditd.cli.projections import render

DOCUMENT: dict[str, Any] = {"by": "type", "interval": "1h", "complete": True, "buckets": [
    ["2026-12-02T09:00:00Z", "user.login", 40], ["2026-12-02T09:00:00Z", "file.read", 10],
    ["2026-12-02T10:00:00Z", "user.login", 5], ["2026-12-02T10:00:00Z", None, 1]]}


def test_a_line_per_bucket_with_a_bar_in_proportion() -> None:
    lines = render_counts(DOCUMENT, width=80).splitlines()
    assert lines[0].split() == ["bucket", "(1h)", "type", "count"]
    rows = lines[1:-1]
    assert [row.split()[0] for row in rows if row[0] != " "] == [
        "2026-12-02T09:00:00Z", "2026-12-02T10:00:00Z"]  # a start shown once
    bars = [row.count("█") for row in rows]
    assert bars[0] > bars[1] > bars[2] >= 0 and bars[0] == max(bars)
    assert all(len(row) <= 80 for row in lines)
    assert " - " in rows[3]  # an absent value
    assert lines[-1].split() == ["total", "56"]


def test_partial_counts_and_no_counts_are_said() -> None:
    partial = render_counts({**DOCUMENT, "complete": False})
    assert partial.endswith("(the projection is being rebuilt: counts are partial)")
    assert render_counts({"by": "actor", "buckets": []}) == "no events to count by actor"


def test_the_parameters_sent() -> None:
    assert count_params("type", "1d", [("type", "a"), ("uid", "5")], "1h", None) == [
        ("by", "type"), ("interval", "1d"), ("type", "a"), ("uid", "5"), ("since", "1h")]


def test_projections_status_is_a_table() -> None:
    shown = render({"projections": {
        "counts_by_type": {"version": 1, "state": "live", "position": 1200, "lag": 0},
        "actor_summary": {"version": 1, "state": "rebuilding", "position": 300, "lag": 900,
                          "rebuild": {"through": 1200, "done": 300, "total": 1200}}}})
    lines = shown.splitlines()
    assert lines[1].split() == ["counts_by_type", "1", "live", "1,200", "0"]
    assert "rebuilding 25% through seq 1,200" in lines[2]
