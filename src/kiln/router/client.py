"""A small synchronous client of the router's control API, for the daemon.

Every call opens a fresh unix-socket connection, so a client keeps working
across a router restart or takeover (the path then leads to the new one).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

from kiln.errors import RouterError


class RouterResponseError(RouterError):
    """The router answered with an error status (``status``: 400, 409, 503…)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"router: {message}")
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("router", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class RouterClient:
    """Talks to one router through its control socket."""

    def __init__(self, control_path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        self.path = os.fspath(control_path)
        self.timeout = timeout

    def health(self) -> dict[str, Any]:
        """``{"ok": true, "pid", "generation", "started_at", "draining"}``."""
        return self._call("GET", "/health")

    def get_config(self) -> dict[str, Any]:
        """The router's current config, as last accepted."""
        return self._call("GET", "/config")

    def put_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Replace the whole config atomically; ``{"ok": true, "generation": N}``.

        Raises RouterResponseError: 400 invalid, 409 a listen address is
        taken (the old config stays), 503 busy handing over (retry).
        """
        return self._call("PUT", "/config", config)

    def stats(self) -> dict[str, Any]:
        """Monotonic counters per environment, release and instance."""
        return self._call("GET", "/stats")

    def shutdown(self, drain: float = 10.0) -> None:
        """Ask the router to finish in-flight requests (up to ``drain`` s) and exit."""
        self._call("POST", f"/shutdown?drain={drain:g}")

    def is_running(self) -> bool:
        try:
            self.health()
        except RouterError:
            return False
        return True

    def wait_healthy(self, timeout: float = 10.0, *, pid: int | None = None) -> dict[str, Any]:
        """Poll /health until the router (with ``pid``, if given) answers."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                health = self.health()
                if pid is None or health.get("pid") == pid:
                    return health
                last = RouterError(f"pid {health.get('pid')} answers, waiting for {pid}")
            except RouterError as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise RouterError(
                    f"router at {self.path} not healthy after {timeout:g}s: {last}"
                ) from last
            time.sleep(0.02)

    def _call(
        self, method: str, target: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        conn = _UnixConnection(self.path, self.timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, target, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            raise RouterError(
                f"router not reachable at {self.path}: {exc}", hint="is the router running?"
            ) from exc
        finally:
            conn.close()
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError as exc:
            raise RouterError(f"router sent invalid JSON for {method} {target}") from exc
        if not isinstance(payload, dict):
            raise RouterError(f"router sent unexpected JSON for {method} {target}")
        if status >= 300:
            raise RouterResponseError(status, str(payload.get("error") or f"HTTP {status}"))
        return payload


def spawn_router(
    control_path: str | os.PathLike[str],
    state_path: str | os.PathLike[str] | None = None,
    *,
    takeover: str | os.PathLike[str] | None = None,
    takeover_drain: float = 30.0,
    log: BinaryIO | int | None = None,
    python: str = sys.executable,
    extra_args: Sequence[str] = (),
    wait: float | None = 10.0,
) -> subprocess.Popen[bytes]:
    """Start a router process; by default wait until it answers on ``control_path``."""
    cmd = [python, "-m", "kiln.router", "--control", os.fspath(control_path)]
    if state_path is not None:
        cmd += ["--state", os.fspath(state_path)]
    if takeover is not None:
        cmd += ["--takeover", os.fspath(takeover), "--takeover-drain", f"{takeover_drain:g}"]
    cmd += list(extra_args)
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log if log is not None else subprocess.DEVNULL,
        start_new_session=True,
    )
    if wait is not None:
        deadline = time.monotonic() + wait
        client = RouterClient(control_path, timeout=2.0)
        while True:
            if proc.poll() is not None:
                raise RouterError(f"router exited with status {proc.returncode} while starting")
            try:
                client.wait_healthy(0.05, pid=proc.pid)
                break
            except RouterError:
                if time.monotonic() >= deadline:
                    proc.kill()
                    proc.wait()
                    raise RouterError(f"router did not become healthy within {wait:g}s") from None
    return proc
