"""The router's counters as Prometheus metric families.

Built from the ``/stats`` document, so the router's own ``GET /metrics`` and
the daemon's (which asks the router for ``/stats``) say the same thing.
"""

from __future__ import annotations

import math
from typing import Any

from kiln.prometheus import Family

# What the router calls the outcome of a request; "failed" means no response
# came from an instance at all (the router answered 502/503 itself).
CLASSES = ("2xx", "3xx", "4xx", "5xx", "failed")


def families(stats: dict[str, Any]) -> list[Family]:
    requests = Family(
        "kiln_http_requests_total",
        "counter",
        "Requests through the router by environment, release and status class "
        "(failed: no instance answered).",
    )
    aborted = Family(
        "kiln_http_requests_aborted_total",
        "counter",
        "Requests whose client went away before the response.",
    )
    latency = Family(
        "kiln_http_request_duration_seconds",
        "histogram",
        "Time from a request's arrival to its response's end, by environment and release.",
    )
    unrouted = Family(
        "kiln_http_requests_unrouted_total",
        "counter",
        "Requests that failed before any release was chosen (no pool to send them to).",
    )
    weight = Family(
        "kiln_router_traffic_weight_percent",
        "gauge",
        "The share of an environment's traffic the router gives each release.",
    )
    inflight = Family(
        "kiln_http_requests_in_flight",
        "gauge",
        "Requests an instance is handling right now.",
    )
    for env, env_stats in sorted(stats.get("envs", {}).items()):
        unrouted.add(int(env_stats.get("failed", 0)), {"env": env})
        for release, rel in sorted(env_stats.get("releases", {}).items()):
            labels = {"env": env, "release": release}
            counts = rel.get("requests", {})
            for cls in CLASSES:
                requests.add(int(counts.get(cls, 0)), {**labels, "class": cls})
            aborted.add(int(rel.get("aborted", 0)), labels)
            hist = rel.get("latency", {})
            buckets = sorted(
                ((math.inf if k == "+Inf" else float(k)), int(v))
                for k, v in hist.get("buckets", {}).items()
            )
            latency.histogram(
                buckets, float(hist.get("sum", 0.0)), int(hist.get("count", 0)), labels
            )
            if rel.get("weight") is not None:
                weight.add(int(rel["weight"]), labels)
            for instance, inst in sorted(rel.get("instances", {}).items()):
                inflight.add(int(inst.get("inflight", 0)), {**labels, "instance": instance})
    router = [
        Family("kiln_router_start_time_seconds", "gauge", "When the router process started.").add(
            float(stats.get("started_at", 0.0))
        ),
        Family(
            "kiln_router_config_generation", "gauge", "The generation of the router's config."
        ).add(int(stats.get("generation", 0))),
    ]
    return [requests, aborted, latency, unrouted, weight, inflight, *router]
