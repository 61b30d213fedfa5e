"""Instances as the proxy sees them, and the connections it keeps to them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, cast

import httptools

from kiln.router.config import Address
from kiln.router.pools import ReleaseStats
from kiln.router.wire import BODY_CHUNK, BODY_RAW, PAUSE_UPSTREAM, SEND_NOW

if TYPE_CHECKING:
    from kiln.router.exchange import Exchange

log = logging.getLogger("kiln.router")

MAX_IDLE_PER_UPSTREAM = 256


class Upstream:
    """One instance as the proxy sees it: address, load, idle connections."""

    __slots__ = (
        "addr",
        "conns",
        "down_until",
        "env",
        "host",
        "id",
        "idle",
        "in_flight",
        "port",
        "release",
        "requests",
        "retired",
        "stats",
        "tag",
    )

    def __init__(
        self, env: str, release: str, instance_id: str, addr: Address, stats: ReleaseStats
    ) -> None:
        self.env = env
        self.release = release
        self.id = instance_id
        self.addr = addr
        self.host = addr.host
        self.port = addr.port
        self.stats = stats
        self.tag = b"X-Kiln-Release: %s\r\nX-Kiln-Instance: %s\r\n" % (
            release.encode(),
            instance_id.encode(),
        )
        self.in_flight = 0
        self.conns = 0
        self.requests = 0
        self.down_until = 0.0
        self.retired = False
        self.idle: list[UpstreamConn] = []

    @property
    def key(self) -> tuple[str, str, Address]:
        return (self.release, self.id, self.addr)

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.transport.close()

    def to_json(self, draining: bool) -> dict[str, Any]:
        return {
            "addr": str(self.addr),
            "inflight": self.in_flight,
            "connections": self.conns,
            "idle_connections": len(self.idle),
            "requests": self.requests,
            "draining": draining,
        }


class UpstreamConn(asyncio.Protocol):
    """One connection to an instance; carries one exchange at a time."""

    __slots__ = (
        "broken",
        "done",
        "exchange",
        "got_bytes",
        "headers",
        "idle_ticks",
        "interim",
        "keep_alive",
        "lost",
        "parser",
        "read_paused",
        "reason",
        "skip_body",
        "transport",
        "up",
        "write_paused",
    )

    def __init__(self, up: Upstream) -> None:
        self.up = up
        self.transport = cast(asyncio.Transport, None)
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.got_bytes = False
        self.done = False
        self.broken = False
        self.interim = False
        self.keep_alive = False
        self.skip_body = False
        self.read_paused = False
        self.write_paused = False
        self.lost = False
        self.idle_ticks = 0

    # -- pairing with exchanges ----------------------------------------------

    def bind(self, ex: Exchange) -> None:
        self.exchange = ex
        self.got_bytes = False
        ex.conn = self
        client = ex.client
        if client.write_paused:
            self.pause_reading()
        if self.write_paused:
            client.pause(PAUSE_UPSTREAM)
        if not client.feeding:
            ex.flush_up()

    def detach(self) -> None:
        ex = self.exchange
        if ex is None:
            return
        self.exchange = None
        ex.conn = None
        if self.write_paused:
            ex.client.resume(PAUSE_UPSTREAM)

    def park(self) -> None:
        """Keep the connection for the next request to this instance."""
        up = self.up
        if self.lost or up.retired or self.broken or len(up.idle) >= MAX_IDLE_PER_UPSTREAM:
            self.transport.close()
            return
        self.idle_ticks = 0
        if self.read_paused:
            self.resume_reading()
        up.idle.append(self)

    def pause_reading(self) -> None:
        if not self.read_paused and not self.lost:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.lost:
            self.read_paused = False
            self.transport.resume_reading()

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.up.conns += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        up = self.up
        up.conns -= 1
        ex = self.exchange
        if ex is None:
            with contextlib.suppress(ValueError):
                up.idle.remove(self)
            return
        self.detach()
        ex.upstream_lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.exchange
        if ex is not None:
            ex.client.pause(PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.exchange
        if ex is not None:
            ex.client.resume(PAUSE_UPSTREAM)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        ex = self.exchange
        if ex is None:
            # Nothing was asked: an idle connection has no business talking.
            self.transport.close()
            return
        client = ex.client
        # What the parser makes of this read reaches the client at the end
        # of the loop iteration, with whatever else it is sent meanwhile, as
        # one write (see Proxy.flush).
        if not client.corked:
            client.corked = True
            proxy = client.proxy
            proxy.uncork_later.append(client)
            proxy.flush_soon()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            log.exception("bug while parsing a response")
            self.broken = True
        except httptools.HttpParserError:
            self.broken = True
        if client.wsize >= SEND_NOW:
            client.uncork()
        if self.done:
            self._complete(ex)
        elif self.broken:
            self.detach()
            self.transport.close()
            ex.upstream_lost(self)

    def _complete(self, ex: Exchange) -> None:
        self.done = False
        # detach(), inlined: this runs once per request.
        self.exchange = None
        ex.conn = None
        if self.write_paused:
            ex.client.resume(PAUSE_UPSTREAM)
        if self.skip_body:
            self.skip_body = False
            self.parser = httptools.HttpResponseParser(self)
        if self.keep_alive and ex.req_done and not self.write_paused:
            self.park()
        else:
            self.transport.close()
        ex.finish()

    # -- httptools callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        self.headers.clear()
        self.reason = b""

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.exchange
        if ex is None or self.done:
            self.broken = True
            return
        status: int = self.parser.get_status_code()
        if status < 200:
            # Interim responses (100 Continue, 103 Early Hints) are dropped:
            # the router answers Expect itself.
            self.interim = True
            return
        self.keep_alive = self.parser.should_keep_alive()
        ex.response_head(self, status)

    def on_body(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None or self.done:
            self.broken = True
            return
        # Exchange.response_body, inlined: called for every body chunk. The
        # client is corked while the parser runs, so this only buffers.
        mode = ex.mode
        if mode == BODY_RAW:
            ex.client.write(data)
        elif mode == BODY_CHUNK:
            ex.response_body(data)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        ex = self.exchange
        if ex is None or self.done:
            return
        if ex.mode == BODY_CHUNK:
            ex.response_end()
        self.done = True
