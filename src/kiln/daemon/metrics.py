"""The daemon's metrics in Prometheus text format: ``GET /metrics``.

One scrape gathers the router's request counters and latency histograms
(from its ``/stats``), instances and releases by state and the audit trail's
counts and durations (from ``state.db``, read on a connection of its own so
a scrape never waits for the engine), and the log collector's own counters.
Served on the daemon's unix socket, and on TCP too when
``KILN_METRICS_LISTEN`` (e.g. ``127.0.0.1:9464``) is set.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kiln
from kiln.daemon.engine import Engine
from kiln.errors import RouterError, UsageError
from kiln.logs.collector import Collector
from kiln.prometheus import CONTENT_TYPE, Family, render
from kiln.router import metrics as router_metrics
from kiln.state import LIVE_INSTANCE

log = logging.getLogger("kiln.daemon")

STARTED = time.time()
# Releases take seconds to minutes (canaries: many minutes); rollbacks to a
# warm release take milliseconds.
RELEASE_BOUNDS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
ROLLBACK_BOUNDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def render_daemon(engine: Engine, collector: Collector | None) -> str:
    """Every metric of this home, as one Prometheus text document."""
    families: list[Family] = []
    up = Family("kiln_router_up", "gauge", "1 when the daemon can read the router's counters.")
    try:
        stats = engine.router.stats()
    except RouterError:
        up.add(0)
    else:
        up.add(1)
        families += router_metrics.families(stats)
    families.append(up)
    families += state_families(engine.home.state_db)
    if collector is not None:
        families += log_families(collector)
    families += [
        Family("kiln_daemon_start_time_seconds", "gauge", "When the daemon started.").add(STARTED),
        Family("kiln_build_info", "gauge", "kiln's version.").add(1, {"version": kiln.__version__}),
    ]
    return render(families)


def state_families(path: Path) -> list[Family]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return _state_families(db)
    finally:
        db.close()


def _state_families(db: sqlite3.Connection) -> list[Family]:
    instances = Family(
        "kiln_instances",
        "gauge",
        "Live instances by environment, release and state (starting, ready, draining).",
    )
    marks = ",".join("?" * len(LIVE_INSTANCE))
    for env, number, state, n in db.execute(
        "SELECT r.env, r.number, i.state, COUNT(*) FROM instances i "
        f"JOIN releases r ON r.id = i.release_id WHERE i.state IN ({marks}) "
        "GROUP BY r.env, r.number, i.state ORDER BY r.env, r.number, i.state",
        LIVE_INSTANCE,
    ):
        instances.add(n, {"env": env, "release": f"r{number}", "state": state})
    releases = Family("kiln_releases", "gauge", "Releases ever made, by environment and state.")
    for env, state, n in db.execute(
        "SELECT env, state, COUNT(*) FROM releases GROUP BY env, state ORDER BY env, state"
    ):
        releases.add(n, {"env": env, "state": state})
    events = Family("kiln_events_total", "counter", "Audit trail events by kind and environment.")
    replacements = Family(
        "kiln_instance_replacements_total",
        "counter",
        "Instances started to replace dead or unhealthy ones (instance.replacement events).",
    )
    failures = Family(
        "kiln_instance_failures_total",
        "counter",
        "Instances that died or never became ready (instance.failed events).",
    )
    by_kind: dict[str, Family] = {
        "instance.replacement": replacements,
        "instance.failed": failures,
    }
    # Zero for every environment rather than no sample: a counter that
    # appears only at its first increment hides that first increment from rate().
    envs = [row[0] for row in db.execute("SELECT DISTINCT env FROM releases ORDER BY env")]
    per_env: dict[str, dict[str, int]] = {kind: dict.fromkeys(envs, 0) for kind in by_kind}
    for kind, env, n in db.execute(
        "SELECT kind, COALESCE(env, ''), COUNT(*) FROM events GROUP BY kind, env ORDER BY kind, env"
    ):
        events.add(n, {"kind": kind, "env": env})
        if kind in per_env:
            per_env[kind][env] = n
    for kind, counts in per_env.items():
        for env, n in counts.items():
            by_kind[kind].add(n, {"env": env})
    release_seconds: dict[tuple[str, str], list[float]] = {}
    rollback_seconds: dict[tuple[str, str], list[float]] = {}
    for kind, env, data, strategy in db.execute(
        "SELECT e.kind, e.env, e.data, r.strategy FROM events e LEFT JOIN releases r "
        "ON r.env = e.env AND 'r' || r.number = e.release "
        "WHERE e.kind IN ('release.done', 'rollback.done') ORDER BY e.id"
    ):
        seconds, how = _seconds(data)
        if seconds is None:
            continue
        if kind == "rollback.done":
            rollback_seconds.setdefault((env, how or "warm"), []).append(seconds)
        elif strategy != "rollback":  # a rebuilt rollback counts as a rollback only
            release_seconds.setdefault((env, strategy or ""), []).append(seconds)
    release_hist = Family(
        "kiln_release_duration_seconds",
        "histogram",
        "From a release's start to serving all of its environment's traffic, "
        "by environment and strategy.",
    )
    for (env, strategy), values in sorted(release_seconds.items()):
        release_hist.observe_all(RELEASE_BOUNDS, values, {"env": env, "strategy": strategy})
    rollback_hist = Family(
        "kiln_rollback_duration_seconds",
        "histogram",
        "Rollbacks from request to done, by environment and kind "
        "(warm: an instant switch; rebuilt: the old image on new instances).",
    )
    for (env, kind), values in sorted(rollback_seconds.items()):
        rollback_hist.observe_all(ROLLBACK_BOUNDS, values, {"env": env, "kind": kind})
    return [instances, releases, events, replacements, failures, release_hist, rollback_hist]


def _seconds(data: str | None) -> tuple[float | None, str | None]:
    """An event's ``seconds`` and ``kind`` from its data, where they are."""
    try:
        parsed = json.loads(data or "{}")
    except ValueError:
        return None, None
    if not isinstance(parsed, dict):
        return None, None
    value, kind = parsed.get("seconds"), parsed.get("kind")
    seconds = float(value) if isinstance(value, int | float) else None
    return seconds, kind if isinstance(kind, str) else None


