"""Stats' histograms: bucket counts since start, percentiles over a window of recent
observations that is as long as asked; dead-letter drops counted by reason."""

from __future__ import annotations

import pytest

from auditd.stats import LATENCY_BUCKETS_MS, Histogram, Stats


def test_percentiles_cover_only_the_last_window_observations() -> None:
    histogram = Histogram(LATENCY_BUCKETS_MS, window=4)
    for value in (900.0, 800.0, 700.0, 600.0):  # a slow spell...
        histogram.observe(value)
    assert histogram.percentiles()["p50"] == 800.0
    for value in (1.0, 2.0, 3.0, 4.0):  # ...pushed out by four fast observations
        histogram.observe(value)
    assert histogram.percentiles() == {"p50": 3.0, "p95": 4.0, "p99": 4.0}
    # The buckets and the count are lifetime figures: the slow spell is still there.
    assert histogram.count == 8 and histogram.total == 3010.0
    assert histogram.counts[LATENCY_BUCKETS_MS.index(1000)] == 4


def test_the_window_holds_as_many_observations_as_asked() -> None:
    small, default = Histogram((1, 10), window=3), Histogram((1, 10))
    assert (small.window, default.window) == (3, 2048)
    for value in range(5000):
        small.observe(float(value))
        default.observe(float(value))
    # p50 of the last 3 (4997, 4998, 4999) and of the last 2048 (2952 ... 4999).
    assert small.percentiles()["p50"] == 4998.0
    assert default.percentiles()["p50"] == 2952.0 + 1024


def test_an_empty_histogram_reads_zero() -> None:
    assert Histogram((1,), window=1).percentiles() == {"p50": 0.0, "p95": 0.0, "p99": 0.0}


@pytest.mark.parametrize("window", [0, -1])
def test_a_window_must_hold_something(window: int) -> None:
    with pytest.raises(ValueError, match="at least one observation"):
        Histogram((1,), window=window)


def test_dead_letter_drops_are_counted_by_reason_and_in_total() -> None:
    stats = Stats()
    stats.dead_letters_deleted("quota", 3)
    stats.dead_letters_deleted("operator", 2)
    stats.dead_letters_deleted("quota", 1)
    assert stats.dead_letters_dropped == 6
    assert dict(stats.dead_letters_dropped_by_reason) == {"quota": 4, "operator": 2}
