"""The proxy's shared state: routing tables, listeners, live connections, counters.

The moving parts live next door: a :class:`~kiln.router.downstream.ClientConn`
per accepted connection parses requests with httptools; each request becomes
an :class:`~kiln.router.exchange.Exchange` that picks an
:class:`~kiln.router.upstream.Upstream` (one instance of one release),
borrows an idle :class:`~kiln.router.upstream.UpstreamConn` or opens one,
streams the request there and the response back. Bodies are never held
whole: each side pauses the other's reads when its write buffer fills.

That is the hot path. It avoids per-request logging, formatting, timers and
dictionaries where it can: header blocks are built by joining byte strings,
constant header lines are precomputed, and output is batched: what one event
loop iteration produces for a connection goes out as one write at the end of
that iteration (:meth:`Proxy.flush`), so under load an instance or a client
is woken once per batch of requests rather than once per request (on a small
machine those wake-ups cost more than the Python). Timeouts are checked by
one sweep a second instead of a timer per request.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable
from functools import partial
from typing import Any

from kiln.router.config import Address, EnvSpec, RouterConfig
from kiln.router.downstream import ClientConn
from kiln.router.exchange import Exchange
from kiln.router.pools import ABORTED, Balancer, Pool, ReleaseStats
from kiln.router.upstream import Upstream, UpstreamConn

log = logging.getLogger("kiln.router")

CONNECT_TIMEOUT = 2.0
HEADER_TIMEOUT = 60.0
CLIENT_IDLE_TIMEOUT = 75.0
# How long a client connection may sit idle once draining has begun before it
# is closed. Busy connections get ``Connection: close`` on their next
# response instead, which cannot race with a client sending its next request.
DRAIN_GRACE = 1.0
UPSTREAM_IDLE_TIMEOUT = 30.0
SWEEP_INTERVAL = 1.0


class EnvRoute:
    """The routing table of one environment, replaced whole on every config change."""

    __slots__ = ("balancer", "by_release", "cookies", "name", "spec", "sticky")

    def __init__(self, name: str, spec: EnvSpec, balancer: Balancer[Upstream]) -> None:
        self.name = name
        self.spec = spec
        self.sticky = spec.sticky
        self.balancer = balancer
        # Keyed by bytes: looked up with raw header and cookie values.
        self.by_release = {p.release.encode(): p for p in balancer.pools}
        for pool, pool_spec in zip(balancer.pools, spec.pools, strict=True):
            self.by_release.update((alias.encode(), pool) for alias in pool_spec.aliases)
        self.cookies = {
            p.release: b"Set-Cookie: kiln_release=%s; Path=/; HttpOnly; SameSite=Lax\r\n"
            % p.release.encode()
            for p in balancer.pools
        }

    def upstreams(self) -> Iterable[Upstream]:
        for pool in self.balancer.pools:
            yield from pool.members


class Listener:
    """One listening TCP socket and the environment it serves."""

    __slots__ = ("addr", "closed", "env", "server", "sock")

    def __init__(self, addr: Address, env: str, sock: socket.socket) -> None:
        self.addr = addr
        self.env = env
        self.sock = sock
        self.server: asyncio.AbstractServer | None = None
        self.closed = False


class Proxy:
    """State shared by all connections: routes, live connections, counters."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        header_timeout: float = HEADER_TIMEOUT,
    ) -> None:
        self.loop = loop
        self.connect_timeout = connect_timeout
        self.header_timeout = header_timeout
        self.routes: dict[str, EnvRoute] = {}
        self.clients: set[ClientConn] = set()
        self.retired: set[Upstream] = set()
        self.release_stats: dict[tuple[str, str], ReleaseStats] = {}
        # Requests failed before any release could be chosen, per environment.
        self.env_failed: dict[str, int] = {}
        self.draining = False
        self.drain_started = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        # Output held back until the end of the event loop iteration.
        self.flush_scheduled = False
        self.uncork_later: list[ClientConn] = []
        self.send_later: list[Exchange] = []

    # -- configuration -------------------------------------------------------

    def build_routes(self, config: RouterConfig) -> dict[str, EnvRoute]:
        """New routes for ``config``, reusing Upstream objects of unchanged instances.

        Reuse keeps their in-flight counts and idle connections. Nothing is
        changed until :meth:`install`, so a rejected config costs nothing.
        """
        known: dict[tuple[str, tuple[str, str, Address]], Upstream] = {}
        for route in self.routes.values():
            for up in route.upstreams():
                known[(up.env, up.key)] = up
        for up in self.retired:
            known.setdefault((up.env, up.key), up)
        routes: dict[str, EnvRoute] = {}
        for env, spec in config.envs.items():
            pools: list[Pool[Upstream]] = []
            for ps in spec.pools:
                stats = self.release_stats.get((env, ps.release))
                if stats is None:
                    stats = self.release_stats[(env, ps.release)] = ReleaseStats()
                members = []
                for inst in ps.instances:
                    found = known.get((env, (ps.release, inst.id, inst.addr)))
                    members.append(found or Upstream(env, ps.release, inst.id, inst.addr, stats))
                pools.append(Pool(ps.release, ps.weight, members))
            routes[env] = EnvRoute(env, spec, Balancer(pools))
            self.env_failed.setdefault(env, 0)
        return routes

    def install(self, routes: dict[str, EnvRoute]) -> None:
        """Switch to ``routes``: from now on every new request uses them."""
        keep = {up for route in routes.values() for up in route.upstreams()}
        for route in self.routes.values():
            for up in route.upstreams():
                if up not in keep and not up.retired:
                    up.retired = True
                    up.close_idle()
                    self.retired.add(up)
        for up in keep:
            if up.retired:
                up.retired = False
                self.retired.discard(up)
        self.routes = routes

    # -- batched output ------------------------------------------------------

    def flush_soon(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what this loop iteration produced, after all its reads were handled.

        One iteration handles every connection that became readable; writing
        their output together at its end, rather than each as soon as it is
        made, wakes each peer once per batch instead of once per request.
        """
        self.flush_scheduled = False
        exchanges = self.send_later
        if exchanges:
            self.send_later = []
            for ex in exchanges:
                try:
                    ex.flush_up()
                except Exception:  # a bug; the others must still be sent
                    log.exception("bug while sending a request")
        clients = self.uncork_later
        if clients:
            self.uncork_later = []
            for client in clients:
                try:
                    client.uncork()
                except Exception:
                    log.exception("bug while sending a response")

    # -- connections ---------------------------------------------------------

    def client_factory(self, listener: Listener) -> ClientConn:
        return ClientConn(self, listener)

    def connect(self, up: Upstream, ex: Exchange, attempt: int) -> None:
        task = self.loop.create_task(self._connect(up, ex, attempt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, up: Upstream, ex: Exchange, attempt: int) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await self.loop.create_connection(
                    partial(UpstreamConn, up), up.host, up.port
                )
        except (OSError, TimeoutError):
            ex.connect_failed(up, attempt)
            return
        ex.connected(proto, up, attempt)

    def sweep(self) -> None:
        """Timeouts, idle connections and drain progress; runs every second."""
        now = self.loop.time()
        for client in list(self.clients):
            ex = client.active
            if ex is not None:
                if ex.conn is not None and ex.req_done and not ex.head_sent:
                    if ex.waiting_since == 0.0:
                        ex.waiting_since = now
                    elif now - ex.waiting_since >= self.header_timeout:
                        ex.timed_out()
                continue
            idle_for = now - client.last_active
            if client.in_message:
                if idle_for > CLIENT_IDLE_TIMEOUT:
                    client.close()
                continue
            if (
                idle_for > CLIENT_IDLE_TIMEOUT
                or client.retiring
                or (
                    self.draining
                    and now - max(client.last_active, self.drain_started) >= DRAIN_GRACE
                )
            ):
                client.close()
        ticks = int(UPSTREAM_IDLE_TIMEOUT / SWEEP_INTERVAL)
        for route in self.routes.values():
            for up in route.upstreams():
                if not up.idle:
                    continue
                keep = []
                for conn in up.idle:
                    conn.idle_ticks += 1
                    if conn.idle_ticks > ticks:
                        conn.transport.close()
                    else:
                        keep.append(conn)
                up.idle = keep
        for up in list(self.retired):
            if up.in_flight == 0 and up.conns == 0:
                self.retired.discard(up)

    def busy(self) -> bool:
        return bool(self.clients)

    def close_all(self) -> None:
        for client in list(self.clients):
            client.close()
        for route in self.routes.values():
            for up in route.upstreams():
                up.close_idle()
        for up in self.retired:
            up.close_idle()

    # -- stats ---------------------------------------------------------------

    def stats_json(self) -> dict[str, Any]:
        envs: dict[str, Any] = {}
        for (env, release), rs in self.release_stats.items():
            env_out = envs.get(env)
            if env_out is None:
                route = self.routes.get(env)
                env_out = envs[env] = {
                    "listen": str(route.spec.listen) if route else None,
                    "failed": self.env_failed.get(env, 0),
                    "releases": {},
                }
            env_out["releases"][release] = {
                "weight": None,
                "requests": rs.requests_json(),
                "aborted": rs.counts[ABORTED],
                "latency": rs.latency.to_json(),
                "instances": {},
            }
        for env, route in self.routes.items():
            releases = envs[env]["releases"] if env in envs else {}
            for pool in route.balancer.pools:
                rel = releases.get(pool.release)
                if rel is None:
                    continue
                rel["weight"] = pool.weight
                for up in pool.members:
                    rel["instances"][up.id] = up.to_json(False)
        for up in self.retired:
            rel = envs.get(up.env, {}).get("releases", {}).get(up.release)
            if rel is not None and up.id not in rel["instances"]:
                rel["instances"][up.id] = up.to_json(True)
        for env, failed in self.env_failed.items():
            if env not in envs:
                route = self.routes.get(env)
                envs[env] = {
                    "listen": str(route.spec.listen) if route else None,
                    "failed": failed,
                    "releases": {},
                }
        return envs
