"""Which instance a request reaches, and what happens when instances go away."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from routerkit import Routers, UpstreamServer, env, free_port, get

from kiln.errors import RouterError
from kiln.router.client import RouterResponseError


def _names(port: int, n: int, connections: int = 4, path: str = "/") -> Counter[str]:
    """Send ``n`` requests over a few keep-alive connections; count who answered."""

    def worker(count: int) -> Counter[str]:
        seen: Counter[str] = Counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(count):
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, body
            seen[body.decode().strip()] += 1
        conn.close()
        return seen

    total: Counter[str] = Counter()
    with ThreadPoolExecutor(connections) as pool:
        for seen in pool.map(worker, [n // connections] * connections):
            total += seen
    return total


def test_weights_are_honoured(routers: Routers, upstreams: Callable[[str], UpstreamServer]) -> None:
    blue, green = upstreams("blue"), upstreams("green")
    router = routers.start()
    port = free_port()
    router.client.put_config(
        routers.config({"prod": env(port, ("r1", 90, [blue]), ("r2", 10, [green]))})
    )
    seen = _names(port, 3000)
    assert sum(seen.values()) == 3000
    assert abs(seen["blue"] / 3000 - 0.90) <= 0.03
    assert abs(seen["green"] / 3000 - 0.10) <= 0.03
    stats = router.client.stats()["envs"]["prod"]["releases"]
    assert stats["r1"]["requests"]["2xx"] == seen["blue"]
    assert stats["r2"]["requests"]["2xx"] == seen["green"]
    assert stats["r1"]["latency"]["count"] == seen["blue"]


def test_instances_within_a_pool_share_the_load(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    apps = [upstreams(f"app{i}") for i in range(3)]
    router = routers.start()
    port = free_port()
    router.client.put_config(routers.config({"prod": env(port, ("r1", 1, apps))}))
    seen = _names(port, 600)
    assert set(seen) == {"app0", "app1", "app2"}
    assert min(seen.values()) >= 100


def test_weight_switch_is_atomic(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    blue, green = upstreams("blue"), upstreams("green")
    router = routers.start()
    port = free_port()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for i in range(10):
        target = "blue" if i % 2 == 0 else "green"
        weights = (100, 0) if target == "blue" else (0, 100)
        router.client.put_config(
            routers.config(
                {"prod": env(port, ("r1", weights[0], [blue]), ("r2", weights[1], [green]))}
            )
        )
        fresh = Counter(get(port)[2].decode().strip() for _ in range(5))  # new connections
        reused = Counter()
        for _ in range(20):  # an old keep-alive connection
            conn.request("GET", "/")
            reused[conn.getresponse().read().decode().strip()] += 1
        assert fresh == {target: 5}
        assert reused == {target: 20}
    conn.close()


def test_pin_header_reaches_a_weight_zero_pool(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    blue, green = upstreams("blue"), upstreams("green")
    router = routers.start()
    port = free_port()
    router.client.put_config(
        routers.config({"prod": env(port, ("r1", 100, [blue]), ("r2", 0, [green]))})
    )
    for _ in range(10):
        status, headers, body = get(port, headers={"X-Kiln-Release": "r2"})
        assert (status, body, headers["x-kiln-release"]) == (200, b"green\n", "r2")
        assert get(port)[2] == b"blue\n"
    # An unknown release is ignored, not an error.
    assert get(port, headers={"X-Kiln-Release": "r9"})[2] == b"blue\n"


def test_pin_by_alias(routers: Routers, upstreams: Callable[[str], UpstreamServer]) -> None:
    blue, green = upstreams("blue"), upstreams("green")
    router = routers.start()
    port = free_port()
    config = routers.config({"prod": env(port, ("r1", 100, [blue]), ("r2", 0, [green]))})
    config["envs"]["prod"]["pools"][1]["aliases"] = ["canary"]
    config["envs"]["prod"]["pools"][0]["aliases"] = ["stable"]
    router.client.put_config(config)
    for _ in range(5):
        status, headers, body = get(port, headers={"X-Kiln-Release": "canary"})
        assert (status, body, headers["x-kiln-release"]) == (200, b"green\n", "r2")
        assert get(port, headers={"X-Kiln-Release": "stable"})[2] == b"blue\n"
    config["envs"]["prod"]["pools"][0]["aliases"] = ["r2"]
    with pytest.raises(RouterError, match="'r2' appears twice"):
        router.client.put_config(config)


def test_sticky_cookie(routers: Routers, upstreams: Callable[[str], UpstreamServer]) -> None:
    blue, green = upstreams("blue"), upstreams("green")
    router = routers.start()
    port = free_port()
    router.client.put_config(
        routers.config({"prod": env(port, ("r1", 50, [blue]), ("r2", 50, [green]), sticky=True)})
    )
    status, headers, body = get(port)
    release = headers["x-kiln-release"]
    assert headers["set-cookie"].startswith(f"kiln_release={release};")
    cookie = {"Cookie": f"theme=dark; kiln_release={release}"}
    for _ in range(20):
        status, headers, again = get(port, headers=cookie)
        assert (status, again) == (200, body)
        assert "set-cookie" not in headers  # already right
    # Once that release has no weight, the cookie is not honoured any more.
    weights = {"r1": 0, "r2": 100} if release == "r1" else {"r1": 100, "r2": 0}
    router.client.put_config(
        routers.config(
            {
                "prod": env(
                    port, ("r1", weights["r1"], [blue]), ("r2", weights["r2"], [green]), sticky=True
                )
            }
        )
    )
    status, headers, moved = get(port, headers=cookie)
    assert moved != body
    assert headers["set-cookie"].startswith(f"kiln_release={headers['x-kiln-release']};")


def test_refusing_instance_is_skipped_without_failures(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    app = upstreams("alive")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    router = routers.start()
    port = free_port()
    router.client.put_config(
        routers.config({"prod": env(port, ("r1", 50, [dead, app]), ("r2", 50, [dead]))})
    )
    seen = _names(port, 400)
    assert seen == {"alive": 400}
    releases = router.client.stats()["envs"]["prod"]["releases"]
    assert releases["r1"]["requests"]["failed"] == 0
    assert releases["r2"]["requests"]["failed"] == 0


def test_no_instance_left_is_503_and_counted(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    router = routers.start()
    port = free_port()
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    router.client.put_config(routers.config({"prod": env(port, ("r1", 100, dead))}))
    for _ in range(3):
        status, _, _ = get(port)
        assert status == 503
    assert router.client.stats()["envs"]["prod"]["releases"]["r1"]["requests"]["failed"] == 3
    # An environment without any pool answers 503 too.
    router.client.put_config(routers.config({"prod": env(port)}))
    assert get(port)[0] == 503
    assert router.client.stats()["envs"]["prod"]["failed"] == 1


def test_removed_instance_finishes_its_slow_request(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    old, new = upstreams("old"), upstreams("new")
    router = routers.start()
    port = free_port()
    router.client.put_config(routers.config({"prod": env(port, ("r1", 100, [old]))}))
    result: list[tuple[int, bytes]] = []
    slow = threading.Thread(target=lambda: result.append(get(port, "/slow?s=1.5")[::2]))
    slow.start()
    time.sleep(0.3)
    router.client.put_config(routers.config({"prod": env(port, ("r2", 100, [new]))}))
    # The old instance is draining: still listed, one request in flight.
    instance = router.client.stats()["envs"]["prod"]["releases"]["r1"]["instances"]["i-r1-0"]
    assert instance["inflight"] == 1
    assert instance["draining"] is True
    assert get(port)[2] == b"new\n"
    slow.join(10)
    assert result == [(200, b"old\n")]
    instance = router.client.stats()["envs"]["prod"]["releases"]["r1"]["instances"].get("i-r1-0")
    assert instance is None or instance["inflight"] == 0


def test_port_taken_is_409_and_keeps_the_old_config(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    app = upstreams("app")
    router = routers.start()
    port = free_port()
    first = routers.config({"prod": env(port, ("r1", 100, [app]))})
    router.client.put_config(first)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        second = routers.config(
            {"prod": env(port, ("r2", 100, [app])), "staging": env(taken, ("r1", 100, [app]))}
        )
        with pytest.raises(RouterResponseError) as err:
            router.client.put_config(second)
        assert err.value.status == 409
        assert f"127.0.0.1:{taken}" in str(err.value)
    assert router.client.get_config() == router.client.get_config() | first
    assert router.client.health()["generation"] == first["generation"]
    status, headers, _ = get(port)
    assert (status, headers["x-kiln-release"]) == (200, "r1")


def test_environments_come_and_go(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    app = upstreams("app")
    router = routers.start()
    prod, staging = free_port(), free_port()
    router.client.put_config(routers.config({"prod": env(prod, ("r1", 100, [app]))}))
    router.client.put_config(
        routers.config(
            {"prod": env(prod, ("r1", 100, [app])), "staging": env(staging, ("r1", 100, [app]))}
        )
    )
    assert get(staging)[0] == 200
    router.client.put_config(routers.config({"staging": env(staging, ("r1", 100, [app]))}))
    with pytest.raises(ConnectionRefusedError):
        get(prod)
    assert get(staging)[0] == 200
    # An address can move to another environment in one step.
    router.client.put_config(routers.config({"other": env(staging, ("r7", 100, [app]))}))
    assert get(staging)[1]["x-kiln-release"] == "r7"


def test_invalid_config_is_400(routers: Routers) -> None:
    router = routers.start()
    for bad in (
        {"generation": 1, "envs": {"prod": {"listen": "nowhere"}}},
        {"generation": 1, "envs": {"prod": {"listen": "127.0.0.1:1", "pools": [{"weight": 1}]}}},
        {"generation": -1, "envs": {}},
        {"generation": 1, "envs": {"a": {"listen": "127.0.0.1:9"}, "b": {"listen": "127.0.0.1:9"}}},
    ):
        with pytest.raises(RouterResponseError) as err:
            router.client.put_config(bad)
        assert err.value.status == 400
    assert router.client.get_config() == {"generation": 0, "envs": {}}
