"""One request and its response, across one or more attempts at instances."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.router.pools import ABORTED, FAILED, Pool
from kiln.router.wire import (
    BODY_CHUNK,
    BODY_NONE,
    BODY_RAW,
    CHUNKED,
    CONN_CLOSE,
    CONN_KEEP,
    CONTINUE,
    IDEMPOTENT,
    LAST_CHUNK,
    PAUSE_WAIT,
    RESPONSE_HEADERS,
    RS_CONNECTION,
    RS_LENGTH,
    RS_TE,
    STATUS_LINES,
    connection_tokens,
    drop_response_headers,
    error_response,
    status_line,
)

if TYPE_CHECKING:
    from kiln.router.downstream import ClientConn
    from kiln.router.proxy import EnvRoute
    from kiln.router.upstream import Upstream, UpstreamConn

# An instance that refused a connection is skipped this long, so a dead one
# costs one refused connect per second instead of one per request.
DOWN_FOR = 1.0
# Request bytes kept for resending after a failed attempt; larger bodies are
# streamed without a safety net.
REPLAY_LIMIT = 256 * 1024
# Request bytes buffered while no upstream connection is ready yet.
PENDING_LIMIT = 256 * 1024
MAX_ATTEMPTS = 4


class Exchange:
    """One request and its response, across one or more upstream attempts."""

    __slots__ = (
        "attempt",
        "attempts",
        "chunked",
        "client",
        "client_close",
        "conn",
        "cookie",
        "expect",
        "finished",
        "fresh_retry",
        "head_sent",
        "http10",
        "is_head",
        "keep_alive",
        "local_error",
        "method",
        "mode",
        "pending",
        "pending_size",
        "pin",
        "pinned",
        "replay",
        "replay_size",
        "req_done",
        "reused",
        "route",
        "started",
        "status",
        "tried",
        "until_close",
        "up",
        "waiting_since",
    )

    def __init__(
        self,
        client: ClientConn,
        head: bytes,
        method: bytes,
        http10: bool,
        keep_alive: bool,
        chunked: bool,
        pin: bytes | None,
        cookie: bytes | None,
        expect: bool,
        started: float,
    ) -> None:
        self.client = client
        self.method = method
        self.is_head = method == b"HEAD"
        self.http10 = http10
        self.keep_alive = keep_alive
        self.chunked = chunked
        self.pin = pin
        self.cookie = cookie
        self.expect = expect
        self.started = started
        self.pending = [head]  # request bytes not yet written upstream
        self.pending_size = len(head)
        self.replay: list[bytes] | None = [head]  # every request byte so far
        self.replay_size = len(head)
        self.req_done = False
        self.local_error = 0
        self.route: EnvRoute | None = None
        self.pinned = False
        self.up: Upstream | None = None
        self.conn: UpstreamConn | None = None
        self.attempt = 0
        self.attempts = 0
        self.tried: list[Upstream] | None = None
        self.reused = False
        self.fresh_retry = False
        self.head_sent = False
        self.status = 0
        self.mode = BODY_NONE
        self.until_close = False
        self.client_close = False
        self.finished = False
        self.waiting_since = 0.0

    # -- routing -------------------------------------------------------------

    def start(self) -> None:
        client = self.client
        if self.local_error:
            self._answer_locally(self.local_error)
            return
        route = client.proxy.routes.get(client.listener.env)
        if route is None:
            self._fail(503, None)
            return
        self.route = route
        pool: Pool[Upstream] | None = None
        if self.pin is not None:
            pool = route.by_release.get(self.pin)
            self.pinned = pool is not None
        if pool is None and self.cookie is not None and route.sticky:
            pool = route.by_release.get(self.cookie)
            if pool is not None and pool.weight <= 0:
                pool = None
        if pool is None:
            pool = route.balancer.choose()
            if pool is None:
                self._fail(503, None)
                return
        if self.expect:
            client.write(CONTINUE)
        up = pool.pick(self.started)
        if up is None:
            up = self._pick(route, pool, self.started)
            if up is None:
                self._fail(503, pool.release)
                return
        self._attach(up)

    def _pick(self, route: EnvRoute, first: Pool[Upstream], now: float) -> Upstream | None:
        tried = self.tried
        up = first.pick(now, tried)
        if up is not None:
            return up
        others = () if self.pinned else route.balancer.live
        for pool in others:
            if pool is not first:
                up = pool.pick(now, tried)
                if up is not None:
                    return up
        # Everything left looks down; trying one beats failing for sure.
        up = first.pick(now, tried, allow_down=True)
        if up is not None:
            return up
        for pool in others:
            if pool is not first:
                up = pool.pick(now, tried, allow_down=True)
                if up is not None:
                    return up
        return None

    def _attach(self, up: Upstream) -> None:
        self.up = up
        up.in_flight += 1
        self.attempt += 1
        idle = up.idle
        if idle:
            self.reused = True
            idle.pop().bind(self)
            return
        self.reused = False
        self.client.proxy.connect(up, self, self.attempt)

    def connected(self, conn: UpstreamConn, up: Upstream, attempt: int) -> None:
        if self.up is not up or self.attempt != attempt or self.finished:
            conn.park()
            return
        conn.bind(self)

    def connect_failed(self, up: Upstream, attempt: int) -> None:
        up.down_until = self.client.proxy.loop.time() + DOWN_FOR
        if self.up is not up or self.attempt != attempt or self.finished:
            return
        # Nothing was sent: everything is still in ``pending``.
        self._retry_elsewhere()

    def _retry_elsewhere(self) -> None:
        up = self.up
        assert up is not None
        up.in_flight -= 1
        self.up = None
        if self.tried is None:
            self.tried = [up]
        else:
            self.tried.append(up)
        self.attempts += 1
        # The config may have changed since the first attempt: retry with the
        # current one, on the same release if it is still there.
        route = self.client.proxy.routes.get(self.client.listener.env)
        nxt = None
        if route is not None and self.attempts < MAX_ATTEMPTS:
            self.route = route
            pool = route.by_release.get(up.release.encode())
            if pool is None and not self.pinned:
                pool = route.balancer.choose()
            if pool is not None:
                nxt = self._pick(route, pool, self.client.proxy.loop.time())
        if nxt is None:
            self._fail(503, up.release)
            return
        self._attach(nxt)

    # -- request direction ---------------------------------------------------

    def request_body(self, data: bytes) -> None:
        if self.finished:
            return
        if self.chunked:
            self._send_up(b"%x\r\n" % len(data))
            self._send_up(data)
            self._send_up(b"\r\n")
        else:
            self._send_up(data)

    def request_end(self) -> None:
        self.req_done = True
        if self.chunked and not self.finished:
            self._send_up(LAST_CHUNK)

    def _send_up(self, data: bytes) -> None:
        replay = self.replay
        if replay is not None:
            self.replay_size += len(data)
            if self.replay_size <= REPLAY_LIMIT:
                replay.append(data)
            else:
                self.replay = None
        conn = self.conn
        if conn is not None and not self.client.feeding and not self.pending:
            conn.transport.write(data)
            return
        self.pending.append(data)
        self.pending_size += len(data)
        if conn is None and self.pending_size > PENDING_LIMIT:
            self.client.pause(PAUSE_WAIT)

    def flush_up(self) -> None:
        conn = self.conn
        pending = self.pending
        if conn is None or not pending:
            return
        if len(pending) == 1:
            conn.transport.write(pending[0])
        else:
            conn.transport.writelines(pending)
        pending.clear()
        self.pending_size = 0
        client = self.client
        if client.read_pause & PAUSE_WAIT:
            client.resume(PAUSE_WAIT)

    # -- response direction --------------------------------------------------

    def response_head(self, conn: UpstreamConn, status: int) -> None:
        self.status = status
        self.replay = None
        client = self.client
        up = self.up
        assert up is not None
        line = STATUS_LINES.get(status)
        out = [line if line is not None else status_line(status, conn.reason)]
        add = out.append
        extend = out.extend
        chunked = has_length = False
        conn_value = None
        special = RESPONSE_HEADERS
        for name, value in conn.headers:
            kind = special.get(name.lower())
            if kind is None or kind == RS_LENGTH:
                extend((name, b": ", value, b"\r\n"))
                if kind is not None:
                    has_length = True
            elif kind == RS_TE:
                chunked = True
            elif kind == RS_CONNECTION:
                conn_value = value
        if conn_value is not None:
            extra = connection_tokens(conn_value)
            if extra:
                out = [out[0], *drop_response_headers(out[1:], extra)]
                add = out.append

        # Bodies without a length reach HTTP/1.1 clients re-chunked, so the
        # connection survives; HTTP/1.0 clients can only be told by a close.
        close_delimited = False
        if self.is_head or status == 204 or status == 304:
            mode = BODY_NONE
        elif has_length and not chunked:
            mode = BODY_RAW
        elif self.http10:
            mode = BODY_RAW
            close_delimited = True
        else:
            mode = BODY_CHUNK
        self.mode = mode
        self.until_close = mode != BODY_NONE and not chunked and not has_length
        close = (
            close_delimited
            or not self.keep_alive
            or not self.req_done
            or client.retiring
            or client.proxy.draining
        )
        if mode == BODY_CHUNK:
            add(CHUNKED)
        if close:
            add(CONN_CLOSE)
        elif self.http10:
            add(CONN_KEEP)
        self.client_close = close
        add(up.tag)
        route = self.route
        if route is not None and route.sticky and self.cookie != up.release.encode():
            add(route.cookies[up.release])
        add(b"\r\n")
        client.write(b"".join(out))
        self.head_sent = True
        if self.is_head:
            # The parser cannot be told that a HEAD answer has no body; the
            # upstream connection swaps in a fresh parser once done.
            conn.skip_body = True
            conn.done = True

    def response_body(self, data: bytes) -> None:
        client = self.client
        if self.mode == BODY_CHUNK:
            client.write(b"%x\r\n" % len(data))
            client.write(data)
            client.write(b"\r\n")
        elif self.mode == BODY_RAW:
            client.write(data)

    def response_end(self) -> None:
        if self.mode == BODY_CHUNK:
            self.client.write(LAST_CHUNK)

    def finish(self) -> None:
        """The response is complete and the upstream connection let go."""
        now = self.client.proxy.loop.time()
        up = self.up
        if up is not None:
            self.up = None
            up.in_flight -= 1
            up.requests += 1
            up.stats.record(self.status, now - self.started)
        self.finished = True
        self.client.exchange_done(self, now)

    # -- failures ------------------------------------------------------------

    def upstream_lost(self, conn: UpstreamConn) -> None:
        """The upstream connection closed before the response was complete."""
        if self.finished:
            return
        if self.head_sent:
            if self.until_close and not conn.broken:
                self.response_end()
                self.finish()
                return
            self._fail(502, None)
            return
        up = self.up
        assert up is not None
        if not conn.got_bytes and self.replay is not None:
            if self.reused and not self.fresh_retry:
                # The classic keep-alive race: the instance closed an idle
                # connection just as we sent on it. It never read the
                # request, so sending it again is safe for any method.
                self.fresh_retry = True
                self.pending = list(self.replay)
                self.pending_size = self.replay_size
                self.attempt += 1
                self.client.proxy.connect(up, self, self.attempt)
                return
            if self.method in IDEMPOTENT:
                self.pending = list(self.replay)
                self.pending_size = self.replay_size
                self._retry_elsewhere()
                return
        self._fail(502, None)

    def timed_out(self) -> None:
        conn = self.conn
        if conn is not None:
            conn.detach()
            conn.transport.close()
        self._fail(504, None)

    def _fail(self, status: int, release: str | None) -> None:
        """Answer with an error of the router's own and count it as failed."""
        client = self.client
        up = self.up
        proxy = client.proxy
        if up is not None:
            self.up = None
            up.in_flight -= 1
            up.stats.counts[FAILED] += 1
        elif release is not None:
            env = client.listener.env
            stats = proxy.release_stats.get((env, release))
            if stats is not None:
                stats.counts[FAILED] += 1
        else:
            env = client.listener.env
            proxy.env_failed[env] = proxy.env_failed.get(env, 0) + 1
        conn = self.conn
        if conn is not None:
            conn.detach()
            conn.transport.close()
        self.finished = True
        if self.head_sent:
            # Too late for an error status: cut the response short so the
            # client cannot mistake it for a complete one.
            self.client_close = True
            client.close()
            client.exchange_done(self, proxy.loop.time())
            return
        self._answer_locally(status)

    def _answer_locally(self, status: int) -> None:
        client = self.client
        self.finished = True
        self.status = status
        self.client_close = (
            not self.req_done or not self.keep_alive or client.proxy.draining or client.retiring
        )
        client.write(error_response(status, self.client_close, self.http10 and self.keep_alive))
        self.head_sent = True
        client.exchange_done(self, client.proxy.loop.time())

    def abort(self) -> None:
        """The client went away."""
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        if conn is not None:
            conn.detach()
            conn.transport.close()
        up = self.up
        if up is not None:
            self.up = None
            up.in_flight -= 1
            up.stats.counts[ABORTED] += 1
