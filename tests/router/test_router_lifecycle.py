"""Router processes coming and going: takeover, restart, drain; all under load."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import TracebackType

import pytest
from routerkit import Routers, UpstreamServer, env, free_port, get

from kiln.errors import RouterError
from kiln.router.client import RouterClient, RouterResponseError
from kiln.router.handover import Takeover


class Hammer:
    """Client threads sending requests back to back on keep-alive connections.

    Deliberately strict: no retries, every exception and every unexpected
    answer is a failure. Half the threads POST a body and expect it echoed.
    """

    def __init__(self, port: int, names: set[str], threads: int = 8) -> None:
        self.port = port
        self.names = names
        self.count = 0
        self.seen: Counter[str] = Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]

    def __enter__(self) -> Hammer:
        for t in self._threads:
            t.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def wait_for(self, more: int, timeout: float = 20.0) -> None:
        target = self.count + more
        deadline = time.monotonic() + timeout
        while self.count < target:
            assert time.monotonic() < deadline, f"only {self.count} of {target} requests done"
            assert not self.failures, self.failures[:5]
            time.sleep(0.01)

    def _run(self, index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        n = 0
        while not self._stop.is_set():
            n += 1
            post = index % 2 == 1
            payload = f"{index}-{n}-".encode() * 50
            try:
                if post:
                    conn.request("POST", "/echo", body=payload)
                else:
                    conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read()
                name = response.getheader("X-Upstream", "")
                ok = response.status == 200 and name in self.names
                ok = ok and body == (payload if post else f"{name}\n".encode())
                result = None if ok else f"{response.status} {name!r} {body[:80]!r}"
            except Exception as exc:
                result = f"{type(exc).__name__}: {exc}"
                conn.close()
            with self._lock:
                if result is None:
                    self.count += 1
                    self.seen[name] += 1
                else:
                    self.failures.append(result)
        conn.close()


def test_takeover_under_load_loses_nothing(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    blue, green = upstreams("blue"), upstreams("green")
    first = routers.start()
    port = free_port()
    config = routers.config({"prod": env(port, ("r1", 50, [blue]), ("r2", 50, [green]))})
    first.client.put_config(config)
    with Hammer(port, {"blue", "green"}) as hammer:
        hammer.wait_for(300)
        current = first
        for _ in range(2):  # an upgrade, then another one
            successor = routers.start(takeover=current.control)
            assert current.wait_exit(20) == 0
            assert successor.client.health()["pid"] == successor.pid
            hammer.wait_for(300)
            current = successor
        hammer.wait_for(300)
    assert hammer.failures == []
    assert set(hammer.seen) == {"blue", "green"}
    assert current.client.get_config() == config
    releases = current.client.stats()["envs"]["prod"]["releases"]
    assert releases["r1"]["requests"]["2xx"] + releases["r2"]["requests"]["2xx"] >= 300
    assert releases["r1"]["requests"]["failed"] == releases["r2"]["requests"]["failed"] == 0


def test_takeover_lets_the_old_router_finish_slow_requests(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    app = upstreams("app")
    old = routers.start()
    port = free_port()
    old.client.put_config(routers.config({"prod": env(port, ("r1", 100, [app]))}))
    result: list[tuple[int, bytes]] = []
    slow = threading.Thread(target=lambda: result.append(get(port, "/slow?s=1.5")[::2]))
    slow.start()
    time.sleep(0.3)
    new = routers.start(takeover=old.control)
    assert get(port)[::2] == (200, b"app\n")  # served by the new one
    assert old.alive()  # still finishing the slow request
    slow.join(10)
    assert result == [(200, b"app\n")]
    assert old.wait_exit(10) == 0
    assert new.client.health()["pid"] == new.pid


def test_config_switches_under_load_lose_nothing(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    apps = {name: upstreams(name) for name in ("blue", "green", "canary")}
    router = routers.start()
    port = free_port()
    router.client.put_config(routers.config({"prod": env(port, ("r1", 100, [apps["blue"]]))}))
    steps = [
        (("r1", 90, [apps["blue"]]), ("r2", 10, [apps["green"]])),
        (("r1", 50, [apps["blue"]]), ("r2", 50, [apps["green"], apps["canary"]])),
        (("r1", 0, [apps["blue"]]), ("r2", 100, [apps["green"], apps["canary"]])),
        (("r2", 100, [apps["green"]]),),  # r1 and one instance removed
        (("r2", 100, [apps["green"]]), ("r3", 1, [apps["canary"]])),
        (("r3", 100, [apps["canary"]]),),
        (("r1", 100, [apps["blue"]]),),  # rollback
    ]
    with Hammer(port, set(apps)) as hammer:
        hammer.wait_for(100)
        for _ in range(3):
            for pools in steps:
                router.client.put_config(routers.config({"prod": env(port, *pools)}))
                hammer.wait_for(40)
    assert hammer.failures == []
    assert set(hammer.seen) == set(apps)


def test_restart_after_kill_restores_the_last_config(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    app = upstreams("app")
    first = routers.start()
    port = free_port()
    config = routers.config({"prod": env(port, ("r1", 100, [app]))})
    first.client.put_config(config)
    assert get(port)[0] == 200
    os.kill(first.pid, signal.SIGKILL)
    first.wait_exit()
    assert first.control.exists()  # stale socket left behind
    second = routers.start()  # nobody re-sends the config
    assert second.client.get_config() == config
    status, headers, body = get(port)
    assert (status, body, headers["x-kiln-release"]) == (200, b"app\n", "r1")


def test_shutdown_drains_in_flight_requests(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    app = upstreams("app")
    router = routers.start()
    port = free_port()
    router.client.put_config(routers.config({"prod": env(port, ("r1", 100, [app]))}))
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    idle.request("GET", "/")
    idle.getresponse().read()
    result: list[tuple[int, bytes]] = []
    slow = threading.Thread(target=lambda: result.append(get(port, "/slow?s=1")[::2]))
    slow.start()
    time.sleep(0.2)
    started = time.monotonic()
    router.client.shutdown(drain=10)
    time.sleep(0.1)
    with pytest.raises(ConnectionRefusedError):
        get(port)
    slow.join(10)
    assert result == [(200, b"app\n")]
    assert router.wait_exit(10) == 0
    assert time.monotonic() - started < 5  # the idle keep-alive connection did not hold it up
    assert not router.control.exists()
    idle.close()


def test_sigterm_exits_cleanly(routers: Routers) -> None:
    router = routers.start()
    router.proc.send_signal(signal.SIGTERM)
    assert router.wait_exit(10) == 0


def test_second_router_without_takeover_refuses_to_start(routers: Routers) -> None:
    first = routers.start()
    with pytest.raises(RouterError, match="exited with status 1"):
        routers.start()
    assert first.client.health()["pid"] == first.pid


def test_abandoned_takeover_leaves_the_old_router_in_charge(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    app = upstreams("app")
    router = routers.start()
    port = free_port()
    router.client.put_config(routers.config({"prod": env(port, ("r1", 100, [app]))}))
    takeover = Takeover(router.control)
    config, sockets = takeover.fetch()
    assert config == router.client.get_config()
    assert [str(addr) for addr in sockets] == [f"127.0.0.1:{port}"]
    # While a successor holds the handover, config changes wait for it.
    with pytest.raises(RouterResponseError) as err:
        router.client.put_config(routers.config({"prod": env(port, ("r2", 100, [app]))}))
    assert err.value.status == 503
    for sock in sockets.values():
        sock.close()
    takeover.abandon()
    deadline = time.monotonic() + 5
    while True:
        try:
            router.client.put_config(routers.config({"prod": env(port, ("r2", 100, [app]))}))
            break
        except RouterResponseError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert get(port)[1]["x-kiln-release"] == "r2"


def test_takeover_of_a_missing_router_fails(routers: Routers) -> None:
    with pytest.raises(RouterError, match="exited with status 1"):
        routers.start(takeover=routers.workdir / "nobody.sock")


def test_control_client_reports_unreachable_router(routers: Routers) -> None:
    client = RouterClient(routers.workdir / "nobody.sock", timeout=1)
    with pytest.raises(RouterError, match="not reachable"):
        client.health()
    assert client.is_running() is False
