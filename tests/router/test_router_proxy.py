"""HTTP proxying through a real router process."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from routerkit import RouterProc, Routers, UpstreamServer, env, free_port, get, raw_exchange


@pytest.fixture
def one(
    routers: Routers, upstreams: Callable[[str], UpstreamServer]
) -> tuple[RouterProc, int, UpstreamServer]:
    """A router with one environment whose single release has one instance."""
    app = upstreams("alpha")
    router = routers.start()
    port = free_port()
    router.client.put_config(routers.config({"prod": env(port, ("r1", 100, [app]))}))
    return router, port, app


def test_get_adds_release_instance_and_forwarded_headers(
    one: tuple[RouterProc, int, UpstreamServer],
) -> None:
    _, port, _ = one
    status, headers, body = get(port, "/headers", {"X-Forwarded-For": "10.0.0.9"})
    assert status == 200
    assert headers["x-kiln-release"] == "r1"
    assert headers["x-kiln-instance"] == "i-r1-0"
    seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert seen["x-forwarded-for"] == "10.0.0.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{port}"
    assert seen["host"] == f"127.0.0.1:{port}"


def test_hop_by_hop_headers_are_stripped_both_ways(
    one: tuple[RouterProc, int, UpstreamServer],
) -> None:
    _, port, _ = one
    status, _, body = get(
        port,
        "/headers",
        {"Connection": "keep-alive, X-Private", "X-Private": "1", "Keep-Alive": "300", "TE": "x"},
    )
    names = {k.lower() for k, _ in json.loads(body)["headers"]}
    assert status == 200
    assert not names & {"connection", "keep-alive", "te", "x-private"}
    status, headers, body = get(port, "/hop")
    assert (status, body) == (200, b"ok")
    assert "keep-alive" not in headers
    assert "x-secret" not in headers
    assert headers["x-kiln-release"] == "r1"  # not the instance's spoofed value


def test_post_with_content_length(one: tuple[RouterProc, int, UpstreamServer]) -> None:
    _, port, _ = one
    payload = b"x" * 300_000
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/echo", body=payload)
    response = conn.getresponse()
    assert response.status == 200
    assert response.read() == payload
    conn.close()


def test_post_with_chunked_body(one: tuple[RouterProc, int, UpstreamServer]) -> None:
    _, port, _ = one
    parts = [b"hello ", b"chunked ", b"world" * 10_000]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/echo", body=iter(parts), encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 200
    assert response.read() == b"".join(parts)
    conn.close()


def test_keep_alive_reuses_client_and_upstream_connections(
    one: tuple[RouterProc, int, UpstreamServer],
) -> None:
    router, port, _ = one
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    client_ports = set()
    upstream_ports = set()
    for _ in range(20):
        conn.request("GET", "/headers")
        response = conn.getresponse()
        info = json.loads(response.read())
        upstream_ports.add(info["peer_port"])
        assert conn.sock is not None
        client_ports.add(conn.sock.getsockname()[1])
    conn.close()
    assert len(client_ports) == 1
    assert len(upstream_ports) == 1
    instance = router.client.stats()["envs"]["prod"]["releases"]["r1"]["instances"]["i-r1-0"]
    assert instance["connections"] == 1
    assert instance["inflight"] == 0


def test_head_has_no_body_and_keeps_the_connection_usable(
    one: tuple[RouterProc, int, UpstreamServer],
) -> None:
    _, port, _ = one
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(3):
        conn.request("HEAD", "/")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Length") == "6"
        assert response.read() == b""
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.read() == b"alpha\n"
    conn.close()


@pytest.mark.parametrize("code", [204, 304])
def test_no_body_statuses(one: tuple[RouterProc, int, UpstreamServer], code: int) -> None:
    _, port, _ = one
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", f"/status?code={code}")
    response = conn.getresponse()
    assert response.status == code
    assert response.read() == b""
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"alpha\n"
    conn.close()


def _router_peak_rss_kib(router: RouterProc) -> int:
    status = Path(f"/proc/{router.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])


@pytest.mark.parametrize("chunked", [False, True])
def test_large_response_is_streamed(
    one: tuple[RouterProc, int, UpstreamServer], chunked: bool
) -> None:
    router, port, _ = one
    size = 48 * 1024 * 1024
    before = _router_peak_rss_kib(router)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/big?n={size}&chunked={int(chunked)}")
    response = conn.getresponse()
    assert response.status == 200
    digest = hashlib.sha256()
    got = 0
    while chunk := response.read(1 << 20):
        digest.update(chunk)
        got += len(chunk)
    conn.close()
    block = bytes(range(256)) * 256
    expected = hashlib.sha256(block * (size // len(block))).hexdigest()
    assert got == size
    assert digest.hexdigest() == expected
    # Buffering the whole body would add ~48 MiB.
    assert _router_peak_rss_kib(router) - before < 16 * 1024


@pytest.mark.parametrize("chunked", [False, True])
def test_large_upload_is_streamed(
    one: tuple[RouterProc, int, UpstreamServer], chunked: bool
) -> None:
    router, port, _ = one
    block = bytes(range(256)) * 256
    count = 512  # 32 MiB
    before = _router_peak_rss_kib(router)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    if chunked:
        conn.request("POST", "/sink", body=(block for _ in range(count)), encode_chunked=True)
    else:
        conn.request(
            "POST",
            "/sink",
            body=(block for _ in range(count)),
            headers={"Content-Length": str(len(block) * count)},
        )
    response = conn.getresponse()
    size, digest = response.read().decode().split()
    conn.close()
    assert response.status == 200
    assert int(size) == len(block) * count
    assert digest == hashlib.sha256(block * count).hexdigest()
    assert _router_peak_rss_kib(router) - before < 16 * 1024


def test_close_delimited_response_reaches_http11_client_chunked(
    one: tuple[RouterProc, int, UpstreamServer],
) -> None:
    _, port, _ = one
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/close")
    response = conn.getresponse()
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.read() == b"alpha until close\n" * 100
    # ... so the client connection survives it.
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"alpha\n"
    conn.close()


def test_http10_client(one: tuple[RouterProc, int, UpstreamServer]) -> None:
    _, port, _ = one
    reply = raw_exchange(port, b"GET / HTTP/1.0\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Connection: close" in head
    assert body == b"alpha\n"
    reply = raw_exchange(port, b"GET /close HTTP/1.0\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert body == b"alpha until close\n" * 100


def test_http10_keep_alive(one: tuple[RouterProc, int, UpstreamServer]) -> None:
    _, port, _ = one
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for _ in range(2):
            s.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            data = b""
            while not data.endswith(b"alpha\n"):
                data += s.recv(4096)
            assert b"Connection: keep-alive" in data


def test_pipelined_requests_are_answered_in_order(
    one: tuple[RouterProc, int, UpstreamServer],
) -> None:
    _, port, _ = one
    requests = b"".join(
        b"GET /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n%02d" % i for i in range(5)
    )
    reply = raw_exchange(port, requests + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    bodies = [part.split(b"\r\n\r\n", 1)[1][:2] for part in reply.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies == [b"00", b"01", b"02", b"03", b"04", b"al"]


@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    ],
)
def test_malformed_requests_get_400(
    one: tuple[RouterProc, int, UpstreamServer], garbage: bytes
) -> None:
    _, port, app = one
    reply = raw_exchange(port, garbage)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert app.hits == 0


def test_connect_is_refused(one: tuple[RouterProc, int, UpstreamServer]) -> None:
    _, port, _ = one
    reply = raw_exchange(port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 405 ")


def test_expect_100_continue(one: tuple[RouterProc, int, UpstreamServer]) -> None:
    _, port, _ = one
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        data = b""
        while not data.endswith(b"hello"):
            data += s.recv(4096)
        assert data.startswith(b"HTTP/1.1 200 ")


def test_oversized_request_head_is_431(one: tuple[RouterProc, int, UpstreamServer]) -> None:
    _, port, app = one
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        reply = b""
        try:
            for _ in range(100):
                s.sendall(b"a" * 4096)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    assert reply.startswith(b"HTTP/1.1 431 ")
    assert app.hits == 0
