"""The Prometheus text exposition format (version 0.0.4), written by hand.

Small enough not to need a client library: metric families with HELP and
TYPE lines, labelled samples, and cumulative histograms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = Mapping[str, str]


@dataclass
class Family:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def add(self, value: float, labels: Labels | None = None) -> Family:
        self.samples.append((self.name, labels or {}, value))
        return self

    def histogram(
        self,
        buckets: Sequence[tuple[float, int]],
        total: float,
        count: int,
        labels: Labels | None = None,
    ) -> Family:
        """One labelled histogram: cumulative ``(upper bound, count)`` pairs."""
        base = dict(labels or {})
        for bound, n in buckets:
            if not math.isinf(bound):
                self.samples.append((self.name + "_bucket", {**base, "le": _number(bound)}, n))
        self.samples.append((self.name + "_bucket", {**base, "le": "+Inf"}, count))
        self.samples.append((self.name + "_sum", base, total))
        self.samples.append((self.name + "_count", base, count))
        return self

    def observe_all(
        self, bounds: Sequence[float], values: Iterable[float], labels: Labels | None = None
    ) -> Family:
        """A histogram of ``values`` over ``bounds`` (upper bounds, +Inf implied)."""
        seen = sorted(values)
        cumulative = []
        i = 0
        for bound in bounds:
            while i < len(seen) and seen[i] <= bound:
                i += 1
            cumulative.append((bound, i))
        return self.histogram(cumulative, sum(seen), len(seen), labels)


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(families: Iterable[Family]) -> str:
    out: list[str] = []
    for fam in families:
        out.append(f"# HELP {fam.name} {fam.help}")
        out.append(f"# TYPE {fam.name} {fam.kind}")
        for name, labels, value in fam.samples:
            if labels:
                inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
                out.append(f"{name}{{{inner}}} {_number(value)}")
            else:
                out.append(f"{name} {_number(value)}")
    return "\n".join(out) + "\n"
