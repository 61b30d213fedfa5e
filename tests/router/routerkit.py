"""Helpers for router tests: upstream servers, router processes, raw HTTP."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kiln.router.client import RouterClient, spawn_router


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Handler(BaseHTTPRequestHandler):
    """A small app: says its name, echoes, streams, sleeps, misbehaves on demand."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate sends; with Nagle each response
    # would wait for a delayed ACK.
    disable_nagle_algorithm = True
    server: UpstreamServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_GET

    def _body_chunks(self) -> Iterator[bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left:
                    chunk = self.rfile.read(min(left, 65536))
                    left -= len(chunk)
                    yield chunk
                self.rfile.readline()
        left = int(self.headers.get("Content-Length") or 0)
        while left:
            chunk = self.rfile.read(min(left, 65536))
            left -= len(chunk)
            yield chunk

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Upstream", self.server.name)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == "/sink":
            self.server.hits += 1
            self._dispatch_sink()
            return
        body = self._read_body()
        self.server.hits += 1
        name = self.server.name
        path = url.path
        if path == "/echo":
            self._send(200, body, X_Method=self.command)
        elif path == "/headers":
            info = {
                "headers": [[k, v] for k, v in self.headers.items()],
                "path": self.path,
                "peer_port": self.client_address[1],
            }
            self._send(200, json.dumps(info).encode(), Content_Type="application/json")
        elif path == "/slow":
            time.sleep(float(query.get("s", "1")))
            self._send(200, f"{name}\n".encode())
        elif path == "/big":
            self._big(int(query["n"]), query.get("chunked") == "1")
        elif path == "/close":
            # HTTP/1.0 style: no length, the end of the body is the end of the connection.
            self.send_response(200)
            self.send_header("Connection", "close")
            self.send_header("X-Upstream", name)
            self.end_headers()
            self.wfile.write(f"{name} until close\n".encode() * 100)
            self.close_connection = True
        elif path == "/status":
            code = int(query["code"])
            self.send_response(code)
            self.send_header("X-Upstream", name)
            if code not in (204, 304):
                self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/hop":
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.send_header("Keep-Alive", "timeout=5")
            self.send_header("Connection", "X-Secret")
            self.send_header("X-Secret", "hidden")
            self.send_header("X-Kiln-Release", "spoofed")
            self.end_headers()
            self.wfile.write(b"ok")
        else:
            self._send(200, f"{name}\n".encode())

    def _dispatch_sink(self) -> None:
        # Reads the body slowly, so the router has to hold the client back.
        digest = hashlib.sha256()
        size = 0
        for chunk in self._body_chunks():
            digest.update(chunk)
            size += len(chunk)
            time.sleep(0.0005)
        self._send(200, f"{size} {digest.hexdigest()}".encode())

    def _big(self, n: int, chunked: bool) -> None:
        block = bytes(range(256)) * 256  # 64 KiB
        self.send_response(200)
        self.send_header("X-Upstream", self.server.name)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(n))
        self.end_headers()
        left = n
        while left > 0:
            piece = block[: min(left, len(block))]
            left -= len(piece)
            if chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                self.wfile.write(piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


class UpstreamServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, name: str, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.name = name
        self.hits = 0
        self.port = int(self.server_address[1])
        self.addr = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)


@dataclass
class RouterProc:
    proc: subprocess.Popen[bytes]
    control: Path
    state: Path
    log: Path
    client: RouterClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = RouterClient(self.control)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)


class Routers:
    """Starts router processes for a test and makes sure none outlives it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[RouterProc] = []
        self.generation = 0

    def start(
        self,
        *,
        control: Path | None = None,
        state: Path | None = None,
        takeover: Path | None = None,
        takeover_drain: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> RouterProc:
        control = control or self.workdir / "router.sock"
        state = state or self.workdir / "router.json"
        log = self.workdir / f"router-{len(self.procs)}.log"
        with open(log, "wb") as log_file:
            proc = spawn_router(
                control,
                state,
                takeover=takeover,
                takeover_drain=takeover_drain,
                log=log_file,
                extra_args=["--log-level", "DEBUG", *extra_args],
            )
        router = RouterProc(proc, control, state, log)
        self.procs.append(router)
        return router

    def config(self, envs: dict[str, Any]) -> dict[str, Any]:
        self.generation += 1
        return {"generation": self.generation, "envs": envs}

    def cleanup(self) -> None:
        for router in self.procs:
            if router.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(router.proc.pid, signal.SIGKILL)
            router.proc.wait(10)
            text = router.log.read_text(errors="replace") if router.log.exists() else ""
            print(f"--- router {router.pid} log ---\n{text}")


def env(
    listen_port: int, *pools: tuple[str, int, list[UpstreamServer | str]], sticky: bool = False
) -> dict[str, Any]:
    """An environment config: pools as (release, weight, [upstream or "host:port"])."""
    return {
        "listen": f"127.0.0.1:{listen_port}",
        "sticky": sticky,
        "pools": [
            {
                "release": release,
                "weight": weight,
                "instances": [
                    {
                        "id": f"i-{release}-{i}",
                        "addr": up if isinstance(up, str) else up.addr,
                    }
                    for i, up in enumerate(members)
                ],
            }
            for release, weight, members in pools
        ],
    }


def get(
    port: int, path: str = "/", headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the router closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


class RawUpstream:
    """An upstream misbehaving on purpose, one thread per connection.

    ``behave(wfile, nth)`` handles the ``nth`` request (from 0) on a
    connection once its head and body are read; it returns False to drop
    the connection.
    """

    def __init__(self, behave: Callable[[Any, int], bool]) -> None:
        self.behave = behave
        self.connections = 0
        self.requests = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.addr = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile = conn.makefile("rb")
        wfile = conn.makefile("wb", buffering=0)
        try:
            nth = 0
            while True:
                line = rfile.readline()
                if not line:
                    return
                length = 0
                while (header := rfile.readline()) not in (b"\r\n", b""):
                    name, _, value = header.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length:
                    rfile.read(length)
                self.requests += 1
                if not self.behave(wfile, nth):
                    return
                nth += 1
        except OSError:
            pass
        finally:
            rfile.close()
            wfile.close()
            conn.close()

    def stop(self) -> None:
        self._sock.close()
