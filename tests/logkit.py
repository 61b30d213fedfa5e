"""Helpers for the log and metrics tests: a chatty app baked from the example."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from kit import git, run_kiln
from releasekit import bake, make_app

# Serves 200 on $PORT at once; writes CHATTY_LINES numbered lines to stdout,
# CHATTY_BURST at a time every 10 ms, each line one write(2), as an app with
# line-buffered output would; /say?text=X prints X; after CHATTY_DIE_AFTER
# seconds it dies mid-sentence.
CHATTY = r'''"""A chatty app for kiln's log tests."""
import json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

INSTANCE = os.environ["KILN_INSTANCE"]
LINES = int(os.environ.get("CHATTY_LINES", "0"))
BURST = int(os.environ.get("CHATTY_BURST", "10"))
DIE_AFTER = float(os.environ.get("CHATTY_DIE_AFTER", "0"))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/say":
            os.write(1, parse_qs(url.query)["text"][0].encode() + b"\n")
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def chatter():
    n = 0
    while n < LINES:
        for _ in range(min(BURST, LINES - n)):
            os.write(1, b"chatty %s %d\n" % (INSTANCE.encode(), n))
            n += 1
        time.sleep(0.01)


def die():
    time.sleep(DIE_AFTER)
    os.write(1, b"last words of %s\n" % INSTANCE.encode())
    os.write(2, b"dying: no newline at the very end")
    os._exit(3)


os.write(1, json.dumps({"level": "info", "msg": "starting", "instance": INSTANCE}).encode() + b"\n")
os.write(2, b"[WARNING] this goes to stderr\n")
threading.Thread(target=chatter, daemon=True).start()
if DIE_AFTER:
    threading.Thread(target=die, daemon=True).start()
class Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the router resetting an idle connection is no news


Server(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''


def chatty_app(
    dest: Path, port: int, env_vars: dict[str, str] | None = None, **release: str
) -> str:
    """Bake the example app with its command swapped for the chatty one."""
    app = make_app(dest, port)
    (app / "hello" / "chatty.py").write_text(CHATTY)
    cfg = app / "kiln.toml"
    text = re.sub(
        r"^command = \[.*\]$",
        'command = ["python3", "-m", "hello.chatty"]',
        cfg.read_text(),
        count=1,
        flags=re.M,
    )
    for key, value in release.items():
        text = re.sub(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
    if env_vars:
        pairs = ", ".join(f'{k} = "{v}"' for k, v in env_vars.items())
        text = text.replace("[env.staging]\n", f"[env.staging]\nvars = {{ {pairs} }}\n", 1)
    cfg.write_text(text)
    git(app, "add", "-A")
    git(app, "commit", "-q", "-m", "chatty")
    return bake(app)


def release(image: str) -> dict[str, Any]:
    result = run_kiln("release", image, "--env", "staging", "--json")
    assert result.code == 0, result.err
    view: dict[str, Any] = result.json()
    return view


def wait_until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
