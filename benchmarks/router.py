"""Router: kiln's router against HAProxy 2.6 and against no proxy at all, with wrk.

Three targets serve the same upstream (``benchmarks.upstream``: one uvloop +
httptools process answering 13 bytes; directly it takes well over twice the
load a proxy passes, so it is not the bottleneck):

- **direct**: wrk talks to the upstream itself;
- **kiln**: kiln's router (``spawn_router`` + ``put_config``: one environment,
  one pool, one instance, per-request routing, i.e. not sticky);
- **HAProxy**: one frontend, one backend, one server, ``nbthread 1`` (kiln's
  router is one process with one thread, so HAProxy gets one thread too),
  keep-alive to the server with ``http-reuse always`` (kiln reuses any idle
  upstream connection for any client), ``maxconn 4000`` (two descriptors per
  proxied connection stay far below the 20000 open-files limit), and the
  same header work kiln does: ``X-Forwarded-For``/``-Proto``/``-Host`` on the
  request and a release header on the response.

Each measurement is run in two modes, keep-alive and a new connection per
request (``-H 'Connection: close'``), in ROUNDS interleaved rounds (targets
in rotating order, so background load hits them alike); figures are medians.
``KILN_BENCH_ROUNDS`` and ``KILN_BENCH_SECONDS`` (per wrk run) change those.
Throughput is ``wrk -t2 -c50`` flat out; CPU per request is the proxy's user
+ system time from /proc over that run (the steadier figure on a busy
machine, where the proxy competes with wrk and the upstream for CPUs);
added latency is the p50/p99 of a proxy minus direct, measured unloaded
(``wrk -t1 -c1``: one request at a time, so no queueing is counted).

Set ``KILN_BENCH_ROUTER_BASELINE`` to another tree's ``src`` directory to
measure that tree's router beside this one (before/after a change).
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from benchmarks.common import (
    REPO,
    Processes,
    Row,
    cpu_seconds,
    free_port,
    load_average,
    wait_port,
    workdir,
)
from kiln.router.client import RouterClient, spawn_router

ROUNDS = int(os.environ.get("KILN_BENCH_ROUNDS", "5"))
SECONDS = int(os.environ.get("KILN_BENCH_SECONDS", "3"))
LATENCY_SECONDS = 2
THREADS = 2
CONNECTIONS = 50
GOAL = 0.6  # kiln's share of HAProxy's keep-alive throughput, issue #7
MODES = ("keep-alive", "new connection per request")
_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


@dataclass
class Target:
    name: str
    port: int
    pid: int | None  # the proxy's, for its CPU time; None for direct


@dataclass
class Run:
    rps: float
    requests: int
    p50_us: float
    p99_us: float
    errors: int
    cpu_us: float | None = None


def _duration_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(port: int, *, threads: int, connections: int, seconds: int, close: bool) -> Run:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    cmd.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, timeout=seconds + 30
    ).stdout

    def grab(pattern: str) -> str:
        m = re.search(pattern, out, re.MULTILINE)
        if m is None:
            raise RuntimeError(f"unexpected wrk output:\n{out}")
        return m.group(1)

    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non_2xx.group(1)) if non_2xx else 0
    return Run(
        rps=float(grab(r"Requests/sec:\s+([\d.]+)")),
        requests=int(grab(r"(\d+) requests in")),
        p50_us=_duration_us(grab(r"^\s+50%\s+(\S+)")),
        p99_us=_duration_us(grab(r"^\s+99%\s+(\S+)")),
        errors=errors,
    )


def haproxy_config(port: int, upstream: int) -> str:
    return f"""global
    maxconn 4000
    nbthread 1
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    option forwardfor
frontend kiln_bench
    bind 127.0.0.1:{port}
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend app
backend app
    http-reuse always
    http-response set-header X-Kiln-Release r1
    server i-1 127.0.0.1:{upstream}
