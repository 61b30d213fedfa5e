"""Heal: from SIGKILL of an instance to a replacement serving, beyond the app's own start.

The example app (gunicorn + Flask, two replicas; its readiness endpoint
answers 503 for its first second, like a service warming up) is released
to staging under light load (2 keep-alive clients through the router).
KILLS times, one ready instance is killed with SIGKILL, sandbox and all (its
process group: bubblewrap, the sandbox's init and the app), and the router's
config is polled every 5 ms until a new instance is in staging's pool.

The figure is that time minus the app's own start (the replacement's
``created`` → ``ready_at`` in ``kiln ps --json``), the part kiln adds:
noticing the death, starting the replacement, probing it, updating the
router. The daemon's events (``instance.failed``, ``instance.started``,
``instance.ready``) split it up. Medians of KILLS kills, a second apart.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.common import (
    Load,
    Row,
    free_port,
    kiln_json,
    load_average,
    make_app,
    stop_home,
    workdir,
)
from kiln.errors import RouterError
from kiln.router.client import RouterClient

KILLS = 5
TIMEOUT = 120.0


@dataclass
class Heal:
    victim: str
    replacement: str
    killed: float  # time.time()
    out_of_pool: float
    in_pool: float
    app_start: float = 0.0  # the replacement's created → ready_at

    @property
    def total(self) -> float:
        return self.in_pool - self.killed


def _pool(router: RouterClient) -> set[str]:
    config = router.get_config()
    env = config.get("envs", {}).get("staging", {})
    return {i["id"] for pool in env.get("pools", []) for i in pool.get("instances", [])}


def _kill_one(env: dict[str, str], router: RouterClient) -> Heal:
    before = _pool(router)
    ready = [
        i
        for i in kiln_json(env, "ps")["instances"]
        if i["env"] == "staging" and i["state"] == "ready" and i["id"] in before and i["pid"]
    ]
    victim = min(ready, key=lambda i: i["created"])  # the oldest
    killed = time.time()
    os.killpg(victim["pid"], signal.SIGKILL)
    out_of_pool = 0.0
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            ids = _pool(router)
        except RouterError:
            ids = before  # a router mid-update: ask again
        now = time.time()
        if not out_of_pool and victim["id"] not in ids:
            out_of_pool = now
        fresh = ids - before
        if fresh:
            return Heal(victim["id"], fresh.pop(), killed, out_of_pool or now, now)
        time.sleep(0.005)
    raise SystemExit(f"heal: no replacement for {victim['id']} in the router after {TIMEOUT:g}s")


def _event_time(events: list[dict[str, Any]], kind: str, instance: str) -> float:
    for event in events:
        if event["kind"] == kind and event["instance"] == instance:
            return float(event["ts"])
    raise SystemExit(f"heal: no {kind} event for {instance}")


def run(console: Console) -> list[Row]:
    tmp = workdir("heal")
    env = {"KILN_HOME": str(tmp / "home")}
    port = free_port()
    console.print(f"  {load_average()}; baking the example app…")
    router = RouterClient(Path(env["KILN_HOME"]) / "run" / "router.sock")
    heals: list[Heal] = []
    try:
        digest = kiln_json(env, "bake", str(make_app(tmp / "hello", port)))["digest"]
        kiln_json(env, "release", digest, "--env", "staging")
        with Load(port, clients=2, limit=600) as load:
            load.wait_for(50)
            for n in range(KILLS):
                time.sleep(1.0)
                heal = _kill_one(env, router)
                records = {i["id"]: i for i in kiln_json(env, "ps")["instances"]}
                new = records[heal.replacement]
                heal.app_start = new["ready_at"] - new["created"]
                heals.append(heal)
                console.print(
                    f"    kill {n + 1}: {heal.victim} → {heal.replacement} serving after"
                    f" {heal.total:.2f}s (its own start {heal.app_start:.2f}s)"
                )
            load.wait_for(20)
            load.stop()
            hits = load.window(0)
        events = kiln_json(env, "events", "--env", "staging")["events"]
    finally:
        stop_home(env)
        shutil.rmtree(tmp, ignore_errors=True)

    failed_at, started_at, ready_at = [], [], []
    for heal in heals:
        failed_at.append(_event_time(events, "instance.failed", heal.victim) - heal.killed)
        started = _event_time(events, "instance.started", heal.replacement)
        started_at.append(started - (heal.killed + failed_at[-1]))
        ready_at.append(heal.in_pool - _event_time(events, "instance.ready", heal.replacement))
    med = statistics.median
    total = med(h.total for h in heals)
    app = med(h.app_start for h in heals)
    beyond = med(h.total - h.app_start for h in heals)
    failed = sum(1 for h in hits if h.status != 200)
    return [
        Row(
            "heal: SIGKILL → replacement serving, beyond the app's own start",
            beyond,
            "s",
            app,
            "app's own start→ready",
            f"median of {KILLS}; kill → in the router's pool {total:.2f}s in all",
        ),
        Row(
            "heal: kill → daemon notices (instance.failed)",
            med(failed_at) * 1000,
            "ms",
        ),
        Row(
            "heal: instance.failed → replacement started",
            med(started_at) * 1000,
            "ms",
            note="the daemon's restart backoff after a failure is part of it",
        ),
        Row(
            "heal: replacement ready → in the router's pool",
            med(ready_at) * 1000,
            "ms",
        ),
        Row(
            "heal: killed instance out of the router's pool",
            med(h.out_of_pool - h.killed for h in heals) * 1000,
            "ms",
            note="after the kill",
        ),
        Row(
            f"heal: requests failed across {KILLS} kills",
            failed,
            "requests",
            len(hits),
            "requests sent",
            "2 keep-alive clients through the router; goal 0",
        ),
    ]
