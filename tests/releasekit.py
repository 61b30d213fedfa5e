"""Helpers for end-to-end release tests: app variants, a load generator, cleanup."""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kiln.runtime.local import LocalRuntime
from kit import copy_example, git, run_kiln


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_app(
    dest: Path, port: int, *, greeting: str = "Hello", toml_edits: dict[str, str] | None = None
) -> Path:
    """The example app listening on ``port`` for env 'staging' (and 'production' on port+0)."""
    app = copy_example(dest, commit=False)
    module = app / "hello" / "__init__.py"
    module.write_text(module.read_text().replace('"Hello"', f'"{greeting}"'))
    cfg = app / "kiln.toml"
    text = cfg.read_text()
    text = text.replace('listen = "127.0.0.1:8081"', f'listen = "127.0.0.1:{port}"')
    text = text.replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{free_port()}"')
    text = text.replace('timeout = "30s"', 'timeout = "15s"')
    for old, new in (toml_edits or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    cfg.write_text(text)
    git(app, "init", "-q", "-b", "main")
    git(app, "add", "-A")
    git(app, "commit", "-q", "-m", greeting)
    return app


def bake(app: Path) -> str:
    result = run_kiln("bake", str(app), "--json")
    assert result.code == 0, result.err
    digest: str = result.json()["digest"]
    return digest


def cleanup(home: Path) -> None:
    """Stop everything a test started in ``home``, even if its daemon was killed."""
    run_kiln("daemon", "start")
    run_kiln("daemon", "stop", "--all")
    runtime = LocalRuntime()
    for stray in runtime.find(home / "rootfs"):
        runtime.stop(stray, 1.0)


@dataclass
class Hit:
    start: float
    end: float
    status: int
    release: str
    error: str = ""


@dataclass
class Load:
    """Keep-alive clients hammering a URL until stopped; every response recorded."""

    port: int
    clients: int = 8
    path: str = "/"
    hits: list[Hit] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        for _ in range(self.clients):
            t = threading.Thread(target=self._client, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        deadline = time.monotonic() + 300  # bounded, whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            start = time.monotonic()
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                body = resp.read()
                release = resp.getheader("X-Kiln-Release") or ""
                hit = Hit(start, time.monotonic(), resp.status, release)
                if resp.status != 200:
                    hit.error = body[:200].decode("utf-8", "replace")
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException) as exc:
                hit = Hit(start, time.monotonic(), 0, "", f"{type(exc).__name__}: {exc}")
                conn.close()
            with self._lock:
                self.hits.append(hit)
        conn.close()

    def failures(self) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.status != 200]

    def since(self, t: float) -> list[Hit]:
        with self._lock:
            return [h for h in self.hits if h.start >= t]

    def wait_for(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        start = len(self.hits)
        while len(self.hits) - start < n and time.monotonic() < deadline:
            time.sleep(0.02)


def releases_seen(hits: list[Hit]) -> set[str]:
    return {h.release for h in hits}


def body_release(text: str) -> str | None:
    m = re.search(r"hello (r\d+)", text)
    return m.group(1) if m else None
