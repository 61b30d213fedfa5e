"""The daemon's HTTP API, served on a unix socket in ``KILN_HOME/run``.

JSON in, JSON out. Errors come back as ``{"error", "hint", "kind",
"exit_code"}`` so the CLI can raise the same KilnError the daemon met.
``GET /logs`` answers a batch of log lines and a cursor (see
:mod:`kiln.logs.query`); ``GET /metrics`` answers Prometheus text.
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kiln
from kiln.daemon.engine import Engine
from kiln.daemon.metrics import render_daemon
from kiln.errors import KilnError, ReleaseLocked
from kiln.logs.collector import Collector
from kiln.logs.query import LogQuery, wait_param
from kiln.prometheus import CONTENT_TYPE

log = logging.getLogger("kiln.daemon")


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    engine: Engine
    stop_event: threading.Event
    stop_all: bool = False
    logs: Collector | None = None


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    def address_string(self) -> str:
        return "unix"

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return {}
        value = json.loads(self.rfile.read(length))
        return value if isinstance(value, dict) else {}

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            body = self._body() if method == "POST" else {}
            result = self._route(method, url.path, query, body)
        except KilnError as exc:
            status = 409 if isinstance(exc, ReleaseLocked) else (400 if exc.exit_code == 2 else 500)
            self._send(
                status,
                {
                    "error": exc.message,
                    "hint": exc.hint,
                    "kind": type(exc).__name__,
                    "exit_code": exc.exit_code,
                },
            )
            return
        except Exception as exc:
            log.exception("api error on %s %s", method, self.path)
            self._send(
                500, {"error": f"{type(exc).__name__}: {exc}", "kind": "KilnError", "exit_code": 1}
            )
            return
        self._send(200, result)

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/metrics":
            self._metrics()
            return
        self._dispatch("GET")

    def _metrics(self) -> None:
        try:
            data = render_daemon(self.server.engine, self.server.logs).encode()
        except Exception as exc:
            log.exception("metrics scrape failed")
            self._send(500, {"error": f"{type(exc).__name__}: {exc}", "kind": "KilnError"})
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _route(self, method: str, path: str, q: dict[str, str], body: dict[str, Any]) -> Any:
        engine = self.server.engine
        who = str(body.get("actor") or "unknown")
        if (method, path) == ("GET", "/health"):
            return {
                "ok": True,
                "pid": os.getpid(),
                "home": str(engine.home.root),
                "version": kiln.__version__,
            }
        if (method, path) == ("POST", "/releases"):
            release = engine.submit_release(
                body["image"],
                body["env"],
                body.get("strategy"),
                who,
                steps=body.get("steps"),
                interval=body.get("interval"),
                force=bool(body.get("force")),
            )
            return engine.release_view(release)
        if method == "GET" and path.startswith("/releases/"):
            release = engine.state.release(int(path.rsplit("/", 1)[1]))
            view = engine.release_view(release)
            view["events"] = [
                e
                for e in engine.state.events(env=release.env, since=release.created - 1)
                if e["release"] in (release.name, None) or e["kind"].startswith("traffic")
            ]
            return view
        if (method, path) == ("POST", "/rollback"):
            release = engine.rollback(body["env"], body.get("to"), who)
            return engine.release_view(release)
        if (method, path) == ("POST", "/steer"):
            return engine.release_view(engine.steer(body["env"], body["command"], who))
        if (method, path) == ("POST", "/abort"):
            return engine.release_view(engine.abort_env(body["env"], who))
        if (method, path) == ("GET", "/status"):
            return engine.status(q.get("env"))
        if (method, path) == ("GET", "/ps"):
            return {
                "instances": [
                    i.to_json()
                    for i in engine.state.instances(states=("starting", "ready", "draining"))
                ]
            }
        if (method, path) == ("GET", "/history"):
            releases = engine.state.releases(env=q.get("env"))
            return {"releases": [r.to_json() for r in releases]}
        if (method, path) == ("GET", "/events"):
            since = float(q["since"]) if "since" in q else None
            return {
                "events": engine.state.events(
                    env=q.get("env"), since=since, after_id=int(q.get("after", 0))
                )
            }
        if (method, path) == ("GET", "/logs"):
            if self.server.logs is None:
                raise KilnError("this daemon collects no logs")
            return self.server.logs.read(LogQuery.from_params(q), wait_param(q)).to_json()
        if (method, path) == ("POST", "/shutdown"):
            self.server.stop_all = bool(body.get("all"))
            # Answer first, then stop: the caller waits for the socket to go away.
            threading.Thread(target=_stop_soon, args=(self.server,), daemon=True).start()
            return {"ok": True}
        from kiln.errors import UsageError

        raise UsageError(f"no such API endpoint: {method} {path}")


def _stop_soon(server: Server) -> None:
    time.sleep(0.05)
    server.stop_event.set()
    server.shutdown()
