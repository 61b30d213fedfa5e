"""The control API itself: shapes, errors, persistence."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from routerkit import Routers, UpstreamServer, env, free_port, get

from kiln.router.client import RouterResponseError


def _raw_control(path: os.PathLike[str], request: bytes) -> tuple[int, dict[str, object]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(os.fspath(path))
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep and b"Content-Length: %d" % len(body) in head:
                break
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.partition(b"\r\n\r\n")[2])


def test_health_and_stats_shape(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    app = upstreams("app")
    router = routers.start()
    health = router.client.health()
    assert health["ok"] is True
    assert health["pid"] == router.pid
    assert health["generation"] == 0
    port = free_port()
    router.client.put_config(routers.config({"prod": env(port, ("r1", 100, [app]))}))
    for _ in range(5):
        get(port)
    stats = router.client.stats()
    assert stats["pid"] == router.pid
    assert isinstance(stats["started_at"], float)
    assert stats["generation"] == 1
    assert stats["latency_buckets"][0] == 0.001
    release = stats["envs"]["prod"]["releases"]["r1"]
    assert release["weight"] == 100
    assert release["requests"] == {"2xx": 5, "3xx": 0, "4xx": 0, "5xx": 0, "failed": 0}
    assert release["latency"]["count"] == 5
    assert release["latency"]["buckets"]["+Inf"] == 5
    assert list(release["latency"]["buckets"])[-2:] == ["10", "+Inf"]
    instance = release["instances"]["i-r1-0"]
    assert instance["addr"] == app.addr
    assert instance["inflight"] == 0
    assert instance["connections"] == 1
    # Counters survive config changes (consumers compute deltas).
    router.client.put_config(routers.config({"prod": env(port, ("r2", 100, [app]))}))
    get(port)
    releases = router.client.stats()["envs"]["prod"]["releases"]
    assert releases["r1"]["requests"]["2xx"] == 5
    assert releases["r1"]["weight"] is None  # no longer configured
    assert releases["r2"]["requests"]["2xx"] == 1


def test_accepted_config_is_persisted(routers: Routers) -> None:
    router = routers.start()
    config = routers.config({"prod": env(free_port())})
    router.client.put_config(config)
    assert json.loads(router.state.read_text()) == config
    assert router.client.get_config() == config


def test_errors_are_json(routers: Routers) -> None:
    router = routers.start()
    cases = [
        (b"GET /nope HTTP/1.1\r\nHost: r\r\n\r\n", 404),
        (b"DELETE /config HTTP/1.1\r\nHost: r\r\n\r\n", 405),
        (b"PUT /config HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\n\r\n{nope", 400),
        (b"POST /shutdown?drain=soon HTTP/1.1\r\nHost: r\r\n\r\n", 400),
        (b"NONSENSE\r\n\r\n", 400),
    ]
    for request, expected in cases:
        status, payload = _raw_control(router.control, request)
        assert status == expected
        assert isinstance(payload["error"], str)
    assert router.client.health()["ok"] is True


def test_control_connection_keep_alive(routers: Routers) -> None:
    router = routers.start()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(os.fspath(router.control))
        for _ in range(3):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: r\r\n\r\n")
            data = s.recv(65536)
            assert data.startswith(b"HTTP/1.1 200 OK")


def test_unsavable_state_is_reported_but_the_config_is_live(
    routers: Routers, workdir: Path
) -> None:
    blocker = workdir / "state"
    router = routers.start(state=blocker / "router.json")
    blocker.write_text("a file where the state directory should be")
    config = routers.config({"prod": env(free_port())})
    with pytest.raises(RouterResponseError) as err:
        router.client.put_config(config)
    assert err.value.status == 500
    assert "could not be saved" in str(err.value)
    assert router.client.get_config() == config
    # ... and a router started with that state path still comes up.
    router.proc.kill()
    router.wait_exit()
    again = routers.start(state=blocker / "router.json")
    assert again.client.get_config()["generation"] == 0
