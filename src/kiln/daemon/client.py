"""The CLI's side of the daemon: a small HTTP client over the unix socket, and
starting the daemon on demand."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

from kiln import errors
from kiln.errors import DaemonError, KilnError
from kiln.home import Home
from kiln.state import actor


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class DaemonClient:
    def __init__(self, home: Home, timeout: float = 120.0) -> None:
        self.home = home
        self.socket = home.run / "daemon.sock"
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        conn = _UnixConnection(str(self.socket), self.timeout)
        try:
            payload = (
                json.dumps({**(body or {}), "actor": actor()}).encode()
                if method == "POST"
                else None
            )
            headers = {"Content-Type": "application/json"} if payload else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = json.loads(resp.read() or b"{}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise DaemonError(f"cannot talk to the kiln daemon at {self.socket}: {exc}") from exc
        finally:
            conn.close()
        if resp.status >= 300:
            kind = getattr(errors, str(data.get("kind")), KilnError)
            if not (isinstance(kind, type) and issubclass(kind, KilnError)):
                kind = KilnError
            raise kind(str(data.get("error")), hint=data.get("hint"))
        return data

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.call("POST", path, body)

    def running(self) -> dict[str, Any] | None:
        if not self.socket.exists():
            return None
        try:
            health: dict[str, Any] = self.get("/health")
            return health
        except DaemonError:
            return None

    def ensure(self, wait: float = 15.0) -> dict[str, Any]:
        """The daemon's health; starts the daemon if it is not running."""
        health = self.running()
        if health:
            return health
        self.home.ensure()
        with open(self.home.logs / "daemon.log", "ab") as out:
            subprocess.Popen(
                [sys.executable, "-m", "kiln.daemon"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                env={**os.environ, "KILN_HOME": str(self.home.root)},
            )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            health = self.running()
            if health:
                return health
            time.sleep(0.05)
        raise DaemonError(
            f"the kiln daemon did not start within {wait:.0f}s",
            hint=f"see {self.home.logs / 'daemon.log'}",
        )

    def stop(self, everything: bool = False, wait: float = 30.0) -> bool:
        if not self.running():
            return False
        self.post("/shutdown", {"all": everything})
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and self.socket.exists():
            time.sleep(0.05)
        return True
