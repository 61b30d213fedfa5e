"""Canary analysis: is the new release worse than the stable one?

Pure functions over the router's per-release counters. Each step compares
the canary's requests during that step with the stable release's since the
canary began, on error rate (5xx, and router failures; 4xx optionally) and
on latency (p50 and p99 from the latency histograms). Too little traffic is
*inconclusive*, and counters that cannot be read or went backwards (the
router restarted) are *unmeasurable*: neither ever passes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PASS, FAIL, INCONCLUSIVE, UNMEASURABLE = "pass", "fail", "inconclusive", "unmeasurable"


@dataclass(frozen=True)
class Thresholds:
    min_requests: int = 50
    max_error_increase: float = 0.02  # canary error rate may exceed stable's by this much
    max_latency_ratio: float = 2.0  # canary p50/p99 may be this many times stable's…
    latency_floor: float = 0.05  # …unless the difference is below this many seconds
    count_4xx: bool = False
    max_inconclusive: int = 3  # intervals a step may wait for enough traffic before pausing

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Counters:
    """Requests by outcome and a cumulative latency histogram, for one release."""

    by_class: Mapping[str, int]
    buckets: tuple[tuple[float, int], ...]  # (upper bound in s, cumulative count); last is inf

    @classmethod
    def from_router(cls, raw: Mapping[str, Any]) -> Counters:
        counts = {str(k): int(v) for k, v in raw.get("requests", {}).items()}
        hist = raw.get("latency", {}).get("buckets", {})
        buckets = sorted(((math.inf if k == "+Inf" else float(k)), int(v)) for k, v in hist.items())
        return cls(counts, tuple(buckets))

    @classmethod
    def empty(cls) -> Counters:
        return cls({}, ())

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": dict(self.by_class),
            "latency": {
                "buckets": {("+Inf" if math.isinf(b) else repr(b)): n for b, n in self.buckets}
            },
        }

    @property
    def total(self) -> int:
        return sum(self.by_class.values())

    def errors(self, count_4xx: bool) -> int:
        n = self.by_class.get("5xx", 0) + self.by_class.get("failed", 0)
        return n + (self.by_class.get("4xx", 0) if count_4xx else 0)

    def minus(self, earlier: Counters) -> Counters | None:
        """What happened since ``earlier``; None if any counter went backwards."""
        classes = set(self.by_class) | set(earlier.by_class)
        by_class = {c: self.by_class.get(c, 0) - earlier.by_class.get(c, 0) for c in classes}
        before = dict(earlier.buckets)
        buckets = tuple((b, n - before.get(b, 0)) for b, n in self.buckets)
        if any(v < 0 for v in by_class.values()) or any(n < 0 for _, n in buckets):
            return None
        return Counters(by_class, buckets)

    def quantile(self, q: float) -> float | None:
        """The q-quantile in seconds, interpolated inside its histogram bucket."""
        if not self.buckets or self.buckets[-1][1] == 0:
            return None
        total = self.buckets[-1][1]
        rank = q * total
        lower_bound, lower_count = 0.0, 0
        for bound, count in self.buckets:
            if count >= rank:
                if math.isinf(bound):
                    return lower_bound  # beyond the last finite bucket: report its edge
                span = count - lower_count
                frac = (rank - lower_count) / span if span else 1.0
                return lower_bound + (bound - lower_bound) * frac
            lower_bound, lower_count = bound, count
        return lower_bound


@dataclass(frozen=True)
class Verdict:
    result: str
    reason: str
    numbers: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"result": self.result, "reason": self.reason, "numbers": dict(self.numbers)}


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f}ms"


def analyze(canary: Counters | None, stable: Counters | None, t: Thresholds) -> Verdict:
    """Compare the canary's step with the stable release; see the module doc."""
    if canary is None:
        return Verdict(
            UNMEASURABLE, "the canary's counters could not be read (router restarted?)", {}
        )
    numbers: dict[str, Any] = {"canary_requests": canary.total}
    if canary.total < t.min_requests:
        return Verdict(
            INCONCLUSIVE,
            f"only {canary.total} canary requests, {t.min_requests} needed to judge",
            numbers,
        )
    c_err = canary.errors(t.count_4xx) / canary.total
    numbers["canary_error_rate"] = round(c_err, 4)
    reference = stable if stable is not None and stable.total >= t.min_requests else None
    s_err = reference.errors(t.count_4xx) / reference.total if reference else 0.0
    if reference:
        numbers["stable_requests"] = reference.total
        numbers["stable_error_rate"] = round(s_err, 4)
    if c_err - s_err > t.max_error_increase:
        return Verdict(
            FAIL,
            f"error rate {c_err:.1%} vs stable {s_err:.1%} (allowed +{t.max_error_increase:.1%})",
            numbers,
        )
    latencies: dict[str, tuple[float | None, float | None]] = {}
    for q, label in ((0.99, "p99"), (0.5, "p50")):
        c_lat = canary.quantile(q)
        s_lat = reference.quantile(q) if reference else None
        latencies[label] = (c_lat, s_lat)
        numbers[f"canary_{label}"] = None if c_lat is None else round(c_lat, 4)
        if reference:
            numbers[f"stable_{label}"] = None if s_lat is None else round(s_lat, 4)
    for label, (c_lat, s_lat) in latencies.items():
        if c_lat is None or s_lat is None:
            continue
        if c_lat > s_lat * t.max_latency_ratio and c_lat - s_lat > t.latency_floor:
            return Verdict(
                FAIL,
                f"{label} latency {_ms(c_lat)} vs stable {_ms(s_lat)} "
                f"(allowed {t.max_latency_ratio:g}x, +{_ms(t.latency_floor)})",
                numbers,
            )
    if reference is None:
        return Verdict(
            PASS,
            f"error rate {c_err:.1%}; no stable traffic to compare latency with",
            numbers,
        )
    return Verdict(
        PASS,
        f"error rate {c_err:.1%} vs {s_err:.1%}, p99 {_ms(numbers.get('canary_p99'))} "
        f"vs {_ms(numbers.get('stable_p99'))}",
        numbers,
    )
