"""Upstreams and clients misbehaving: what is retried, what fails, what is counted."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from routerkit import RawUpstream, Routers, UpstreamServer, env, free_port, get


def _ok(wfile: Any, body: bytes = b"ok\n") -> None:
    wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


@pytest.fixture
def raw() -> Iterator[Callable[[Callable[[Any, int], bool]], RawUpstream]]:
    started: list[RawUpstream] = []

    def start(behave: Callable[[Any, int], bool]) -> RawUpstream:
        up = RawUpstream(behave)
        started.append(up)
        return up

    yield start
    for up in started:
        up.stop()


def _release_stats(router: Any, release: str = "r1") -> dict[str, Any]:
    return router.client.stats()["envs"]["prod"]["releases"][release]  # type: ignore[no-any-return]


def test_reused_connection_closed_by_upstream_is_retried_for_any_method(
    routers: Routers, raw: Callable[[Callable[[Any, int], bool]], RawUpstream]
) -> None:
    # Each connection answers once and then drops the next request unread:
    # an instance whose keep-alive timeout fires just as the router reuses
    # the connection.
    def once(wfile: Any, nth: int) -> bool:
        if nth == 0:
            _ok(wfile)
            return True
        return False

    app = raw(once)
    router = routers.start()
    port = free_port()
    router.client.put_config(routers.config({"prod": env(port, ("r1", 100, [app.addr]))}))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for i in range(40):
        method = "POST" if i % 2 else "GET"
        conn.request(method, "/", body=b"data" if method == "POST" else None)
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"ok\n")
    conn.close()
    stats = _release_stats(router)
    assert stats["requests"] == {"2xx": 40, "3xx": 0, "4xx": 0, "5xx": 0, "failed": 0}
    assert app.requests >= 79  # every reuse was tried, failed, and retried fresh


def test_upstream_closing_without_answer(
    routers: Routers,
    raw: Callable[[Callable[[Any, int], bool]], RawUpstream],
    upstreams: Callable[[str], UpstreamServer],
) -> None:
    mute = raw(lambda wfile, nth: False)
    good = upstreams("good")
    router = routers.start()
    port = free_port()
    router.client.put_config(
        routers.config(
            {"prod": env(port, ("r1", 100, [mute.addr, good])), "other": env(free_port())}
        )
    )
    # A GET may safely be sent again, to another instance.
    for _ in range(6):
        assert get(port)[::2] == (200, b"good\n")
    assert mute.requests >= 1
    # A POST on a fresh connection may have been acted on: no second try.
    router.client.put_config(routers.config({"prod": env(port, ("r1", 100, [mute.addr]))}))
    status, _, _ = get(port, "/", method="POST")
    assert status == 502
    assert _release_stats(router)["requests"]["failed"] == 1


def test_upstream_dying_mid_response_cuts_the_response_short(
    routers: Routers, raw: Callable[[Callable[[Any, int], bool]], RawUpstream]
) -> None:
    def dies(wfile: Any, nth: int) -> bool:
        wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly a bit")
        return False

    app = raw(dies)
    router = routers.start()
    port = free_port()
    router.client.put_config(routers.config({"prod": env(port, ("r1", 100, [app.addr]))}))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/")
    response = conn.getresponse()
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    conn.close()
    assert _release_stats(router)["requests"]["failed"] == 1


def test_garbage_from_upstream_is_502(
    routers: Routers, raw: Callable[[Callable[[Any, int], bool]], RawUpstream]
) -> None:
    def garbage(wfile: Any, nth: int) -> bool:
        wfile.write(b"SPAM SPAM SPAM\r\n\r\n")
        return True

    app = raw(garbage)
    router = routers.start()
    port = free_port()
    router.client.put_config(routers.config({"prod": env(port, ("r1", 100, [app.addr]))}))
    assert get(port, "/", method="POST")[0] == 502
    assert _release_stats(router)["requests"]["failed"] == 1


def test_response_timeout_is_504(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    app = upstreams("sleepy")
    router = routers.start(extra_args=["--response-timeout", "0.5"])
    port = free_port()
    router.client.put_config(routers.config({"prod": env(port, ("r1", 100, [app]))}))
    started = time.monotonic()
    assert get(port, "/slow?s=3")[0] == 504
    assert time.monotonic() - started < 2.5
    stats = _release_stats(router)
    assert stats["requests"]["failed"] == 1
    assert stats["instances"]["i-r1-0"]["inflight"] == 0


def test_client_going_away_is_counted_as_aborted(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    app = upstreams("app")
    router = routers.start()
    port = free_port()
    router.client.put_config(routers.config({"prod": env(port, ("r1", 100, [app]))}))
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /slow?s=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.1)
    time.sleep(0.2)
    stats = _release_stats(router)
    assert stats["aborted"] == 1
    assert stats["instances"]["i-r1-0"]["inflight"] == 0
    assert stats["requests"]["failed"] == 0
    assert get(port)[0] == 200


def test_upgrade_requests_are_proxied_as_plain_requests(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> None:
    app = upstreams("app")
    router = routers.start()
    port = free_port()
    router.client.put_config(routers.config({"prod": env(port, ("r1", 100, [app]))}))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            b"GET /headers HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert b"pgrade" not in data.split(b"\r\n\r\n", 2)[1]  # the instance never saw it
    assert data.endswith(b"app\n")
