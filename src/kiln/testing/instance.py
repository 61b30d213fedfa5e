"""The ephemeral instance ``kiln test`` boots: sealed like a released one, and gone after.

It runs on the same runtime as releases, from the same unpacked rootfs, with
``KILN_ENV=test``. Its log lives in a temporary folder; both the process and
the folder are removed when the tests end, pass or fail, and also when
``kiln test`` is interrupted. An instance left by a ``kiln test`` that was
killed outright is recognised (its id names the owning process) and removed
by the next one.
"""

from __future__ import annotations

import http.client
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kiln import procs
from kiln.config import AppConfig
from kiln.home import Home
from kiln.logs.files import tail_lines
from kiln.rootfs import ensure_rootfs
from kiln.runtime import InstanceHandle, InstanceSpec, Runtime
from kiln.store import ImageRecord, ImageStore

PREFIX = "test-"


@dataclass
class LiveInstance:
    id: str
    port: int
    handle: InstanceHandle
    rootfs: Path
    log_path: Path
    uid: int
    gid: int
    runtime: Runtime

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app_pids(self) -> list[int]:
        return self.runtime.app_pids(self.handle)

    def log_tail(self, lines: int = 10) -> list[str]:
        return tail_lines(self.log_path, lines)

    def exec(self, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the instance (its mounts, PIDs, hostname) as its user."""
        pids = self.app_pids()
        if not pids:
            raise RuntimeError("the instance is not running")
        return subprocess.run(
            nsenter_argv(pids[0], self.uid, self.gid, command),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def nsenter_argv(pid: int, uid: int, gid: int, command: str) -> list[str]:
    return [
        "nsenter",
        f"--target={pid}",
        "--mount",
        "--pid",
        "--uts",
        "--ipc",
        "--root",  # the instance's own root filesystem, not the host's
        "--wd",
        f"--setuid={uid}",
        f"--setgid={gid}",
        "/bin/sh",
        "-c",
        command,
    ]


def reap_strays(runtime: Runtime, home: Home) -> None:
    """Stop test instances whose ``kiln test`` process died without cleaning up."""
    for handle in runtime.find(home.rootfs):
        if not handle.id.startswith(PREFIX):
            continue
        owner = handle.id.removeprefix(PREFIX).split("-", 1)[0]
        if owner.isdigit() and procs.start_time(int(owner)) is None:
            runtime.stop(handle, 1.0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def ephemeral_instance(
    home: Home, store: ImageStore, record: ImageRecord, config: AppConfig, runtime: Runtime
) -> Iterator[LiveInstance]:
    runtime.check()
    reap_strays(runtime, home)
    rootfs = ensure_rootfs(store, home.rootfs, record.digest)
    image_config = store.image_config(record.digest)["config"]
    env = dict(e.split("=", 1) for e in image_config.get("Env", []) if "=" in e)
    if "test" in config.envs:
        env.update(config.envs["test"].vars)
    instance_id = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    port = _free_port()
    env.update(
        {
            "PORT": str(port),
            "KILN_APP": record.app,
            "KILN_ENV": "test",
            "KILN_RELEASE": "test",
            "KILN_IMAGE": record.digest,
            "KILN_INSTANCE": instance_id,
        }
    )
    uid, _, gid = str(image_config.get("User", "1000:1000")).partition(":")
    scratch = Path(tempfile.mkdtemp(prefix="kiln-test-"))
    log_path = scratch / "instance.log"
    handle = runtime.start(
        InstanceSpec(
            id=instance_id,
            image=record.digest,
            rootfs=rootfs,
            command=tuple(image_config.get("Cmd", [])),
            env=env,
            workdir=image_config.get("WorkingDir", "/"),
            uid=int(uid or 1000),
            gid=int(gid or uid or 1000),
            port=port,
            log_path=log_path,
        )
    )
    live = LiveInstance(
        instance_id,
        port,
        handle,
        rootfs,
        log_path,
        int(uid or 1000),
        int(gid or uid or 1000),
        runtime,
    )
    try:
        yield live
    finally:
        runtime.stop(handle, 2.0)
        shutil.rmtree(scratch, ignore_errors=True)


def wait_ready(live: LiveInstance, path: str, timeout: float) -> tuple[bool, str, float]:
    """Poll the health path until 2xx; returns (ready, last answer, seconds)."""
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < timeout:
        if not live.runtime.alive(live.handle):
            return False, "the instance exited", time.monotonic() - start
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=2)
        try:
            conn.request("GET", path)
            status = conn.getresponse().status
            last = f"answered {status}"
            if 200 <= status < 300:
                return True, last, time.monotonic() - start
        except (OSError, http.client.HTTPException) as exc:
            last = f"no answer ({type(exc).__name__})"
        finally:
            conn.close()
        time.sleep(0.1)
    return False, last, time.monotonic() - start
