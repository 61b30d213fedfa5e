"""Releases: rollback latency under load, and release time beyond the app's own start.

Rollback latency is measured from the moment `kiln rollback` is started to
the first moment after which every response comes from the previous release
(the client side), and separately as the daemon's own switch time (router
update included). Release overhead is a blue-green release's wall time minus
the app's own time from process start to ready, the part no tool can remove.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

from rich.console import Console

from benchmarks.common import KILN, Row, copy_app, workdir

ROUNDS = 5


def _kiln(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(KILN), *args], capture_output=True, text=True, env={**os.environ, **env}, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"kiln {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _app(dest: Path, port: int, greeting: str) -> Path:
    app = copy_app(dest)
    cfg = app / "kiln.toml"
    cfg.write_text(
        cfg.read_text()
        .replace("127.0.0.1:8081", f"127.0.0.1:{port}")
        .replace("127.0.0.1:8080", f"127.0.0.1:{_free_port()}")
    )
    module = app / "hello" / "__init__.py"
    module.write_text(module.read_text().replace('"Hello"', f'"{greeting}"'))
    return app


class Watch:
    """Two keep-alive clients recording (start time, release) of every response."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.hits: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        deadline = time.monotonic() + 600
        while not self.stop.is_set() and time.monotonic() < deadline:
            start = time.monotonic()
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                self.hits.append((start, resp.getheader("X-Kiln-Release") or "?"))
            except (OSError, http.client.HTTPException):
                conn.close()
                self.hits.append((start, "error"))
        conn.close()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def run(console: Console) -> list[Row]:
    tmp = workdir("release")
    env = {"KILN_HOME": str(tmp / "home")}
    port = _free_port()
    v1 = _kiln(env, "bake", str(_app(tmp / "v1", port, "Hello")), "--json")
    v2 = _kiln(env, "bake", str(_app(tmp / "v2", port, "Howdy")), "--json")
    d1, d2 = json.loads(v1.stdout)["digest"], json.loads(v2.stdout)["digest"]
    try:
        console.print("  release overhead…")
        _kiln(env, "release", d1, "--env", "staging")
        start = time.perf_counter()
        view = json.loads(_kiln(env, "release", d2, "--env", "staging", "--json").stdout)
        release_wall = time.perf_counter() - start
        app_start = max(i["ready_at"] - i["created"] for i in view["instances"] if i["ready_at"])

        console.print(f"  rollback latency under load, {ROUNDS} rounds…")
        watch = Watch(port)
        client_side, daemon_side, cli_wall = [], [], []
        current = "r2"
        for _ in range(ROUNDS):
            previous = "r1" if current == "r2" else "r2"
            time.sleep(0.5)
            t0 = time.monotonic()
            out = json.loads(
                _kiln(env, "rollback", "--env", "staging", "--to", previous, "--json").stdout
            )
            cli_wall.append(time.monotonic() - t0)
            assert out["release"] == previous, out
            time.sleep(0.5)
            stale = [s for s, rel in watch.hits if s >= t0 and rel == current]
            client_side.append((max(stale) - t0) if stale else 0.0)
            events = json.loads(_kiln(env, "events", "--env", "staging", "--json").stdout)["events"]
            done = [e for e in events if e["kind"] == "rollback.done"]
            daemon_side.append(done[-1]["data"]["seconds"])
            current = previous  # next round switches back to the other warm release
        watch.close()
        errors = sum(1 for _, rel in watch.hits if rel == "error")
    finally:
        _kiln(env, "daemon", "stop", "--all")
    return [
        Row(
            "rollback: command start → all responses from previous",
            statistics.median(client_side),
            "s",
            1.0,
            "goal",
            f"median of {ROUNDS}; {errors} failed requests",
        ),
        Row("rollback: CLI wall time", statistics.median(cli_wall), "s", 1.0, "goal"),
        Row(
            "rollback: daemon switch incl. router update",
            statistics.median(daemon_side) * 1000,
            "ms",
        ),
        Row(
            "release (blue-green) beyond the app's own start",
            release_wall - app_start,
            "s",
            app_start,
            "app start→ready",
            f"release wall time {release_wall:.2f}s",
        ),
    ]
