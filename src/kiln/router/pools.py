"""Choosing where a request goes, and counting what happened to it.

Pure data structures, no I/O: a weighted choice between release pools
(smooth weighted round robin, so shares are exact rather than only
probable), least-in-flight choice within a pool, and the per-release
counters the control API reports.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

# Prometheus' default buckets (upper bounds, seconds); +Inf is implied.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# Indexes into ReleaseStats.counts; 2..5 are the status classes themselves so
# recording a response is one integer division.
FAILED = 0
ABORTED = 1
_CLASS_NAMES = ("2xx", "3xx", "4xx", "5xx")


class Backend(Protocol):
    """What selection needs to know about an instance."""

    in_flight: int
    down_until: float


B = TypeVar("B", bound=Backend)


class Pool(Generic[B]):
    """The instances of one release in one environment, and its traffic weight."""

    __slots__ = ("_next", "current", "members", "release", "weight")

    def __init__(self, release: str, weight: int, members: Sequence[B]) -> None:
        self.release = release
        self.weight = weight
        self.members: tuple[B, ...] = tuple(members)
        self.current = 0  # smooth weighted round robin state
        self._next = 0  # rotates ties so equal in-flight counts spread out

    def pick(
        self, now: float, exclude: Sequence[B] | None = None, *, allow_down: bool = False
    ) -> B | None:
        """The member with the fewest requests in flight.

        Members recently seen refusing connections are skipped unless
        ``allow_down``: trying them again is better than failing outright.
        """
        members = self.members
        n = len(members)
        if n == 1:
            only = members[0]
            if (exclude and only in exclude) or (only.down_until > now and not allow_down):
                return None
            return only
        if n == 0:
            return None
        start = self._next
        self._next = start + 1 if start + 1 < n else 0
        best: B | None = None
        for i in range(n):
            j = start + i
            member = members[j - n if j >= n else j]
            if exclude and member in exclude:
                continue
            if member.down_until > now and not allow_down:
                continue
            if best is None or member.in_flight < best.in_flight:
                best = member
        return best


class Balancer(Generic[B]):
    """Smooth weighted round robin over the pools of one environment.

    Over any window of ``sum(weights)`` choices each pool is picked exactly
    ``weight`` times, spread evenly (nginx's algorithm).
    """

    __slots__ = ("by_release", "live", "pools", "total")

    def __init__(self, pools: Sequence[Pool[B]]) -> None:
        self.pools = tuple(pools)
        self.by_release = {pool.release: pool for pool in self.pools}
        # Heaviest first: the order failover tries other pools in.
        self.live = tuple(sorted((p for p in self.pools if p.weight > 0), key=lambda p: -p.weight))
        self.total = sum(p.weight for p in self.live)

    def choose(self) -> Pool[B] | None:
        live = self.live
        if len(live) == 1:
            return live[0]
        best: Pool[B] | None = None
        for pool in live:
            pool.current += pool.weight
            if best is None or pool.current > best.current:
                best = pool
        if best is not None:
            best.current -= self.total
        return best


class Histogram:
    """Latency histogram with fixed bounds; exported cumulatively like Prometheus."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def to_json(self) -> dict[str, Any]:
        buckets: dict[str, int] = {}
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            buckets[_bound_label(bound)] = running
        buckets["+Inf"] = self.count
        return {"buckets": buckets, "count": self.count, "sum": round(self.sum, 6)}


def _bound_label(bound: float) -> str:
    return repr(bound) if bound != int(bound) else f"{int(bound)}"


class ReleaseStats:
    """Counters of one release in one environment, monotonic since router start."""

    __slots__ = ("counts", "latency")

    def __init__(self) -> None:
        # [failed, aborted, 2xx, 3xx, 4xx, 5xx]
        self.counts = [0] * 6
        self.latency = Histogram()

    def record(self, status: int, seconds: float) -> None:
        cls = status // 100
        self.counts[cls if 2 <= cls <= 5 else 5] += 1
        # Histogram.observe, inlined: this runs once per request.
        latency = self.latency
        latency.counts[bisect_left(latency.bounds, seconds)] += 1
        latency.count += 1
        latency.sum += seconds

    def requests_json(self) -> dict[str, int]:
        out = {name: self.counts[i + 2] for i, name in enumerate(_CLASS_NAMES)}
        out["failed"] = self.counts[FAILED]
        return out
