"""Zero: failed requests under constant load across many releases and rollbacks.

The example app (gunicorn + Flask, two replicas) is released to staging,
then, while 4 keep-alive clients request it through the router without
pause, RELEASES consecutive releases of each strategy go out, alternating
between two images: blue-green, rolling, then canary (``--steps 50,100
--interval 1s``, kiln.toml's ``min_requests = 20`` so a 1-second step has
enough traffic to be judged). Then RELEASES rollbacks switch between the
last two releases (``kiln rollback --to rN``; the previous one stays warm).

A failed request is any answer but 200, or none at all. The goal is 0.
Each phase stops early if it runs past BUDGET seconds, so the suite stays
within about ten minutes on a small machine; the row then says how many
releases were done.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.common import (
    KILN,
    Hit,
    Load,
    Row,
    free_port,
    kiln_json,
    load_average,
    make_app,
    rss_mb,
    stop_home,
    workdir,
)
from kiln.router.client import RouterClient

RELEASES = int(os.environ.get("KILN_BENCH_ZERO_RELEASES", "20"))
BUDGET = float(os.environ.get("KILN_BENCH_ZERO_BUDGET", "150"))
CLIENTS = 4
CANARY = 'canary = { steps = [50, 100], interval = "1s", min_requests = 20 }'


@dataclass
class Phase:
    name: str
    done: int = 0
    aborted: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)
    wall: float = 0.0

    @property
    def failed(self) -> list[Hit]:
        return [h for h in self.hits if h.status != 200]


def _app(dest: Path, port: int, greeting: str) -> str:
    app = make_app(dest, port, greeting=greeting)
    cfg = app / "kiln.toml"
    text, n = re.subn(r"^canary = \{.*\}$", CANARY, cfg.read_text(), count=1, flags=re.M)
    if n != 1:
        raise RuntimeError(f"{cfg}: no canary line to replace")
    cfg.write_text(text)
    return str(app)


def _kiln(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any] | None, str]:
    """Exit code, JSON view (if any) and last stderr line: a failed release is data here."""
    proc = subprocess.run(
        [str(KILN), *args, "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
        check=False,
    )
    try:
        view = json.loads(proc.stdout) if proc.stdout.strip() else None
    except ValueError:
        view = None
    lines = proc.stderr.strip().splitlines()
    return proc.returncode, view, lines[-1] if lines else ""


def _releases(
    env: dict[str, str], images: list[str], serving: int, strategy: str, load: Load
) -> tuple[Phase, int]:
    phase = Phase(strategy)
    first = load.count()
    began = time.monotonic()
    for _ in range(RELEASES):
        if time.monotonic() - began > BUDGET:
            break
        target = 1 - serving
        args = ["release", images[target], "--env", "staging", "--strategy", strategy]
        if strategy == "canary":
            args += ["--steps", "50,100", "--interval", "1s"]
        start = time.monotonic()
        code, view, err = _kiln(env, *args)
        phase.seconds.append(time.monotonic() - start)
        if code == 0 and view is not None and view.get("state") == "serving":
            phase.done += 1
            serving = target
        else:
            phase.aborted.append(err or f"exit {code}")
    phase.wall = time.monotonic() - began
    load.wait_for(20)
    phase.hits = load.window(first, load.count())
    return phase, serving


def _rollbacks(env: dict[str, str], load: Load) -> Phase:
    phase = Phase("rollback")
    status = kiln_json(env, "status", "--env", "staging")["envs"][0]["releases"]
    states = {r["state"]: r["release"] for r in status}
    if "serving" not in states or "warm" not in states:
        phase.aborted.append(f"no serving and warm release to switch between: {states}")
        return phase
    current, other = states["serving"], states["warm"]
    first = load.count()
    began = time.monotonic()
    for _ in range(RELEASES):
        if time.monotonic() - began > BUDGET:
            break
        start = time.monotonic()
        code, view, err = _kiln(env, "rollback", "--env", "staging", "--to", other)
        phase.seconds.append(time.monotonic() - start)
        if code == 0 and view is not None and view.get("release") == other:
            phase.done += 1
            current, other = other, current
        else:
            phase.aborted.append(err or f"exit {code}")
    phase.wall = time.monotonic() - began
    load.wait_for(20)
    phase.hits = load.window(first, load.count())
    return phase


def _row(phase: Phase) -> Row:
    failed = phase.failed
    what = "rollbacks" if phase.name == "rollback" else f"{phase.name} releases"
    note = f"{phase.done} of {RELEASES} done in {phase.wall:.0f}s"
    if phase.seconds:
        note += f", median {statistics.median(phase.seconds):.1f}s each"
    if phase.done + len(phase.aborted) < RELEASES:
        note += f" (stopped at the {BUDGET:.0f}s budget)"
    if phase.aborted:
        note += f"; {len(phase.aborted)} ended otherwise: {phase.aborted[0]}"
    if failed:
        common = Counter(h.error or f"HTTP {h.status}" for h in failed).most_common(1)[0][0]
        note += f"; e.g. {common[:80]}"
    return Row(
        f"zero: failed requests across {what}",
        len(failed),
        "requests",
        len(phase.hits),
        "requests sent",
        note + "; goal 0",
    )


def run(console: Console) -> list[Row]:
    tmp = workdir("zero")
    env = {"KILN_HOME": str(tmp / "home")}
    port = free_port()
    console.print(f"  {load_average()}; baking two versions of the example app…")
    phases: list[Phase] = []
    home = Path(env["KILN_HOME"])
    try:
        images = [
            kiln_json(env, "bake", _app(tmp / name, port, greeting))["digest"]
            for name, greeting in (("v1", "Hello"), ("v2", "Howdy"))
        ]
        kiln_json(env, "release", images[0], "--env", "staging")
        serving = 0
        with Load(port, clients=CLIENTS, limit=4 * BUDGET + 600) as load:
            load.wait_for(100)
            memory_before = _memory(home)
            for strategy in ("blue-green", "rolling", "canary"):
                phase, serving = _releases(env, images, serving, strategy, load)
                phases.append(phase)
                console.print(
                    f"    {strategy}: {phase.done} releases in {phase.wall:.0f}s,"
                    f" {len(phase.hits)} requests, {len(phase.failed)} failed"
                )
            phase = _rollbacks(env, load)
            phases.append(phase)
            console.print(
                f"    rollback: {phase.done} rollbacks in {phase.wall:.0f}s,"
                f" {len(phase.hits)} requests, {len(phase.failed)} failed"
            )
            memory_after = _memory(home)
    finally:
        stop_home(env)
        shutil.rmtree(tmp, ignore_errors=True)
    done = sum(p.done for p in phases)
    return [_row(p) for p in phases] + [
        Row(
            f"zero: {name} RSS after {done} releases and rollbacks",
            memory_after[name],
            "MB",
            memory_before[name],
            "before them",
            "growth here would be a leak",
        )
        for name in ("daemon", "router")
    ]


def _memory(home: Path) -> dict[str, float]:
    router = RouterClient(home / "run" / "router.sock").health()["pid"]
    daemon = (home / "run" / "daemon.pid").read_text().split()[0]
    return {"daemon": rss_mb(int(daemon)), "router": rss_mb(int(router))}
