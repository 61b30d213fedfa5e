"""Scale: release time and memory for 1, 10, 50 and 100 instances of a small app.

The app is examples/hello with its command swapped for a stdlib one-liner
(``http.server`` answering 200 to anything on ``$PORT``): a gunicorn app
would measure gunicorn. For each count N a fresh ``KILN_HOME`` gets the
app baked with ``replicas = N`` in ``[env.staging]`` (the build cache is
shared, so only the first bake is slow) and a blue-green release of it;
then, with all N instances ready and in the router's pool:

- release time: ``kiln release`` wall time, CLI start to end (the image's
  root filesystem is unpacked beforehand, as a host's first release of an
  image does once, and timed apart);
- daemon and router memory: VmRSS from /proc of the daemon
  (``run/daemon.pid``) and the router (its ``/health`` pid);
- instance memory: VmRSS summed over each instance's processes (bubblewrap,
  the sandbox's init, the app), and the same as PSS, which splits the pages
  the instances share.

Each figure's reference is the same figure for one instance, so the ratio
shows how the cost grows. Everything is stopped (``kiln daemon stop --all``)
before the next count.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from rich.console import Console

from benchmarks.common import (
    Row,
    descendants,
    free_port,
    kiln_json,
    load_average,
    make_app,
    pss_mb,
    rss_mb,
    stop_home,
    workdir,
)
from kiln.rootfs import ensure_rootfs
from kiln.router.client import RouterClient
from kiln.store import ImageStore

COUNTS = (1, 10, 50, 100)
# A 200 for any GET, on $PORT, stdlib only.
SERVER = (
    "import http.server as s,os;"
    "H=type('H',(s.BaseHTTPRequestHandler,),{"
    "'do_GET':lambda r:(r.send_response(200),r.send_header('Content-Length','0'),r.end_headers()),"
    "'log_message':lambda *a:None});"
    "s.HTTPServer(('',int(os.environ['PORT'])),H).serve_forever()"
)


def _app(dest: Path, replicas: int) -> Path:
    app = make_app(
        dest,
        free_port(),
        edits={
            'timeout = "30s"': 'timeout = "120s"',
            "[env.staging]\n": f"[env.staging]\nreplicas = {replicas}\n",
        },
    )
    cfg = app / "kiln.toml"
    text, n = re.subn(
        r"^command = \[.*\]$",
        f'command = ["python3", "-c", "{SERVER}"]',
        cfg.read_text(),
        count=1,
        flags=re.M,
    )
    if n != 1:
        raise RuntimeError(f"{cfg}: no command line to replace")
    cfg.write_text(text)
    return app


def _measure(tmp: Path, count: int, console: Console) -> dict[str, float]:
    home = tmp / f"home-{count}"
    env = {"KILN_HOME": str(home)}
    try:
        digest = kiln_json(env, "bake", str(_app(tmp / f"app-{count}", count)))["digest"]
        # A first release on a host also unpacks the image once (the same
        # for any count): done beforehand, timed apart.
        start = time.monotonic()
        ensure_rootfs(ImageStore(home / "images"), home / "rootfs", digest)
        unpack = time.monotonic() - start
        start = time.monotonic()
        view = kiln_json(env, "release", digest, "--env", "staging", timeout=900)
        wall = time.monotonic() - start
        if view["state"] != "serving":
            raise SystemExit(f"scale: the release of {count} instances ended {view['state']}")
        router = RouterClient(home / "run" / "router.sock")
        pools = router.get_config()["envs"]["staging"]["pools"]
        in_pool = sum(len(p["instances"]) for p in pools)
        instances = [
            i for i in kiln_json(env, "ps")["instances"] if i["env"] == "staging" and i["pid"]
        ]
        if in_pool != count or len(instances) != count:
            raise SystemExit(f"scale: {count} wanted, {len(instances)} up, {in_pool} in the pool")
        daemon_pid = int((home / "run" / "daemon.pid").read_text().split()[0])
        pids = [p for i in instances for p in descendants(int(i["pid"]))]
        figures = {
            "release": wall,
            "unpack": unpack,
            "app_start": max(i["ready_at"] - i["created"] for i in instances),
            "daemon": rss_mb(daemon_pid),
            "router": rss_mb(int(router.health()["pid"])),
            "instances": sum(rss_mb(p) for p in pids),
            "instances_pss": sum(pss_mb(p) for p in pids),
            "processes": len(pids),
        }
    finally:
        start = time.monotonic()
        stop_home(env)
        stopped = time.monotonic() - start
        shutil.rmtree(home, ignore_errors=True)
    figures["stop"] = stopped
    console.print(
        f"    {count:3} instances: release {figures['release']:.1f}s,"
        f" daemon {figures['daemon']:.0f} MB, router {figures['router']:.0f} MB,"
        f" instances {figures['instances']:.0f} MB RSS / {figures['instances_pss']:.0f} MB PSS"
        f" ({figures['processes']:.0f} processes); stop --all {stopped:.1f}s"
    )
    return figures


def run(console: Console) -> list[Row]:
    tmp = workdir("scale")
    console.print(f"  {load_average()}")
    try:
        results = {n: _measure(tmp, n, console) for n in COUNTS}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    one = results[COUNTS[0]]
    rows: list[Row] = []
    for n, fig in results.items():
        rows += _rows(n, fig, None if n == COUNTS[0] else one)
    return rows


def _rows(n: int, fig: dict[str, float], one: dict[str, float] | None) -> list[Row]:
    label = "1 instance" if n == 1 else f"{n} instances"

    def row(name: str, key: str, unit: str, note: str = "") -> Row:
        return Row(
            f"scale: {name}, {label}",
            fig[key],
            unit,
            one[key] if one else None,
            "1 instance" if one else "",
            note,
        )

    return [
        row(
            "release time",
            "release",
            "s",
            f"CLI start to end; slowest app start {fig['app_start']:.1f}s;"
            f" stop --all {fig['stop']:.1f}s; image unpacked beforehand in {fig['unpack']:.1f}s",
        ),
        row("daemon RSS", "daemon", "MB"),
        row("router RSS", "router", "MB"),
        row(
            "instances RSS, summed",
            "instances",
            "MB",
            f"{fig['instances'] / n:.1f} MB each; PSS {fig['instances_pss']:.0f} MB in all",
        ),
    ]
