"""The router process: listeners, config changes, persistence, handover, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
from functools import partial
from pathlib import Path
from typing import Any

from kiln.errors import RouterError
from kiln.router.config import Address, InvalidConfig, RouterConfig, load_state, save_state
from kiln.router.control import Busy, ControlConn, ListenError, StateNotSaved
from kiln.router.handover import Takeover
from kiln.router.pools import LATENCY_BUCKETS
from kiln.router.proxy import (
    CONNECT_TIMEOUT,
    HEADER_TIMEOUT,
    SWEEP_INTERVAL,
    Listener,
    Proxy,
)

log = logging.getLogger("kiln.router")

BACKLOG = 2048
DEFAULT_DRAIN = 10.0


def bind_listener(addr: Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Not SO_REUSEPORT: a second router on the same port must fail loudly.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Router:
    """Everything one router process holds."""

    def __init__(
        self,
        control_path: Path,
        state_path: Path | None,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        response_timeout: float = HEADER_TIMEOUT,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.control_path = control_path
        self.state_path = state_path
        self.proxy = Proxy(
            self.loop, connect_timeout=connect_timeout, header_timeout=response_timeout
        )
        self.config = RouterConfig.empty()
        self.listeners: dict[Address, Listener] = {}
        self.pid = os.getpid()
        self.started_at = time.time()
        self._lock = asyncio.Lock()
        self._control: asyncio.AbstractServer | None = None
        self._control_inode: int | None = None
        self._handover_owner: ControlConn | None = None
        self._stopping = False
        self._sweeper: asyncio.Task[None] | None = None
        self.stopped: asyncio.Future[None] = self.loop.create_future()

    # -- config --------------------------------------------------------------

    async def apply(
        self, config: RouterConfig, inherited: dict[Address, socket.socket] | None = None
    ) -> None:
        """Make ``config`` the live one, or raise ListenError and change nothing."""
        opened: list[Listener] = []
        plan: dict[Address, tuple[Listener, str]] = {}
        try:
            for env, spec in config.envs.items():
                listener = self.listeners.get(spec.listen)
                if listener is None:
                    sock = inherited.pop(spec.listen, None) if inherited else None
                    if sock is None:
                        try:
                            sock = bind_listener(spec.listen)
                        except OSError as exc:
                            raise ListenError(str(spec.listen), exc.strerror or str(exc)) from exc
                    listener = Listener(spec.listen, env, sock)
                    opened.append(listener)
                    # Not serving yet: connections wait in the backlog until
                    # the routes they need are installed below.
                    listener.server = await self.loop.create_server(
                        partial(self.proxy.client_factory, listener),
                        sock=sock,
                        backlog=BACKLOG,
                        start_serving=False,
                    )
                plan[spec.listen] = (listener, env)
        except BaseException:
            for listener in opened:
                self._close_listener(listener)
            raise
        routes = self.proxy.build_routes(config)

        # The switch: synchronous, so no request sees half of it.
        self.proxy.install(routes)
        for listener, env in plan.values():
            listener.env = env
        removed = [lst for addr, lst in self.listeners.items() if addr not in plan]
        self.listeners = {addr: lst for addr, (lst, _) in plan.items()}
        self.config = config
        for listener in removed:
            self._close_listener(listener)
        for listener in opened:
            assert listener.server is not None
            await listener.server.start_serving()

    async def put_config(self, config: RouterConfig) -> None:
        async with self._lock:
            if self._stopping:
                raise Busy("the router is shutting down")
            if self._handover_owner is not None:
                raise Busy("the router is handing over to a new process; retry")
            await self.apply(config)
            try:
                await self._persist()
            except OSError as exc:
                log.error("could not save state to %s: %s", self.state_path, exc)
                raise StateNotSaved(
                    f"config generation {config.generation} is live but could not be saved"
                    f" to {self.state_path}: {exc.strerror or exc}"
                ) from exc
        log.info("config generation %d applied (%d envs)", config.generation, len(config.envs))

    async def _persist(self) -> None:
        if self.state_path is not None:
            await asyncio.to_thread(save_state, self.state_path, self.config)

    async def restore(self) -> None:
        """Come back with the pools of the last config, before anyone re-syncs us."""
        if self.state_path is None:
            return
        try:
            config = load_state(self.state_path)
        except InvalidConfig as exc:
            log.error("ignoring state: %s", exc)
            return
        if config is None:
            return
        try:
            await self.apply(config)
        except ListenError as exc:
            # Serve what we can; the daemon sees the difference and re-syncs.
            log.error("state: %s; starting with the other environments only", exc)
            for env, spec in list(config.envs.items()):
                try:
                    await self.apply(
                        RouterConfig(config.generation, {**self.config.envs, env: spec})
                    )
                except ListenError as again:
                    log.error("state: dropping environment %s: %s", env, again)
            return
        log.info("restored config generation %d from %s", config.generation, self.state_path)

    def _close_listener(self, listener: Listener) -> None:
        listener.closed = True
        if listener.server is not None:
            listener.server.close()
        else:
            listener.sock.close()
        for client in list(self.proxy.clients):
            if client.listener is listener:
                client.retire()

    # -- control socket ------------------------------------------------------

    def check_control_free(self) -> None:
        if _socket_alive(self.control_path):
            raise RouterError(
                f"another router is already serving {self.control_path}",
                hint="start with --takeover to replace it",
            )

    async def serve_control(self) -> None:
        """Listen on the control path, atomically replacing whatever is there."""
        path = self.control_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{self.pid}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        self._control = await self.loop.create_unix_server(
            partial(ControlConn, self), path=str(tmp)
        )
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        self._control_inode = os.stat(path).st_ino

    def _close_control(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        # Only remove the path if it is still ours: after a takeover it is
        # the successor's.
        try:
            if os.stat(self.control_path).st_ino == self._control_inode:
                self.control_path.unlink()
        except FileNotFoundError:
            pass

    def control_closed(self, conn: ControlConn) -> None:
        if conn is self._handover_owner and not self._stopping:
            log.warning("the successor went away before finishing the takeover; carrying on")
            self._handover_owner = None

    # -- handover ------------------------------------------------------------

    async def begin_handover(self, owner: ControlConn) -> tuple[dict[str, Any], list[int]]:
        """Our config and listening sockets, for a successor router."""
        async with self._lock:
            if self._stopping:
                raise Busy("the router is shutting down")
            if self._handover_owner is not None:
                raise Busy("another takeover is in progress")
            self._handover_owner = owner
            listeners = list(self.listeners.values())
            log.info("handing %d listening sockets to a successor", len(listeners))
            payload = {
                "pid": self.pid,
                "config": self.config.to_json(),
                "listeners": [str(lst.addr) for lst in listeners],
            }
            return payload, [lst.sock.fileno() for lst in listeners]

    async def take_over(self, old_control: Path) -> Takeover:
        """Adopt the listening sockets and config of the router at ``old_control``."""
        takeover = Takeover(old_control)
        config_json, sockets = await asyncio.to_thread(takeover.fetch)
        try:
            config = RouterConfig.from_json(config_json)
            await self.apply(config, inherited=sockets)
        except (InvalidConfig, ListenError) as exc:
            takeover.abandon()
            raise RouterError(f"takeover failed: {exc}") from exc
        finally:
            for leftover in sockets.values():
                leftover.close()
        log.info(
            "took over %d listeners, config generation %d", len(self.listeners), config.generation
        )
        try:
            await self._persist()
        except OSError as exc:
            # Already serving on the shared sockets: dying now would cost
            # requests, a stale state file costs nothing until a crash.
            log.error("could not save state to %s: %s", self.state_path, exc)
        return takeover

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._sweeper = self.loop.create_task(self._sweep_forever())
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_shutdown, DEFAULT_DRAIN)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL / 10 if self.proxy.draining else SWEEP_INTERVAL)
            try:
                self.proxy.sweep()
            except Exception:
                log.exception("sweep failed")

    def request_shutdown(self, drain: float) -> None:
        if not self._stopping:
            self.loop.create_task(self.shutdown(drain))

    async def shutdown(self, drain: float) -> None:
        if self._stopping:
            return
        self._stopping = True
        log.info("draining (up to %gs), %d client connections", drain, len(self.proxy.clients))
        proxy = self.proxy
        proxy.draining = True
        proxy.drain_started = self.loop.time()
        for listener in self.listeners.values():
            listener.closed = True
            if listener.server is not None:
                listener.server.close()
        self._close_control()
        deadline = self.loop.time() + drain
        while proxy.busy() and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        if proxy.busy():
            log.warning("drain timeout: closing %d client connections", len(proxy.clients))
        proxy.close_all()
        await asyncio.sleep(0.05)  # let the closes reach the sockets
        if self._sweeper is not None:
            self._sweeper.cancel()
        log.info("stopped")
        if not self.stopped.done():
            self.stopped.set_result(None)

    # -- reports -------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "ok": True,
            "pid": self.pid,
            "generation": self.config.generation,
            "started_at": self.started_at,
            "draining": self._stopping,
        }

    def stats(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "started_at": self.started_at,
            "uptime": round(time.time() - self.started_at, 3),
            "generation": self.config.generation,
            "draining": self._stopping,
            "latency_buckets": list(LATENCY_BUCKETS),
            "envs": self.proxy.stats_json(),
        }


def _socket_alive(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(1.0)
        sock.connect(str(path))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def _raise_nofile_limit() -> None:
    # Every proxied connection costs two descriptors.
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


async def run(
    control: Path,
    state: Path | None,
    takeover: Path | None = None,
    takeover_drain: float = 30.0,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    response_timeout: float = HEADER_TIMEOUT,
) -> None:
    """Run a router until it is shut down."""
    _raise_nofile_limit()
    router = Router(
        control, state, connect_timeout=connect_timeout, response_timeout=response_timeout
    )
    handover: Takeover | None = None
    if takeover is not None:
        handover = await router.take_over(takeover)
    else:
        router.check_control_free()
        await router.restore()
    router.start()
    try:
        await router.serve_control()
    except BaseException:
        if handover is not None:
            handover.abandon()
        raise
    if handover is not None:
        await asyncio.to_thread(handover.finish, takeover_drain)
        log.info("the old router is draining")
    log.info("ready: control %s, pid %d", control, router.pid)
    # Everything allocated so far (modules, config, listeners) lives as long
    # as the process: keep it out of the cyclic collector's full passes,
    # which every connection and request otherwise brings closer.
    gc.freeze()
    await router.stopped
