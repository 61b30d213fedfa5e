"""The base layer: Debian + Python, built from Debian packages by mmdebstrap.

A base is cached (in the shared build cache) under a key made of its inputs:
suite, variant, package list and the trimming recipe. mmdebstrap writes a
tarball; kiln re-writes it as a deterministic layer, dropping documentation,
man pages, locales, caches and device nodes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kiln import oci
from kiln.errors import BakeError, MissingTool
from kiln.layercache import cached_layer
from kiln.store import ImageStore
from kiln.tarball import Entry, Layer, write_layer

# Bump when the recipe below changes what a base contains.
RECIPE_VERSION = 1
_SUITES = {"debian:bookworm": "bookworm", "debian:trixie": "trixie"}
_PACKAGES = ("python3", "ca-certificates", "tzdata")
_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
)
# Directories whose contents are runtime state, never part of an image.
_EMPTIED = (
    "dev",
    "proc",
    "sys",
    "run",
    "tmp",
    "var/tmp",
    "var/log",
    "var/cache/apt",
    "var/lib/apt/lists",
)
_DROPPED = ("var/cache/ldconfig/aux-cache",)


@dataclass(frozen=True)
class BaseSpec:
    name: str  # e.g. debian:bookworm
    packages: tuple[str, ...] = ()

    @property
    def suite(self) -> str:
        return _SUITES[self.name]

    @property
    def include(self) -> tuple[str, ...]:
        return tuple(sorted(set(_PACKAGES) | set(self.packages)))

    def key(self) -> str:
        recipe = {
            "recipe": RECIPE_VERSION,
            "suite": self.suite,
            "variant": "essential",
            "include": self.include,
            "dpkg": _DPKG_EXCLUDES,
            "emptied": _EMPTIED,
            "arch": os.uname().machine,
        }
        return oci.sha256_digest(oci.canonical_json(recipe)).removeprefix("sha256:")[:32]


@dataclass(frozen=True)
class Base:
    spec: BaseSpec
    layer: Layer
    epoch: int
    packages: tuple[tuple[str, str], ...]  # (name, version) from dpkg's status
    passwd: str  # the base's /etc/passwd and /etc/group, which the app layer extends
    group: str
    cached: bool

    @property
    def digest(self) -> str:
        """The base's identity: the digest of its one layer."""
        return self.layer.digest


Progress = Callable[[str], None]


def _require_mmdebstrap() -> str:
    path = shutil.which("mmdebstrap")
    if path is None:
        raise MissingTool(
            "mmdebstrap is not installed; kiln builds its Debian base with it",
            hint="sudo apt-get install mmdebstrap, or run 'make setup'",
        )
    return path


def ensure_base(spec: BaseSpec, store: ImageStore, progress: Progress = lambda _: None) -> Base:
    """The base for ``spec`` stored in ``store``, built once per machine and cache."""

    def build(staging: ImageStore) -> tuple[Layer, dict[str, Any]]:
        progress(f"building the {spec.name} base with mmdebstrap (once per machine)")
        return _build(spec, staging)

    layer, meta, cached = cached_layer("base", spec.key(), store, build)
    return Base(
        spec=spec,
        layer=layer,
        epoch=meta["epoch"],
        packages=tuple((p, v) for p, v in meta["packages"]),
        passwd=meta["passwd"],
        group=meta["group"],
        cached=cached,
    )


def _build(spec: BaseSpec, staging: ImageStore) -> tuple[Layer, dict[str, Any]]:
    mmdebstrap = _require_mmdebstrap()
    work = staging.scratch()
    # The base's epoch is the day it was first built: every package file is
    # older, so compiled .pyc files keep matching their sources.
    epoch = int(os.environ.get("KILN_BASE_EPOCH") or (int(time.time()) // 86400 * 86400))
    raw = work / "mmdebstrap.tar"
    cmd = [
        mmdebstrap,
        "--quiet",
        "--variant=essential",
        f"--include={','.join(spec.include)}",
        *(f"--dpkgopt={opt}" for opt in _DPKG_EXCLUDES),
        spec.suite,
        str(raw),
    ]
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(epoch))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    except OSError as exc:
        raise MissingTool(f"cannot run mmdebstrap: {exc}", hint="run 'make setup'") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        hint = None
        if os.geteuid() != 0:
            hint = "mmdebstrap needs root, or user namespaces with /etc/subuid entries for you"
        raise BakeError(f"mmdebstrap failed: {' / '.join(tail)}", hint=hint)
    layer, extra = _relayer(raw, staging, epoch)
    raw.unlink()
    meta = {"name": spec.name, "include": spec.include, "epoch": epoch, **extra}
    return layer, meta


def _trimmed(name: str) -> bool:
    if name in _DROPPED:
        return True
    return any(name.startswith(d + "/") for d in _EMPTIED)


def _relayer(raw: Path, store: ImageStore, epoch: int) -> tuple[Layer, dict[str, Any]]:
    keep_text = {"var/lib/dpkg/status": b"", "etc/passwd": b"", "etc/group": b""}
    with tarfile.open(raw, mode="r:") as tar:
        entries: list[Entry] = []
        for info in tar.getmembers():
            name = info.name.removeprefix("./").rstrip("/")
            if not name or name == "." or _trimmed(name):
                continue
            if name in keep_text and info.isreg():
                fh = tar.extractfile(info)
                keep_text[name] = fh.read() if fh else b""
            if info.isdev() or info.isfifo():
                continue

            def opener(member: tarfile.TarInfo = info) -> IO[bytes]:
                fh = tar.extractfile(member)
                assert fh is not None
                return fh

            entries.append(
                Entry(
                    name=name,
                    kind=info.type,
                    mode=info.mode,
                    uid=info.uid,
                    gid=info.gid,
                    source=opener if info.isreg() else None,
                    linkname=info.linkname.removeprefix("./") if info.islnk() else info.linkname,
                    mtime=int(info.mtime),
                    size=info.size,
                )
            )
        layer = write_layer(store, entries, epoch, clamp=True)
    text = {k: v.decode("utf-8", "replace") for k, v in keep_text.items()}
    extra = {
        "packages": _dpkg_packages(text["var/lib/dpkg/status"]),
        "passwd": text["etc/passwd"],
        "group": text["etc/group"],
    }
    return layer, extra


def _dpkg_packages(status: str) -> list[tuple[str, str]]:
    packages = []
    for stanza in status.split("\n\n"):
        fields = dict(
            line.split(": ", 1)
            for line in stanza.splitlines()
            if ": " in line and not line[0].isspace()
        )
        if "Package" in fields and fields.get("Status", "").endswith(" installed"):
            packages.append((fields["Package"], fields.get("Version", "")))
    return sorted(packages)
