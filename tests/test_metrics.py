"""Metrics in Prometheus text format: the writer, the router's families, and the
daemon's and router's /metrics endpoints on a live release."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.daemon.metrics import parse_listen, state_families
from kiln.errors import UsageError
from kiln.prometheus import Family, render
from kiln.router.metrics import families as router_families
from kiln.state import State
from kit import run_kiln
from logkit import chatty_app, release
from releasekit import cleanup, free_port

_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*)\})? '
    r"(?P<value>[-+]?(?:\d+(?:\.\d*)?(?:e[-+]?\d+)?|\+Inf|-Inf|NaN))$"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Strictly: every line a comment or a sample, TYPE before a family's samples."""
    assert text.endswith("\n")
    typed: dict[str, str] = {}
    out: Samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in typed
            typed[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group("name")
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in typed else name
        assert family in typed, f"{name} has no TYPE"
        labels = frozenset(_LABEL.findall(m.group("labels") or ""))
        key = (name, labels)
        assert key not in out, f"duplicate sample {line!r}"
        out[key] = float(m.group("value"))
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def buckets(samples: Samples, name: str, **labels: str) -> list[tuple[float, float]]:
    found = []
    for (n, lab), v in samples.items():
        d = dict(lab)
        le = d.pop("le", None)
        if n == name + "_bucket" and d == labels and le is not None:
            found.append((float(le), v))
    return sorted(found)


# -- the format -----------------------------------------------------------------
def test_render_escapes_labels_and_writes_histograms() -> None:
    text = render(
        [
            Family("x_total", "counter", "A counter.").add(3, {"path": 'a"b\\c\nd'}),
            Family("g", "gauge", "A gauge.").add(0.25).add(1e20, {"k": "v"}),
            Family("h_seconds", "histogram", "A histogram.").observe_all(
                (0.1, 1.0), [0.05, 0.5, 0.5, 7.0], {"env": "e"}
            ),
        ]
    )
    assert 'x_total{path="a\\"b\\\\c\\nd"} 3\n' in text
    samples = parse(text)
    assert value(samples, "g") == 0.25 and value(samples, "g", k="v") == 1e20
    assert buckets(samples, "h_seconds", env="e") == [(0.1, 1), (1.0, 3), (float("inf"), 4)]
    assert value(samples, "h_seconds_count", env="e") == 4
    assert value(samples, "h_seconds_sum", env="e") == 8.05


def test_router_families_from_stats() -> None:
    stats = {
        "started_at": 1700000000.5,
        "generation": 7,
        "latency_buckets": [0.005, 0.01],
        "envs": {
            "staging": {
                "failed": 2,
                "releases": {
                    "r3": {
                        "weight": 90,
                        "requests": {"2xx": 10, "3xx": 0, "4xx": 1, "5xx": 2, "failed": 1},
                        "aborted": 1,
                        "latency": {
                            "buckets": {"0.005": 5, "0.01": 12, "+Inf": 14},
                            "count": 14,
                            "sum": 0.1,
                        },
                        "instances": {"staging-r3-aa": {"inflight": 2}},
                    }
                },
            }
        },
    }
    samples = parse(render(router_families(stats)))
    rel = {"env": "staging", "release": "r3"}
    assert value(samples, "kiln_http_requests_total", **rel, **{"class": "5xx"}) == 2
    assert value(samples, "kiln_http_requests_total", **rel, **{"class": "failed"}) == 1
    assert value(samples, "kiln_http_requests_aborted_total", **rel) == 1
    assert value(samples, "kiln_http_requests_unrouted_total", env="staging") == 2
    assert value(samples, "kiln_router_traffic_weight_percent", **rel) == 90
    assert value(samples, "kiln_http_requests_in_flight", **rel, instance="staging-r3-aa") == 2
    assert buckets(samples, "kiln_http_request_duration_seconds", **rel) == [
        (0.005, 5),
        (0.01, 12),
        (float("inf"), 14),
    ]
    assert value(samples, "kiln_router_config_generation") == 7


def test_state_families_from_the_audit_trail(tmp_path: Path) -> None:
    state = State(tmp_path / "state.db")
    spec = {"listen": "127.0.0.1:1"}
    r1 = state.create_release(
        env="prod", app="a", image="sha256:1", strategy="canary", replicas=2, spec=spec, who="t"
    )
    state.update_release(r1.id, state="serving")
    r2 = state.create_release(
        env="prod",
        app="a",
        image="sha256:1",
        strategy="rollback",
        replicas=2,
        spec=spec,
        who="t",
        rollback_of=r1.id,
    )
    state.update_release(r2.id, state="serving")
    state.create_instance("prod-r2-aa", r2, 1)
    state.update_instance("prod-r2-aa", state="ready")
    state.event("release.done", "r1", env="prod", release="r1", data={"seconds": 95.0})
    state.event("release.done", "r2", env="prod", release="r2", data={"seconds": 8.0})
    state.event(
        "rollback.done", "r2", env="prod", release="r2", data={"seconds": 8.0, "kind": "rebuilt"}
    )
    state.event("rollback.done", "r1", env="prod", release="r1", data={"seconds": 0.004})
    state.event("instance.replacement", "x", env="prod", release="r2", instance="prod-r2-aa")
    state.close()
    samples = parse(render(state_families(tmp_path / "state.db")))
    prod = {"env": "prod"}
    # A rebuilt rollback is a rollback, not a release.
    assert buckets(samples, "kiln_release_duration_seconds", **prod, strategy="canary")[5:7] == [
        (60.0, 0),
        (120.0, 1),
    ]
    assert (
        "kiln_release_duration_seconds_count",
        frozenset({**prod, "strategy": "rollback"}.items()),
    ) not in samples
    assert value(samples, "kiln_rollback_duration_seconds_count", **prod, kind="rebuilt") == 1
    assert (
        value(samples, "kiln_rollback_duration_seconds_bucket", **prod, kind="warm", le="0.01") == 1
    )
    assert value(samples, "kiln_instances", **prod, release="r2", state="ready") == 1
    assert value(samples, "kiln_instance_replacements_total", **prod) == 1
    assert value(samples, "kiln_instance_failures_total", **prod) == 0  # zero, not absent
    assert value(samples, "kiln_releases", **prod, state="serving") == 2


def test_metrics_listen_address_is_checked() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    for bad in ("9464x", "localhost", "127.0.0.1:99999"):
        with pytest.raises(UsageError, match="KILN_METRICS_LISTEN must be HOST:PORT"):
            parse_listen(bad)


# -- end to end -----------------------------------------------------------------
def unix_get(path: Path, target: str) -> tuple[int, str, str]:
    """GET over a unix socket, HTTP/1.0 so that the server closes when done."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(f"GET {target} HTTP/1.0\r\nHost: kiln\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    content_type = next(
        (h.split(":", 1)[1].strip() for h in lines if h.lower().startswith("content-type:")), ""
    )
    return int(lines[0].split()[1]), content_type, body.decode()


@pytest.fixture
def metrics_port(monkeypatch: pytest.MonkeyPatch, kiln_env: Path) -> Iterator[int]:
    port = free_port()
    monkeypatch.setenv("KILN_METRICS_LISTEN", f"127.0.0.1:{port}")
    yield port
    cleanup(kiln_env)


@pytest.mark.slow
def test_daemon_and_router_metrics_on_a_live_release(
    tmp_path: Path, kiln_env: Path, metrics_port: int
) -> None:
    port = free_port()
    image = chatty_app(tmp_path / "app", port, {"CHATTY_LINES": "30"})
    first = release(image)
    for _ in range(25):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            assert resp.status == 200
    release(image)  # r2, then back to the warm r1
    back = run_kiln("rollback", "--env", "staging", "--json")
    assert back.code == 0, back.err
    victim = next(i for i in first["instances"])
    pid = next(
        i["pid"] for i in run_kiln("ps", "--json").json()["instances"] if i["id"] == victim["id"]
    )
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, ctype, text = unix_get(kiln_env / "run" / "daemon.sock", "/metrics")
        samples = parse(text)
        ready = samples.get(
            (
                "kiln_instances",
                frozenset({"env": "staging", "release": "r1", "state": "ready"}.items()),
            )
        )
        if ready == 2 and value(samples, "kiln_instance_replacements_total", env="staging") >= 1:
            break
        time.sleep(0.3)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    rel = {"env": "staging", "release": "r1"}
    # Every request is counted once. (The router counts a response whose client
    # hung up before the router's own bookkeeping finished as aborted, even if
    # the whole body went out; under load that is a share of these.)
    ok = value(samples, "kiln_http_requests_total", **rel, **{"class": "2xx"})
    assert ok + value(samples, "kiln_http_requests_aborted_total", **rel) == 25 and ok >= 1
    hist = buckets(samples, "kiln_http_request_duration_seconds", **rel)
    assert [b for b, _ in hist][-1] == float("inf")
    assert [n for _, n in hist] == sorted(n for _, n in hist)  # cumulative
    assert hist[-1][1] == value(samples, "kiln_http_request_duration_seconds_count", **rel)
    assert value(samples, "kiln_router_up") == 1
    assert value(samples, "kiln_instances", **rel, state="ready") == 2
    assert value(samples, "kiln_instance_replacements_total", env="staging") >= 1
    assert value(samples, "kiln_instance_failures_total", env="staging") >= 1
    assert (
        value(samples, "kiln_release_duration_seconds_count", env="staging", strategy="blue-green")
        == 2
    )
    assert value(samples, "kiln_rollback_duration_seconds_count", env="staging", kind="warm") == 1
    assert value(samples, "kiln_rollback_duration_seconds_sum", env="staging", kind="warm") < 5
    assert value(samples, "kiln_events_total", kind="release.started", env="staging") == 2
    assert value(samples, "kiln_releases", env="staging", state="serving") == 1
    assert value(samples, "kiln_log_lines_ingested_total", env="staging", stream="stdout") >= 60
    assert value(samples, "kiln_log_lag_bytes") >= 0
    assert value(samples, "kiln_log_store_bytes") > 0
    # The router says the same about requests, in its own /metrics.
    status, ctype, router_text = unix_get(kiln_env / "run" / "router.sock", "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    router = parse(router_text)
    key = ("kiln_http_requests_total", frozenset({**rel, "class": "2xx"}.items()))
    assert router[key] == samples[key]
    # And so does the daemon's TCP listener, which serves nothing else.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        tcp = parse(resp.read().decode())
    assert tcp[key] == samples[key]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/status", timeout=5)
    assert info.value.code == 404
    info.value.close()
    # The JSON API is untouched beside it.
    status, ctype, health = unix_get(kiln_env / "run" / "daemon.sock", "/health")
    assert status == 200 and json.loads(health)["ok"] is True
