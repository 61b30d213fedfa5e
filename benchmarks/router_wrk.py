"""Throughput of the kiln router against a direct connection and HAProxy, with wrk.

    python benchmarks/router_wrk.py [--duration 5] [--connections 50] [--threads 2]

Starts a small uvloop+httptools upstream (one process), a kiln router and an
HAProxy (single-threaded, like the router) in front of it, runs the same wrk
command against each and prints requests per second, and the proxy's CPU
time per request (user + system, from /proc). On a small machine wrk, the
upstream and the proxy compete for CPUs, so the CPU cost per request is the
steadier comparison. Needs ``wrk`` and ``haproxy`` on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, world!"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_upstream(port: int) -> None:
    """A minimal keep-alive HTTP server, fast enough not to be the bottleneck."""
    import httptools
    import uvloop

    class Hello(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.close()

        def on_message_complete(self) -> None:
            self.transport.write(_RESPONSE)  # type: ignore[attr-defined]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Hello, "127.0.0.1", port, backlog=4096)
        await server.serve_forever()

    uvloop.run(main())


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wrk(port: int, threads: int, connections: int, duration: int) -> tuple[float, int, str]:
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        f"http://127.0.0.1:{port}/",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+(\S+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    note = (p99.group(1) if p99 else "?") + (f"  {errors.group(0)}" if errors else "")
    return rps, total, note


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        serve_upstream(args.upstream)
        return 0
    for tool in ("wrk", "haproxy"):
        if shutil.which(tool) is None:
            print(f"{tool} not found", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="kr-bench-", dir="/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up_port, router_port, haproxy_port = _free_port(), _free_port(), _free_port()
        procs.append(subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port)]))
        _wait_port(up_port)

        from kiln.router.client import spawn_router

        control = work / "router.sock"
        router = spawn_router(control, work / "router.json")
        procs.append(router)
        from kiln.router.client import RouterClient

        RouterClient(control).put_config(
            {
                "generation": 1,
                "envs": {
                    "bench": {
                        "listen": f"127.0.0.1:{router_port}",
                        "pools": [
                            {
                                "release": "r1",
                                "weight": 100,
                                "instances": [{"id": "i-1", "addr": f"127.0.0.1:{up_port}"}],
                            }
                        ],
                    }
                },
            }
        )

        cfg = work / "haproxy.cfg"
        cfg.write_text(
            f"""global
    maxconn 4000
    nbthread 1
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend f
    bind 127.0.0.1:{haproxy_port}
    default_backend b
backend b
    http-reuse always
    server s1 127.0.0.1:{up_port}
"""
        )
        haproxy = subprocess.Popen(["haproxy", "-f", str(cfg)])
        procs.append(haproxy)
        _wait_port(router_port)
        _wait_port(haproxy_port)

        results = {}
        cpu_per_request = {}
        targets = (
            ("direct", up_port, None),
            ("kiln", router_port, router.pid),
            ("haproxy", haproxy_port, haproxy.pid),
        )
        for name, port, pid in targets:
            _wrk(port, args.threads, args.connections, 1)  # warm up
            before = _cpu_seconds(pid) if pid else 0.0
            results[name] = _wrk(port, args.threads, args.connections, args.duration)
            if pid:
                cpu_per_request[name] = (_cpu_seconds(pid) - before) / results[name][1] * 1e6
        cmd = f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s"
        print(f"{cmd}, {os.cpu_count()} CPUs")
        for name, (rps, _, note) in results.items():
            cpu = f"{cpu_per_request[name]:5.1f} us CPU/request" if name in cpu_per_request else ""
            print(f"  {name:8} {rps:10.0f} req/s  {cpu:24} p99 {note}")
        print(f"  kiln/haproxy throughput = {results['kiln'][0] / results['haproxy'][0]:.2f}")
        efficiency = cpu_per_request["haproxy"] / cpu_per_request["kiln"]
        print(f"  kiln/haproxy CPU efficiency = {efficiency:.2f}")
        print(json.dumps({k: v[0] for k, v in results.items()}))
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
