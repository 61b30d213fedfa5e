"""What every benchmark reports: a figure, the reference measured beside it, their ratio."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KILN = Path(sys.executable).parent / "kiln"


@dataclass
class Row:
    name: str
    value: float
    unit: str
    reference: float | None = None
    reference_name: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.reference is None or self.reference == 0:
            return None
        return self.value / self.reference

    def cells(self) -> tuple[str, str, str, str, str]:
        ref = (
            f"{_figure(self.reference)} {self.unit} ({self.reference_name})"
            if self.reference is not None
            else "-"
        )
        ratio = f"{self.ratio:.2f}x" if self.ratio is not None else "-"
        return (self.name, f"{_figure(self.value)} {self.unit}", ref, ratio, self.note)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "reference": self.reference,
            "reference_name": self.reference_name,
            "ratio": self.ratio,
            "note": self.note,
        }


def _figure(value: float) -> str:
    """Three significant digits, without exponents for large figures (31,700 not 3.17e+04)."""
    rounded = float(f"{value:.3g}")
    return f"{rounded:,.0f}" if abs(rounded) >= 1000 else f"{value:.3g}"


def workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"kiln-bench-{prefix}-"))


def kiln(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(KILN), *args], capture_output=True, text=True, env={**os.environ, **env}, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"kiln {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def copy_app(dest: Path) -> Path:
    shutil.copytree(REPO / "examples" / "hello", dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"nothing listens on 127.0.0.1:{port} after {timeout:g}s"
                ) from None
            time.sleep(0.02)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def load_average() -> str:
    """The 1-minute load average and the CPU count, for notes: other work skews timings."""
    return f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


@dataclass
class Processes:
    """Processes a benchmark started; all stopped on exit, whatever happened."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def adopt(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def stop_all(self, timeout: float = 10.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


# -- apps, homes and the CLI, for the suites that release ----------------------


def make_app(
    dest: Path, port: int, *, greeting: str = "Hello", edits: dict[str, str] | None = None
) -> Path:
    """A copy of examples/hello whose staging listens on ``port`` (production elsewhere).

    ``edits`` replace text in its kiln.toml; each must be found.
    """
    app = copy_app(dest)
    module = app / "hello" / "__init__.py"
    module.write_text(module.read_text().replace('"Hello"', f'"{greeting}"'))
    cfg = app / "kiln.toml"
    text = cfg.read_text()
    text = text.replace('listen = "127.0.0.1:8081"', f'listen = "127.0.0.1:{port}"')
    text = text.replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{free_port()}"')
    for old, new in (edits or {}).items():
        if old not in text:
            raise RuntimeError(f"{cfg}: {old!r} not found; examples/hello/kiln.toml changed?")
        text = text.replace(old, new)
    cfg.write_text(text)
    return app


def kiln_json(env: dict[str, str], *args: str, timeout: float = 600) -> Any:
    """Run ``kiln ARGS --json`` in the home ``env`` names; its JSON, or SystemExit."""
    proc = subprocess.run(
        [str(KILN), *args, "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"kiln {' '.join(args)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def stop_home(env: dict[str, str]) -> None:
    """Stop the daemon, every instance and the router of a home, even if its daemon died."""
    run = {**os.environ, **env}
    for args in (("daemon", "start"), ("daemon", "stop", "--all")):
        with contextlib.suppress(subprocess.SubprocessError):
            subprocess.run(
                [str(KILN), *args], capture_output=True, env=run, timeout=120, check=False
            )
    from kiln.runtime.local import LocalRuntime

    runtime = LocalRuntime()
    for stray in runtime.find(Path(env["KILN_HOME"]) / "rootfs"):
        runtime.stop(stray, 1.0)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def pss_mb(pid: int) -> float:
    """Proportional set size: resident memory with shared pages split among their users."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class Hit:
    start: float
    status: int  # 0: no response at all
    error: str = ""


@dataclass
class Load:
    """Keep-alive clients requesting a URL until stopped; every response recorded.

    Bounded whatever happens: each client stops after ``limit`` seconds.
    """

    port: int
    clients: int = 4
    limit: float = 900.0
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
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            start = time.monotonic()
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                body = resp.read()
                hit = Hit(start, resp.status)
                if resp.status != 200:
                    hit.error = body[:200].decode("utf-8", "replace")
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException) as exc:
                hit = Hit(start, 0, f"{type(exc).__name__}: {exc}")
                conn.close()
            with self._lock:
                self.hits.append(hit)
        conn.close()

    def count(self) -> int:
        with self._lock:
            return len(self.hits)

    def window(self, start: int, end: int | None = None) -> list[Hit]:
        """Hits ``start:end`` by index (take ``count()`` before and after a phase)."""
        with self._lock:
            return self.hits[start:end]

    def wait_for(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        start = self.count()
        while self.count() - start < n and time.monotonic() < deadline:
            time.sleep(0.02)
