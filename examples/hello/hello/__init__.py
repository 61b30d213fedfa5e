"""hello: the example app kiln bakes and releases.

Its readiness endpoint answers 503 for the first second of the process's
life, like a real service warming caches, so releases must wait for health.
"""

from __future__ import annotations

import os
import random
import time

from flask import Flask, jsonify

STARTED = time.monotonic()
READY_AFTER = float(os.environ.get("HELLO_READY_AFTER", "1.0"))
# Knobs for demos and tests of canary analysis: a share of failing requests
# and extra latency, set per environment in kiln.toml's vars.
FAIL_RATE = float(os.environ.get("HELLO_FAIL_RATE", "0"))
DELAY = float(os.environ.get("HELLO_DELAY", "0"))

app = Flask(__name__)


@app.get("/")
def index() -> tuple[str, int]:
    if DELAY:
        time.sleep(DELAY)
    release = os.environ.get("KILN_RELEASE", "dev")
    if FAIL_RATE and random.random() < FAIL_RATE:
        return f"hello {release} failed on purpose\n", 500
    greeting = os.environ.get("GREETING", "Hello")
    return f"{greeting} from hello {release}!\n", 200


@app.get("/status")
def status() -> tuple[object, int]:
    ready = time.monotonic() - STARTED >= READY_AFTER
    body = {
        "ready": ready,
        "release": os.environ.get("KILN_RELEASE"),
        "instance": os.environ.get("KILN_INSTANCE"),
    }
    return jsonify(body), (200 if ready else 503)
