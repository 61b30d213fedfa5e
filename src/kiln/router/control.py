"""The control API: HTTP/1.1 + JSON on a unix socket, for the daemon.

    GET  /health                  {"ok": true, "pid", "generation", "started_at", "draining"}
    GET  /config                  the current config (see kiln.router.config)
    PUT  /config                  replace it: {"ok": true, "generation"}; 400 invalid,
                                  409 address taken (+ "address"), 500 live but not
                                  saved, 503 busy (handover or shutdown; retry)
    GET  /stats                   counters per environment, release and instance
    GET  /metrics                 the same counters in Prometheus text format
    POST /shutdown?drain=SECONDS  stop accepting, finish in-flight requests, exit
    POST /takeover                (a successor router) config + listening sockets

Every error is ``{"error": "one line"}``. Every answer is JSON but /metrics's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, urlsplit

import httptools

from kiln.prometheus import CONTENT_TYPE, render
from kiln.router.config import RouterConfig
from kiln.router.handover import send_with_fds
from kiln.router.metrics import families

if TYPE_CHECKING:
    from kiln.router.server import Router

log = logging.getLogger("kiln.router")

MAX_BODY = 16 * 1024 * 1024


class Busy(Exception):
    """The router cannot take this request now (handover, shutdown); retry later."""


class StateNotSaved(Exception):
    """The config is live, but the state file could not be written."""


class ListenError(Exception):
    """A listening address of a new config could not be bound."""

    def __init__(self, addr: str, reason: str) -> None:
        super().__init__(f"cannot listen on {addr}: {reason}")
        self.addr = addr


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


class ControlConn(asyncio.Protocol):
    """One control API connection; requests are answered one at a time, in order."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.transport = cast(asyncio.Transport, None)
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.body_size = 0
        self.requests: asyncio.Queue[tuple[str, bytes, bytes, bool]] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.worker = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.worker is not None:
            self.worker.cancel()
        self.router.control_closed(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(400, {"error": "malformed request"}, close=True)

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []
        self.body_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, data: bytes) -> None:
        self.body_size += len(data)
        if self.body_size <= MAX_BODY:
            self.body.append(data)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        body = b"" if self.body_size > MAX_BODY else b"".join(self.body)
        self.requests.put_nowait((method, self.url, body, self.parser.should_keep_alive()))

    async def _serve(self) -> None:
        while not self.closed:
            method, url, body, keep_alive = await self.requests.get()
            try:
                status, payload, fds = await self._handle(method, url, body)
            except ApiError as exc:
                status, payload, fds = exc.status, {"error": str(exc), **exc.extra}, None
            except Exception:
                log.exception("control request %s %s failed", method, url.decode(errors="replace"))
                status, payload, fds = 500, {"error": "internal error; see the router log"}, None
            if self.transport.is_closing():
                return
            if fds is not None:
                data = _response_bytes(status, payload, close=False)
                send_with_fds(self.transport, data, fds)
            else:
                self._write(status, payload, close=not keep_alive)
                if not keep_alive:
                    return

    async def _handle(
        self, method: str, url: bytes, body: bytes
    ) -> tuple[int, dict[str, Any] | str, list[int] | None]:
        parts = urlsplit(url.decode("latin-1"))
        path = parts.path.rstrip("/") or "/"
        query = parse_qs(parts.query)
        router = self.router
        if path == "/health":
            _allow(method, "GET")
            return 200, router.health(), None
        if path == "/config":
            if method == "GET":
                return 200, router.config.to_json(), None
            _allow(method, "PUT")
            if len(body) >= MAX_BODY:
                raise ApiError(413, "config too large")
            try:
                config = RouterConfig.from_json(json.loads(body))
            except ValueError as exc:
                raise ApiError(400, f"invalid config: {exc}") from None
            try:
                await router.put_config(config)
            except ListenError as exc:
                raise ApiError(409, str(exc), address=exc.addr) from None
            except Busy as exc:
                raise ApiError(503, str(exc)) from None
            except StateNotSaved as exc:
                raise ApiError(500, str(exc)) from None
            return 200, {"ok": True, "generation": config.generation}, None
        if path == "/stats":
            _allow(method, "GET")
            return 200, router.stats(), None
        if path == "/metrics":
            _allow(method, "GET")
            return 200, render(families(router.stats())), None
        if path == "/shutdown":
            _allow(method, "POST")
            drain = _float_param(query, "drain", 10.0)
            router.request_shutdown(drain)
            return 202, {"ok": True, "drain": drain}, None
        if path == "/takeover":
            _allow(method, "POST")
            try:
                payload, fds = await router.begin_handover(self)
            except Busy as exc:
                raise ApiError(503, str(exc)) from None
            return 200, payload, fds
        raise ApiError(404, f"no such endpoint: {path}")

    def _write(self, status: int, payload: dict[str, Any] | str, *, close: bool) -> None:
        if self.closed:
            return
        self.transport.write(_response_bytes(status, payload, close=close))
        if close:
            self.transport.close()


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise ApiError(405, f"use {allowed}")


def _float_param(query: dict[str, list[str]], name: str, default: float) -> float:
    values = query.get(name)
    if not values:
        return default
    try:
        value = float(values[-1])
    except ValueError:
        raise ApiError(400, f"{name} must be a number of seconds") from None
    if not 0 <= value <= 86400:
        raise ApiError(400, f"{name} must be between 0 and 86400")
    return value


_REASONS = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _response_bytes(status: int, payload: dict[str, Any] | str, *, close: bool) -> bytes:
    if isinstance(payload, str):
        body, kind = payload.encode(), CONTENT_TYPE.encode()
    else:
        body, kind = json.dumps(payload).encode() + b"\n", b"application/json"
    return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status,
        _REASONS.get(status, "Unknown").encode(),
        kind,
        len(body),
        b"Connection: close\r\n" if close else b"",
        body,
    )