def log_families(collector: Collector) -> list[Family]:
    lines = Family(
        "kiln_log_lines_ingested_total",
        "counter",
        "Log lines stored since the daemon started, by environment and stream.",
    )
    with collector.snapshot() as c:
        for (env, stream), n in sorted(c.by_tag.items()):
            lines.add(n, {"env": env, "stream": stream})
        ingested_bytes, expired = c.bytes, c.expired
    return [
        lines,
        Family(
            "kiln_log_bytes_ingested_total",
            "counter",
            "Bytes of log read since the daemon started.",
        ).add(ingested_bytes),
        Family(
            "kiln_log_lines_expired_total",
            "counter",
            "Log lines deleted by retention since the daemon started.",
        ).add(expired),
        Family(
            "kiln_log_lag_bytes",
            "gauge",
            "Bytes instances have written that are not stored yet.",
        ).add(collector.lag_bytes()),
        Family("kiln_log_files_open", "gauge", "Instance log files being followed.").add(
            len(collector.tails)
        ),
        Family(
            "kiln_log_store_bytes", "gauge", "Size of the log store on disk (with its WAL)."
        ).add(_size(collector)),
    ]


def _size(collector: Collector) -> int:
    """The database and its write-ahead log: what the store takes on disk."""
    total = 0
    for suffix in ("", "-wal"):
        with suppress(OSError):
            total += Path(f"{collector.store_path}{suffix}").stat().st_size
    return total


class _MetricsHandler(BaseHTTPRequestHandler):
    server: MetricsServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        try:
            body = self.server.render().encode()
        except Exception:
            log.exception("metrics scrape failed")
            self.send_error(500, "see the daemon's log")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], render: Callable[[], str]) -> None:
        super().__init__(addr, _MetricsHandler)
        self.render = render


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"KILN_METRICS_LISTEN must be HOST:PORT like 127.0.0.1:9464, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve_tcp(listen: str, render: Callable[[], str]) -> MetricsServer:
    """Start answering ``GET /metrics`` on ``listen`` in a thread of its own."""
    try:
        server = MetricsServer(parse_listen(listen), render)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {listen}: {exc}") from exc
    threading.Thread(target=server.serve_forever, name="kiln-metrics", daemon=True).start()
    return server
