"""Dependencies: resolving them into a hash-pinned lock, and the layer that installs it.

Resolution and downloads happen here, at bake time, and nowhere else: the
dependencies layer holds the installed packages for the base's Python, so a
release or an instance start never touches a package index. ``uv`` (from
PyPI) does the resolving and installing; every requirement must carry
``--hash`` and only wheels are accepted, so what is installed is exactly what
was locked.
"""

from __future__ import annotations

import email.parser
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln import oci
from kiln.config import AppConfig
from kiln.errors import ConfigError, LockError, MissingTool
from kiln.home import cache_dir
from kiln.layercache import cached_layer
from kiln.store import ImageStore
from kiln.tarball import Entry, Layer, dir_entry, file_entry, tree_entries, write_layer

SITE_PACKAGES = "usr/local/lib/python{python}/dist-packages"
SCRIPTS = "usr/local/bin"
# Bookworm's glibc is 2.36, trixie's 2.41: wheels must not need newer.
_GLIBC = {"3.11": "2_36", "3.13": "2_41"}
_PIN_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)")
_HASH_RE = re.compile(r"--hash=sha256:[0-9a-f]{64}")
# How uv marks the lines that explain a failure (plain and fancy renderings).
_UV_PREFIX = re.compile("^(error:|cause:|\u00d7|\u2570\u2500\u25b6|\\|)\\s*")


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    hashes: tuple[str, ...]


@dataclass(frozen=True)
class Package:
    """An installed Python distribution, as the SBOM reports it."""

    name: str
    version: str
    license: str


def _uv() -> str:
    candidate = Path(sys.executable).parent / "uv"
    if candidate.is_file():
        return str(candidate)
    from shutil import which

    found = which("uv")
    if found is None:
        raise MissingTool("uv is not installed", hint="run 'make setup' (it installs uv from PyPI)")
    return found


def python_platform(python: str) -> str:
    machine = os.uname().machine
    return f"{machine}-manylinux_{_GLIBC[python]}"


def _uv_env() -> dict[str, str]:
    env = dict(os.environ)
    env["UV_CACHE_DIR"] = str(cache_dir() / "uv")
    env.pop("VIRTUAL_ENV", None)
    env["UV_NO_PROGRESS"] = "1"
    return env


def _uv_error(stderr: str) -> str:
    """uv's own words for what went wrong, on one line."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    said = [_UV_PREFIX.sub("", ln) for ln in lines if _UV_PREFIX.match(ln)]
    said = [ln for ln in said if ln]
    return "; ".join(said or lines[-3:])[:600] or "uv failed without saying why"


def requirements_source(config: AppConfig) -> Path:
    """The file the lock is resolved from: [build].requirements or the first found."""
    root = config.root
    if config.build.requirements:
        path = root / config.build.requirements
        if not path.is_file():
            raise ConfigError(
                f"{config.path}: build.requirements names {path}, which does not exist"
            )
        return path
    for name in ("requirements.in", "requirements.txt", "pyproject.toml"):
        if (root / name).is_file():
            return root / name
    raise ConfigError(
        f"no requirements.in, requirements.txt or pyproject.toml in {root}",
        hint="list the app's dependencies in one of them, or set build.requirements",
    )


def resolve_lock(config: AppConfig) -> tuple[Path, list[Pin]]:
    """``kiln lock``: resolve the app's requirements into a hash-pinned lock."""
    source = requirements_source(config)
    lock_path = config.root / config.build.lock
    if source.name == "pyproject.toml":
        try:
            project = tomllib.loads(source.read_text()).get("project", {})
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
        if not project.get("dependencies"):
            raise ConfigError(f"{source} has no [project].dependencies to lock")
    cmd = [
        _uv(),
        "pip",
        "compile",
        str(source),
        "--generate-hashes",
        "--quiet",
        "--no-header",
        "--python-version",
        config.build.python,
        "--python-platform",
        python_platform(config.build.python),
        "--output-file",
        str(lock_path),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=_uv_env(), cwd=config.root, check=False
    )
    if proc.returncode != 0:
        raise LockError(f"cannot resolve {source.name}: {_uv_error(proc.stderr)}")
    return lock_path, read_lock(lock_path)


