"""The runtime interface: start, check and stop sealed instances of an image."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True)
class InstanceSpec:
    """Everything a runtime needs to start one instance; nothing is read from elsewhere."""

    id: str
    image: str
    rootfs: Path
    command: tuple[str, ...]
    env: Mapping[str, str]
    workdir: str
    uid: int
    gid: int
    port: int
    log_path: Path
    volumes: Mapping[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class InstanceHandle:
    """How a runtime finds an instance again, even from a restarted daemon."""

    id: str
    pid: int
    started: int


class Runtime(ABC):
    name: ClassVar[str]

    @abstractmethod
    def check(self) -> None:
        """Raise MissingTool when this runtime cannot work on this machine."""

    @abstractmethod
    def start(self, spec: InstanceSpec) -> InstanceHandle:
        """Start the instance; returns once the process exists (not when it is ready)."""

    @abstractmethod
    def alive(self, handle: InstanceHandle) -> bool: ...

    @abstractmethod
    def stop(self, handle: InstanceHandle, grace: float) -> bool:
        """Ask the app to exit (SIGTERM), wait up to ``grace`` seconds, then kill it.
        True when the app exited by itself within the grace period."""

    @abstractmethod
    def app_pids(self, handle: InstanceHandle) -> list[int]:
        """Host pids of the app's top processes, to inspect them."""

    @abstractmethod
    def find(self, marker: Path) -> list[InstanceHandle]:
        """Every instance running from rootfs under ``marker`` (one KILN_HOME's),
        known or not: how a restarted daemon finds strays."""