"""


def _router_config(port: int, upstream: int) -> dict[str, object]:
    return {
        "generation": 1,
        "envs": {
            "bench": {
                "listen": f"127.0.0.1:{port}",
                "sticky": False,
                "pools": [
                    {
                        "release": "r1",
                        "weight": 100,
                        "instances": [{"id": "i-1", "addr": f"127.0.0.1:{upstream}"}],
                    }
                ],
            }
        },
    }


def _measure(targets: list[Target], close: bool, console: Console) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {t.name: [] for t in targets}
    for rnd in range(ROUNDS):
        order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
        for target in order:
            wrk(target.port, threads=THREADS, connections=CONNECTIONS, seconds=1, close=close)
            before = cpu_seconds(target.pid) if target.pid else 0.0
            run = wrk(
                target.port, threads=THREADS, connections=CONNECTIONS, seconds=SECONDS, close=close
            )
            if target.pid:
                run.cpu_us = (cpu_seconds(target.pid) - before) / run.requests * 1e6
            quiet = wrk(target.port, threads=1, connections=1, seconds=LATENCY_SECONDS, close=close)
            run.p50_us, run.p99_us = quiet.p50_us, quiet.p99_us
            run.errors += quiet.errors
            runs[target.name].append(run)
            cpu = f", {run.cpu_us:.1f} µs CPU/req" if run.cpu_us is not None else ""
            console.print(
                f"    round {rnd + 1} {target.name:15} {run.rps:9,.0f} req/s{cpu},"
                f" unloaded p50 {run.p50_us:.0f} µs p99 {run.p99_us:.0f} µs"
                + (f", {run.errors} errors" if run.errors else "")
            )
    return runs


def _median(runs: list[Run], attr: str) -> float:
    values: list[float | None] = [getattr(r, attr) for r in runs]
    return statistics.median(v for v in values if v is not None)


def _rows(mode: str, runs: dict[str, list[Run]], baseline: bool) -> list[Row]:
    rps = {name: _median(rs, "rps") for name, rs in runs.items()}
    p50 = {name: _median(rs, "p50_us") for name, rs in runs.items()}
    p99 = {name: _median(rs, "p99_us") for name, rs in runs.items()}
    cpu = {name: _median(rs, "cpu_us") for name, rs in runs.items() if name != "direct"}
    errors = {name: sum(r.errors for r in rs) for name, rs in runs.items()}
    ratios = [k.rps / h.rps for k, h in zip(runs["kiln"], runs["HAProxy"], strict=True)]
    per_round = (
        f"median of per-round ratios {statistics.median(ratios):.2f}"
        f" ({', '.join(f'{r:.2f}' for r in ratios)})"
    )
    failed = ", ".join(f"{n} {e} errors" for n, e in errors.items() if e)
    goal = f"; goal ≥ {GOAL}" if mode == MODES[0] else ""
    rows = [
        Row(
            f"router: requests/s, {mode}",
            rps["kiln"],
            "req/s",
            rps["HAProxy"],
            "HAProxy 2.6, 1 thread",
            f"direct {rps['direct']:,.0f} req/s; {per_round}{goal}"
            + (f"; {failed}" if failed else ""),
        ),
        Row(
            f"router: proxy CPU per request, {mode}",
            cpu["kiln"],
            "µs",
            cpu["HAProxy"],
            "HAProxy",
            "user+system, /proc",
        ),
        Row(
            f"router: added latency p50, {mode}",
            p50["kiln"] - p50["direct"],
            "µs",
            p50["HAProxy"] - p50["direct"],
            "HAProxy",
            f"unloaded; direct p50 {p50['direct']:.0f} µs",
        ),
        Row(
            f"router: added latency p99, {mode}",
            p99["kiln"] - p99["direct"],
            "µs",
            p99["HAProxy"] - p99["direct"],
            "HAProxy",
            f"unloaded; direct p99 {p99['direct']:.0f} µs",
        ),
    ]
    if baseline:
        rows.append(
            Row(
                f"router: requests/s, {mode}, this tree",
                rps["kiln"],
                "req/s",
                rps["kiln baseline"],
                "baseline tree",
                f"CPU/req {cpu['kiln']:.1f} vs {cpu['kiln baseline']:.1f} µs",
            )
        )
    return rows


def _start_router(
    procs: Processes, control: Path, port: int, upstream: int, src: str | None
) -> int:
    if src is None:
        proc = procs.adopt(spawn_router(control))
    else:
        # Another tree's router: the same command with that tree first on the path.
        proc = procs.start(
            [sys.executable, "-m", "kiln.router", "--control", str(control)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": src},
        )
        RouterClient(control).wait_healthy(10.0, pid=proc.pid)
    RouterClient(control).put_config(_router_config(port, upstream))
    wait_port(port)
    return proc.pid


def run(console: Console) -> list[Row]:
    for tool in ("wrk", "haproxy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"router benchmark: {tool} not found (make setup installs it)")
    baseline = os.environ.get("KILN_BENCH_ROUTER_BASELINE")
    tmp = workdir("router")
    console.print(f"  {load_average()} at start")
    try:
        with Processes() as procs:
            upstream = free_port()
            procs.start(
                [sys.executable, "-m", "benchmarks.upstream", str(upstream)],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
            )
            wait_port(upstream)
            kiln_port = free_port()
            targets = [
                Target("direct", upstream, None),
                Target(
                    "kiln",
                    kiln_port,
                    _start_router(procs, tmp / "router.sock", kiln_port, upstream, None),
                ),
            ]
            if baseline:
                base_port = free_port()
                base_pid = _start_router(
                    procs, tmp / "baseline.sock", base_port, upstream, baseline
                )
                targets.append(Target("kiln baseline", base_port, base_pid))
            haproxy_port = free_port()
            cfg = tmp / "haproxy.cfg"
            cfg.write_text(haproxy_config(haproxy_port, upstream))
            haproxy = procs.start(["haproxy", "-f", str(cfg)], stdout=subprocess.DEVNULL)
            wait_port(haproxy_port)
            targets.append(Target("HAProxy", haproxy_port, haproxy.pid))

            rows: list[Row] = []
            for mode in MODES:
                console.print(f"  {mode}: {ROUNDS} rounds of wrk -t{THREADS} -c{CONNECTIONS}")
                runs = _measure(targets, mode != MODES[0], console)
                rows += _rows(mode, runs, baseline is not None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    console.print(f"  {load_average()} at the end")
    return rows
