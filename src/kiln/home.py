"""Where kiln keeps things: ``KILN_HOME`` and the shared build cache.

``KILN_HOME`` (default ``~/.local/share/kiln``) holds the image store, the
state database and logs; two homes never share anything mutable. The build
cache (``KILN_CACHE_DIR``, default ``~/.cache/kiln``) only holds
content-addressed inputs (the Debian base layers, downloaded wheels), so many
homes may share it safely: every entry is written to a temporary name and
renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def from_env(cls) -> Home:
        raw = os.environ.get("KILN_HOME")
        root = Path(raw) if raw else Path.home() / ".local" / "share" / "kiln"
        return cls(root.expanduser().absolute())

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"

    @property
    def state_db(self) -> Path:
        return self.root / "state.db"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def debug_log(self) -> Path:
        return self.root / "debug.log"

    def ensure(self) -> None:
        for path in (self.root, self.images, self.logs, self.run):
            path.mkdir(parents=True, exist_ok=True)


def cache_dir() -> Path:
    raw = os.environ.get("KILN_CACHE_DIR")
    if raw:
        return Path(raw).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return (base / "kiln").absolute()
