"""Fair share per uid: the token bucket, the buffer's shares, and the rate_limit key."""

from __future__ import annotations

from collections import Counter

import pytest

from auditd.config import RateLimit, config_from_dict, parse_rate_limit
from auditd.errors import ConfigError
from auditd.ingest.fairness import BufferShares, LoopShares, RateLimiter

# -- the config key ----------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("", None),
    ("  ", None),
    ("5000/s burst 20000", RateLimit(5000.0, 20000)),
    ("10 / s", RateLimit(10.0, 10)),  # no burst: one second's worth
    ("600/m burst 5", RateLimit(10.0, 5)),
    ("36/h", RateLimit(0.01, 1)),  # at least one event may be saved up
    ("1.5/s burst 3", RateLimit(1.5, 3)),
])
def test_rate_limit_values(value: str, expected: RateLimit | None) -> None:
    assert parse_rate_limit("ingest.rate_limit", value) == expected


@pytest.mark.parametrize("value", ["5000", "5000 per s", "0/s", "5000/s burst 0",
                                   "5000/s burst", "-1/s", "5000/d", "fast"])
def test_a_bad_rate_limit_is_one_line_naming_key_value_and_form(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"ingest": {"rate_limit": value}})
    message = str(info.value)
    assert message.startswith(f"ingest.rate_limit = {value!r}: expected a rate per uid like "
                              '"5000/s burst 20000"'), message
    assert "\n" not in message


def test_rate_limit_is_off_by_default_and_must_be_a_string() -> None:
    assert config_from_dict({}).ingest.rate_limit == ""
    with pytest.raises(ConfigError, match=r"^ingest\.rate_limit = 5000: expected `?str"):
        config_from_dict({"ingest": {"rate_limit": 5000}})


def test_rate_limit_prints_in_its_config_form() -> None:
    assert str(RateLimit(5000.0, 20000)) == "5000/s burst 20000"


# -- the token bucket ----------------------------------------------------------------------


def test_a_bucket_starts_full_and_refills_at_the_rate() -> None:
    limiter = RateLimiter(RateLimit(100.0, 10))
    assert limiter.wait_s(7, 10, now=0.0) == 0.0
    limiter.take(7, 10, now=0.0)
    assert limiter.wait_s(7, 1, now=0.0) == pytest.approx(0.01)
    assert limiter.wait_s(7, 5, now=0.0) == pytest.approx(0.05)
    assert limiter.wait_s(7, 5, now=0.05) == 0.0  # 5 tokens back after 50 ms
    assert limiter.tokens(7, now=10.0) == 10  # never more than the burst


def test_uids_have_buckets_of_their_own() -> None:
    limiter = RateLimiter(RateLimit(1.0, 2))
    limiter.take(1, 2, now=0.0)
    assert limiter.wait_s(1, 1, now=0.0) > 0
    assert limiter.wait_s(2, 2, now=0.0) == 0.0


def test_a_frame_larger_than_the_burst_waits_for_a_full_bucket_then_goes_into_debt() -> None:
    limiter = RateLimiter(RateLimit(100.0, 10))
    assert limiter.wait_s(1, 50, now=0.0) == 0.0  # min(50, burst) tokens are there
    limiter.take(1, 50, now=0.0)
    assert limiter.tokens(1, now=0.0) == -40
    # The debt is paid at the rate before the next frame: the long-run rate holds.
    assert limiter.wait_s(1, 1, now=0.0) == pytest.approx(0.41)
    assert limiter.wait_s(1, 1, now=0.41) == 0.0


def test_the_long_run_rate_is_the_configured_one() -> None:
    limiter, now, taken = RateLimiter(RateLimit(1000.0, 100)), 0.0, 0
    while now < 10.0:  # a client that always sends 25-event frames as soon as allowed
        wait = limiter.wait_s(3, 25, now)
        if wait:
            now += wait
            continue
        limiter.take(3, 25, now)
        taken += 25
    assert 10_000 <= taken <= 10_000 + 100 + 25  # rate x time, plus the burst


def test_a_refund_gives_back_what_a_frame_took() -> None:
    limiter = RateLimiter(RateLimit(1.0, 10))
    limiter.take(1, 10, now=0.0)
    limiter.refund(1, 10)
    assert limiter.tokens(1, now=0.0) == 10


def test_off_means_no_wait_and_reconfiguring_keeps_tokens_under_the_new_burst() -> None:
    limiter = RateLimiter(None)
    assert limiter.wait_s(1, 10**6, now=0.0) == 0.0
    assert limiter.tokens(1, now=0.0) is None
    limiter.configure(RateLimit(10.0, 100))
    limiter.take(1, 20, now=0.0)
    limiter.configure(RateLimit(10.0, 50))
    assert limiter.tokens(1, now=0.0) == 50
    limiter.configure(None)
    assert limiter.wait_s(1, 10**6, now=0.0) == 0.0


