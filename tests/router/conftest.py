"""Fixtures for router tests: real router processes, real upstream servers."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from routerkit import Routers, UpstreamServer


@pytest.fixture
def upstreams() -> Iterator[Callable[[str], UpstreamServer]]:
    started: list[UpstreamServer] = []

    def start(name: str) -> UpstreamServer:
        server = UpstreamServer(name)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short, because unix socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="kr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def routers(workdir: Path) -> Iterator[Routers]:
    manager = Routers(workdir)
    yield manager
    manager.cleanup()