def read_lock(path: Path) -> list[Pin]:
    """Parse and check a lock: every requirement pinned with == and hashed."""
    if not path.is_file():
        raise ConfigError(f"no lock file {path}", hint="run 'kiln lock' to write it")
    text = path.read_text(encoding="utf-8")
    # Join backslash continuations so each requirement is one logical line.
    logical = re.sub(r"\\\s*\n", " ", text)
    pins: list[Pin] = []
    for line in logical.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise LockError(
                f"{path}: option lines like {line.split()[0]!r} are not allowed in a lock"
            )
        m = _PIN_RE.match(line)
        if not m:
            raise LockError(
                f"{path}: requirement {line.split()[0]!r} is not pinned with ==",
                hint="run 'kiln lock' to write a hash-pinned lock",
            )
        hashes = tuple(h.removeprefix("--hash=") for h in _HASH_RE.findall(line))
        if not hashes:
            raise LockError(
                f"{path}: {m.group(1)}=={m.group(3)} has no --hash",
                hint="run 'kiln lock' to write a hash-pinned lock",
            )
        pins.append(Pin(m.group(1).lower(), m.group(3), hashes))
    return pins


def lock_digest(path: Path) -> str:
    return oci.sha256_digest(path.read_bytes())


def deps_layer(
    store: ImageStore, lock_path: Path, python: str, epoch: int
) -> tuple[Layer, list[Package], bool]:
    """The layer installing ``lock_path`` for ``python``; cached by the lock's content."""
    pins = read_lock(lock_path)
    key_doc = {
        "lock": lock_digest(lock_path),
        "python": python,
        "platform": python_platform(python),
        "epoch": epoch,
        "recipe": 1,
    }
    key = oci.sha256_digest(oci.canonical_json(key_doc)).removeprefix("sha256:")[:32]

    def build(staging: ImageStore) -> tuple[Layer, dict[str, Any]]:
        return _install(staging, lock_path, pins, python, epoch)

    layer, meta, cached = cached_layer("deps", key, store, build)
    packages = [Package(**p) for p in meta["packages"]]
    return layer, packages, cached


def _install(
    staging: ImageStore, lock_path: Path, pins: list[Pin], python: str, epoch: int
) -> tuple[Layer, dict[str, Any]]:
    target = staging.scratch() / "target"
    site = SITE_PACKAGES.format(python=python)
    if pins:
        cmd = [
            _uv(),
            "pip",
            "install",
            "--quiet",
            "--target",
            str(target),
            "--require-hashes",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--no-compile",
            "--python-version",
            python,
            "--python-platform",
            python_platform(python),
            "-r",
            str(lock_path),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_uv_env(), check=False)
        if proc.returncode != 0:
            raise LockError(f"cannot install {lock_path.name}: {_uv_error(proc.stderr)}")
    target.mkdir(exist_ok=True)
    entries: list[Entry] = [
        dir_entry("usr/local/lib"),
        dir_entry(f"usr/local/lib/python{python}"),
        dir_entry(site),
    ]
    scripts = target / "bin"
    entries += tree_entries(
        target,
        site,
        keep=lambda rel: rel != "bin" and not rel.startswith("bin/"),
        owner=(0, 0),
        normalize=True,
    )
    if scripts.is_dir():
        entries.append(dir_entry(SCRIPTS))
        for script in sorted(scripts.iterdir()):
            data = _fix_shebang(script.read_bytes())
            entries.append(file_entry(f"{SCRIPTS}/{script.name}", data, 0o755))
    layer = write_layer(staging, entries, epoch)
    packages = _packages(target)
    return layer, {"packages": [p.__dict__ for p in packages]}


def _fix_shebang(script: bytes) -> bytes:
    """uv writes the host interpreter into console scripts; the image's is /usr/bin/python3."""
    first, sep, rest = script.partition(b"\n")
    if first.startswith(b"#!") and b"python" in first:
        return b"#!/usr/bin/python3" + sep + rest
    return script


def _packages(target: Path) -> list[Package]:
    found = []
    parser = email.parser.BytesHeaderParser()
    for meta in sorted(target.glob("*.dist-info/METADATA")):
        headers = parser.parsebytes(meta.read_bytes())
        license_text = str(headers.get("License-Expression") or "")
        if not license_text:
            classifiers = [
                c.rsplit("::", 1)[-1].strip()
                for c in headers.get_all("Classifier") or []
                if c.startswith("License ::")
            ]
            license_text = " OR ".join(classifiers)
        if not license_text:
            raw = str(headers.get("License") or "").strip()
            license_text = raw.splitlines()[0] if raw else ""
        name = re.sub(r"[-_.]+", "-", str(headers["Name"])).lower()  # PEP 503 normal form
        found.append(Package(name, str(headers["Version"]), license_text))
    return found