def test_many_idle_uids_do_not_grow_the_buckets_without_bound() -> None:
    limiter = RateLimiter(RateLimit(10.0, 10))
    for uid in range(20_000):
        limiter.take(uid, 1, now=float(uid))  # each refilled by the time the next comes
    assert len(limiter._buckets) <= 4097


# -- shares of the buffer ------------------------------------------------------------------


def shares(capacity: int = 64, present: dict[int, int] | None = None) -> BufferShares:
    return BufferShares(capacity, 1 << 20, Counter(), Counter(present or {}))


def test_pending_follows_admissions_and_commits_in_seq_order() -> None:
    s = shares()
    s.admitted(1, 1, 10)
    s.admitted(1, 11, 12)  # joins the run
    s.admitted(2, 13, 13)
    s.admitted(1, 14, 20)
    assert s.pending == {1: 19, 2: 1}
    s.committed(5)  # a batch ends inside a run
    assert s.pending == {1: 14, 2: 1}
    s.committed(13)
    assert s.pending == {1: 7}
    s.committed(13)  # the same checkpoint again: nothing changes
    assert s.pending == {1: 7}
    s.committed(100)
    assert s.pending == {} and not s._runs


def test_commits_of_events_ingest_never_admitted_change_nothing() -> None:
    s = shares()
    s.committed(50)  # e.g. replayed at start
    s.admitted(4, 51, 52)
    s.committed(50)
    assert s.pending == {4: 2}


def test_the_buffer_is_contended_only_near_its_bounds() -> None:
    s = BufferShares(64, 8000, Counter(), Counter())
    assert s.reserve == 8 and s.reserve_bytes == 1000
    assert not s.contended(free=30, pending_bytes=0, count=10, size=100)
    assert s.contended(free=17, pending_bytes=0, count=10, size=100)
    assert s.contended(free=60, pending_bytes=6950, count=1, size=100)  # bytes


def test_a_lone_uid_may_fill_the_whole_buffer() -> None:
    s = shares(present={1: 3})
    s.admitted(1, 1, 60)
    assert s.share(1) == 64
    assert s.over_share(1, 4) is None


def test_with_two_uids_present_the_flooder_is_over_its_share_the_other_is_not() -> None:
    s = shares(present={1: 4, 2: 1})
    s.admitted(1, 1, 56)
    assert s.over_share(1, 1) == 32
    assert s.over_share(2, 1) is None
    s.admitted(2, 57, 57)
    assert s.over_share(2, 1) is None


def test_a_uid_not_yet_present_counts_in_the_division() -> None:
    s = shares(present={1: 1})
    s.admitted(1, 1, 40)
    assert s.share(2) == 32  # 1 and the newcomer
    assert s.over_share(2, 5) is None


def test_shares_never_fall_below_the_floor() -> None:
    s = shares(capacity=64, present={uid: 1 for uid in range(100)})
    assert s.floor == 4
    assert s.share(5) == 4


# -- shares of the event loop -----------------------------------------------------------


def test_the_uid_that_used_least_of_the_loop_goes_next() -> None:
    loop = LoopShares(credit_s=0.001)
    loop.start_waiting(1)
    loop.charge(1, 0.010)  # a flood's frame
    loop.start_waiting(2)  # brought up to one credit behind the least served waiting uid
    assert loop.used[2] == pytest.approx(0.009)
    assert loop.least_served([1, 2]) == 2  # so it goes first, not on a tie
    loop.charge(1, 0.008)
    assert loop.least_served([1, 2]) == 2
    loop.charge(2, 0.010)
    assert loop.least_served([1, 2]) == 1
    assert loop.least_served([3, 1]) == 3  # never charged: 0


def test_idling_earns_no_credit_but_debt_is_kept() -> None:
    loop = LoopShares(credit_s=0.001)
    loop.start_waiting(1)
    loop.start_waiting(2)
    loop.charge(2, 0.050)
    loop.stop_waiting(2)
    loop.charge(1, 1.0)  # alone meanwhile
    loop.start_waiting(2)
    assert loop.used[2] == pytest.approx(0.999)  # not 0.05: it cannot make up for the time it idled
    loop.stop_waiting(1)
    loop.stop_waiting(2)
    loop.start_waiting(2)
    loop.start_waiting(1)
    # 1's debt was kept (it got no credit): 2 stays ahead of it.
    assert loop.used[1] == 1.0 and loop.used[2] == pytest.approx(0.999)


def test_several_connections_of_one_uid_are_counted_once() -> None:
    loop = LoopShares()
    loop.start_waiting(1)
    loop.start_waiting(1)
    loop.stop_waiting(1)
    assert loop.waiting == {1: 1}
    loop.stop_waiting(1)
    assert loop.waiting == {}
