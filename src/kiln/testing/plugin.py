"""The pytest plugin ``kiln test`` loads into an app's integration suite.

Fixtures:
- ``base_url``: the live instance's URL, e.g. ``http://127.0.0.1:41234``.
- ``host``: a pytest-testinfra host whose commands run inside the instance
  (its mounts, PIDs and hostname, as its user), with the image's own tools.
- ``instance``: what a minimal image cannot tell about itself: its Python
  packages, listening sockets and processes, read from the host side.
"""

from __future__ import annotations

import email.parser
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import testinfra.host
from testinfra.backend import base

from kiln.testing.instance import nsenter_argv


class KilnBackend(base.BaseBackend):
    """testinfra backend: a command runs in the instance's namespaces via nsenter."""

    NAME = "kiln"

    def __init__(self, pid: int, uid: int, gid: int, **kwargs: Any) -> None:
        self.pid, self.uid, self.gid = pid, uid, gid
        super().__init__(f"kiln-instance-{pid}", **kwargs)

    def run(self, command: str, *args: str, **kwargs: Any) -> base.CommandResult:
        cmd = self.get_command(command, *args)
        argv = nsenter_argv(self.pid, self.uid, self.gid, cmd)
        out = self.run_local(shlex.join(argv))
        out.command = self.encode(cmd)
        return out


class Instance:
    def __init__(self, pid: int, rootfs: Path) -> None:
        self.pid = pid
        self.rootfs = rootfs

    def python_packages(self) -> dict[str, str]:
        """Installed distributions (PEP 503 names) → versions, from their metadata."""
        found: dict[str, str] = {}
        parser = email.parser.BytesHeaderParser()
        for meta in self.rootfs.glob("usr/local/lib/python3*/dist-packages/*.dist-info/METADATA"):
            headers = parser.parsebytes(meta.read_bytes())
            found[re.sub(r"[-_.]+", "-", str(headers["Name"])).lower()] = str(headers["Version"])
        return found

    def processes(self) -> list[dict[str, Any]]:
        """The app's processes (its PID namespace, less the sandbox's init): pid, uid, argv."""
        target = os.readlink(f"/proc/{self.pid}/ns/pid")
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns/pid") != target:
                    continue
                status = dict(
                    line.split(":", 1)
                    for line in (entry / "status").read_text().splitlines()
                    if ":" in line
                )
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"bwrap"):
                continue  # the sandbox's own init, not the app
            out.append(
                {
                    "pid": int(entry.name),
                    "uid": int(status["Uid"].split()[0]),
                    "cmdline": [a.decode(errors="replace") for a in argv if a],
                }
            )
        return out

    def listening(self) -> list[int]:
        """TCP ports the instance's processes listen on."""
        inodes = set()
        for proc in self.processes():
            fd_dir = Path(f"/proc/{proc['pid']}/fd")
            try:
                for fd in fd_dir.iterdir():
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
            except OSError:
                continue
        ports = set()
        for table in ("tcp", "tcp6"):
            try:
                lines = Path(f"/proc/{self.pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        return sorted(ports)


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise pytest.UsageError(f"{name} is not set: run this suite with 'kiln test'")
    return value


@pytest.fixture(scope="session")
def base_url() -> str:
    return _env("KILN_TEST_BASE_URL")


@pytest.fixture(scope="session")
def host() -> testinfra.host.Host:
    backend = KilnBackend(
        int(_env("KILN_TEST_PID")), int(_env("KILN_TEST_UID")), int(_env("KILN_TEST_GID"))
    )
    return testinfra.host.Host(backend)


@pytest.fixture(scope="session")
def instance() -> Instance:
    return Instance(int(_env("KILN_TEST_PID")), Path(_env("KILN_TEST_ROOTFS")))
