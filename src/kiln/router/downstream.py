"""Client connections: requests parsed, answered in order, flow-controlled."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from kiln.router.exchange import Exchange
from kiln.router.wire import (
    CHUNKED,
    COOKIE_NAME,
    FORWARDED_PROTO,
    JOIN_LIMIT,
    PAUSE_QUEUE,
    REQUEST_HEADERS,
    RQ_CONNECTION,
    RQ_COOKIE,
    RQ_EXPECT,
    RQ_HOST,
    RQ_PIN,
    RQ_TE,
    RQ_XFF,
    SEND_NOW,
    connection_tokens,
    drop_request_headers,
    error_response,
)

if TYPE_CHECKING:
    from kiln.router.proxy import Listener, Proxy

log = logging.getLogger("kiln.router")

# Request line and headers together; larger heads are answered 431.
MAX_HEAD = 64 * 1024
# How long unread request bytes are drained before closing on an error.
LINGER = 2.0

# ClientConn.close_pending: what to do once the corked output is written.
_CLOSE = 1
_LINGER = 2


class ClientConn(asyncio.Protocol):
    """One client connection: parses requests, answers them in order."""

    __slots__ = (
        "active",
        "close_pending",
        "closing",
        "corked",
        "feeding",
        "fwd",
        "head_bytes",
        "headers",
        "in_message",
        "last_active",
        "listener",
        "parser",
        "peer",
        "proxy",
        "queue",
        "read_pause",
        "reading",
        "retiring",
        "transport",
        "url",
        "wbuf",
        "write_paused",
        "wsize",
    )

    def __init__(self, proxy: Proxy, listener: Listener) -> None:
        self.proxy = proxy
        self.listener = listener
        self.transport = cast(asyncio.Transport, None)
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.peer = b""
        self.fwd = b""
        self.reading: Exchange | None = None  # request being parsed
        self.active: Exchange | None = None  # request being answered
        self.queue: deque[Exchange] = deque()
        self.in_message = False
        self.head_bytes = 0
        self.feeding = False
        self.corked = False
        self.wbuf: list[bytes] = []
        self.wsize = 0  # bytes in wbuf
        self.close_pending = 0
        self.closing = False
        self.retiring = False
        self.read_pause = 0
        self.write_paused = False
        self.last_active = 0.0

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]).encode() if peer else b"unknown"
        self.fwd = b"X-Forwarded-For: %s\r\n%s" % (self.peer, FORWARDED_PROTO)
        self.last_active = self.proxy.loop.time()
        self.proxy.clients.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        # Also reached on a bare FIN: like nginx, a client that hangs up is
        # taken to have given up, and its instance is told by a closed
        # connection rather than left to work for nobody.
        self.closing = True
        self.proxy.clients.discard(self)
        ex = self.active
        self.active = None
        self.reading = None
        self.queue.clear()
        if ex is not None:
            ex.abort()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.in_message and self.reading is None:
            # The parser keeps a head in memory until it is complete.
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self._malformed(431)
                return
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._feed(data[int(exc.args[0]) :])
        except httptools.HttpParserCallbackError:
            log.exception("bug while parsing a request")
            self._malformed()
        except httptools.HttpParserError:
            self._malformed()
        finally:
            self.feeding = False
        ex = self.active
        if ex is not None and ex.pending and ex.conn is not None:
            if ex.pending_size < SEND_NOW:
                # Sent at the end of the loop iteration, with the other
                # requests this iteration read (see Proxy.flush).
                proxy = self.proxy
                proxy.send_later.append(ex)
                proxy.flush_soon()
            else:
                ex.flush_up()

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.active
        if ex is not None and ex.conn is not None:
            ex.conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.active
        if ex is not None and ex.conn is not None:
            ex.conn.resume_reading()

    # -- parsing -------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Go on parsing after an upgrade request (data_received does the common case).

        Upgrades (WebSocket) are not proxied: the request went out without
        its Upgrade header, as a plain request. The parser stops at the
        upgrade point; go on from there.
        """
        while data and not self.closing:
            try:
                self.parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as exc:
                data = data[int(exc.args[0]) :]
            except httptools.HttpParserCallbackError:
                log.exception("bug while parsing a request")
                self._malformed()
                return
            except httptools.HttpParserError:
                self._malformed()
                return

    def _malformed(self, status: int = 400) -> None:
        self.in_message = False
        reading = self.reading
        self.reading = None
        active = self.active
        if active is None:
            self.write(error_response(status, True))
            self.close_lingering()
        elif reading is active:
            # Broken request body: the instance would wait forever for the rest.
            active.abort()
            self.active = None
            self.close()
        else:
            # Answer what was valid, then hang up.
            self.retiring = True
            self.queue.clear()
            self.pause(PAUSE_QUEUE)

    def on_message_begin(self) -> None:
        self.in_message = True
        self.head_bytes = 0
        self.url = b""
        self.headers.clear()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.closing:
            # Pipelined behind a response that ended the connection: whoever
            # sent it will not read the answer, so it must not run at all.
            return
        parser = self.parser
        method: bytes = parser.get_method()
        http10 = parser.get_http_version() == "1.0"
        keep_alive: bool = parser.should_keep_alive()
        now = self.proxy.loop.time()
        self.last_active = now

        out = [method, b" ", self.url, b" HTTP/1.1\r\n"]
        add = out.append
        extend = out.extend
        host = xff = pin = cookie = conn_value = None
        chunked = expect = False
        special = REQUEST_HEADERS
        for name, value in self.headers:
            kind = special.get(name.lower())
            if kind is None:
                extend((name, b": ", value, b"\r\n"))
                continue
            if kind == RQ_HOST:
                host = value
                extend((name, b": ", value, b"\r\n"))
            elif kind == RQ_COOKIE:
                if cookie is None:
                    i = value.find(COOKIE_NAME)
                    if i >= 0 and (i == 0 or value[i - 1] in b" ;"):
                        cookie = value[i + 13 :].split(b";", 1)[0].strip()
                extend((name, b": ", value, b"\r\n"))
            elif kind == RQ_PIN:
                pin = value.strip()
            elif kind == RQ_XFF:
                xff = value if xff is None else xff + b", " + value
            elif kind == RQ_TE:
                chunked = True
            elif kind == RQ_EXPECT:
                expect = value.lower() == b"100-continue"
            elif kind == RQ_CONNECTION:
                conn_value = value if conn_value is None else conn_value + b"," + value
        if conn_value is not None:
            extra = connection_tokens(conn_value)
            if extra:
                out = [line for line in drop_request_headers(out, extra)]
                add = out.append

        local_error = 0
        if method == b"CONNECT":
            local_error = 405
            keep_alive = False
        elif host is None:
            if http10:
                add(b"Host: %s\r\n" % str(self.listener.addr).encode())
            else:
                local_error = 400
                keep_alive = False
        if xff is None:
            add(self.fwd)
        else:
            add(b"X-Forwarded-For: %s, %s\r\n%s" % (xff, self.peer, FORWARDED_PROTO))
        if host is not None:
            add(b"X-Forwarded-Host: ")
            add(host)
            add(b"\r\n")
        if chunked:
            add(CHUNKED)
        add(b"\r\n")

        ex = Exchange(
            self,
            b"".join(out),
            method,
            http10,
            keep_alive,
            chunked,
            pin,
            cookie,
            expect and not http10,
            now,
        )
        self.reading = ex
        if local_error:
            ex.local_error = local_error
        if self.active is None:
            self.active = ex
            ex.start()
        else:
            self.queue.append(ex)
            self.pause(PAUSE_QUEUE)

    def on_body(self, data: bytes) -> None:
        ex = self.reading
        if ex is not None:
            ex.request_body(data)

    def on_message_complete(self) -> None:
        self.in_message = False
        ex = self.reading
        if ex is not None:
            self.reading = None
            # Exchange.request_end, inlined: called for every request.
            ex.req_done = True
            if ex.chunked:
                ex.request_end()

    # -- output and flow control ---------------------------------------------

    def write(self, data: bytes) -> None:
        if self.corked:
            self.wbuf.append(data)
            self.wsize += len(data)
        elif not self.closing:
            self.transport.write(data)

    def uncork(self) -> None:
        """Write what was held back (see Proxy.flush), then close if asked meanwhile."""
        self.corked = False
        buf = self.wbuf
        if buf:
            if not self.closing:
                if len(buf) == 1:
                    self.transport.write(buf[0])
                elif self.wsize <= JOIN_LIMIT:
                    # Heads and small bodies: one joined write is cheaper
                    # than the transport's writev path, for uvloop and kernel.
                    self.transport.write(b"".join(buf))
                else:
                    self.transport.writelines(buf)
            buf.clear()
            self.wsize = 0
        if self.close_pending:
            linger = self.close_pending == _LINGER
            self.close_pending = 0
            if linger:
                self.close_lingering()
            else:
                self.close()

    def close(self) -> None:
        if self.corked:
            self.close_pending = max(self.close_pending, _CLOSE)
            return
        if not self.closing:
            self.closing = True
            self.transport.close()

    def close_lingering(self) -> None:
        """Close after the answer while the client may still be sending.

        Closing a socket with unread input makes the kernel send a reset,
        which can destroy the answer before the client has read it; so stop
        writing, keep reading (and dropping) for a moment, then close.
        """
        if self.closing:
            return
        if self.corked:
            self.close_pending = _LINGER
            return
        self.closing = True
        transport = self.transport
        if transport.is_closing():
            return
        if self.read_pause:
            self.read_pause = 0
            transport.resume_reading()
        transport.write_eof()
        self.proxy.loop.call_later(LINGER, transport.close)

    def pause(self, reason: int) -> None:
        if not self.read_pause and not self.closing:
            self.transport.pause_reading()
        self.read_pause |= reason

    def resume(self, reason: int) -> None:
        if self.read_pause & reason:
            self.read_pause &= ~reason
            if not self.read_pause and not self.closing:
                self.transport.resume_reading()

    def exchange_done(self, ex: Exchange, now: float) -> None:
        self.last_active = now
        if self.active is not ex:
            return
        self.active = None
        queue = self.queue
        if ex.client_close or self.retiring:
            if ex.req_done and not self.in_message:
                self.close()
            else:
                self.close_lingering()
            return
        if queue:
            nxt = queue.popleft()
            if not queue:
                self.resume(PAUSE_QUEUE)
            self.active = nxt
            nxt.start()

    def retire(self) -> None:
        """Its listener is gone: finish the current request, then close."""
        self.retiring = True
        if self.active is None and not self.in_message:
            self.close()
