"""Canary analysis as data: given these counters and thresholds, this verdict."""

from __future__ import annotations

import math

import pytest

from kiln.canary import FAIL, INCONCLUSIVE, PASS, UNMEASURABLE, Counters, Thresholds, analyze

BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, math.inf)


def counters(ok: int, errors: int = 0, latency: float = 0.004, client_errors: int = 0) -> Counters:
    """``ok + errors`` requests all taking ``latency`` seconds."""
    total = ok + errors + client_errors
    buckets = tuple((b, total if latency <= b else 0) for b in BOUNDS)
    return Counters({"2xx": ok, "5xx": errors, "4xx": client_errors}, buckets)


T = Thresholds(min_requests=50, max_error_increase=0.02, max_latency_ratio=2.0, latency_floor=0.05)


def test_healthy_canary_passes() -> None:
    v = analyze(counters(200), counters(2000), T)
    assert v.result == PASS
    assert v.numbers["canary_error_rate"] == 0 and v.numbers["stable_requests"] == 2000


def test_thirty_percent_errors_fail() -> None:
    v = analyze(counters(70, errors=30), counters(2000, errors=10), T)
    assert v.result == FAIL
    assert "error rate 30.0% vs stable 0.5%" in v.reason
    assert v.numbers["canary_error_rate"] == 0.3


def test_small_error_increase_within_threshold_passes() -> None:
    assert analyze(counters(99, errors=1), counters(1000), T).result == PASS


def test_five_times_slower_p99_fails() -> None:
    v = analyze(counters(200, latency=0.2), counters(2000, latency=0.04), T)
    assert v.result == FAIL and "latency" in v.reason


def test_slower_but_below_the_floor_passes() -> None:
    # 4 ms → 20 ms is 5x, but 16 ms of difference is noise for most services.
    assert analyze(counters(200, latency=0.02), counters(2000, latency=0.004), T).result == PASS


def test_too_little_traffic_is_inconclusive_never_a_pass() -> None:
    v = analyze(counters(10, errors=0), counters(2000), T)
    assert v.result == INCONCLUSIVE and "only 10 canary requests, 50 needed" in v.reason


def test_unreadable_counters_are_unmeasurable() -> None:
    assert analyze(None, counters(10), T).result == UNMEASURABLE


def test_4xx_count_only_when_asked() -> None:
    canary = counters(70, client_errors=30)
    assert analyze(canary, counters(1000), T).result == PASS
    assert analyze(canary, counters(1000), Thresholds(count_4xx=True)).result == FAIL


def test_counters_that_went_backwards_are_none() -> None:
    later, earlier = counters(100), counters(200)
    assert later.minus(earlier) is None
    delta = counters(300, errors=5).minus(counters(100))
    assert delta is not None and delta.total == 205 and delta.errors(False) == 5


def test_quantile_interpolates_inside_its_bucket() -> None:
    c = Counters({"2xx": 100}, ((0.01, 50), (0.1, 100), (math.inf, 100)))
    assert c.quantile(0.5) == pytest.approx(0.01)
    assert c.quantile(0.99) == pytest.approx(0.01 + 0.09 * 49 / 50)


def test_round_trip_through_router_json() -> None:
    c = counters(10, errors=2)
    assert Counters.from_router(c.to_json()) == c
