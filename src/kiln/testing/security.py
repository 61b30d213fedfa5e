"""The security suite, built in. Every finding names the file (and line) and why.

Static checks read the image itself: its layers' tar entries (modes, owners
and setuid bits as shipped) and its unpacked files (secrets). Runtime checks
look at the live instance: who the app runs as, and whether it can write to
its root filesystem.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from kiln.config import AppConfig
from kiln.deps import read_lock
from kiln.errors import ConfigError, KilnError
from kiln.images import python_packages, sbom
from kiln.store import ImageRecord, ImageStore
from kiln.tarball import Member, list_layer
from kiln.testing.instance import LiveInstance
from kiln.testing.results import SKIPPED, Check, SuiteResult

# Unmistakable credentials: flagged anywhere in the image.
STRONG = (
    (
        "private key",
        re.compile(rb"-----BEGIN ((RSA|DSA|EC|OPENSSH|ENCRYPTED|PGP) )?PRIVATE KEY( BLOCK)?-----"),
    ),
    ("AWS access key id", re.compile(rb"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("GitHub token", re.compile(rb"\bgh[pousr]_[A-Za-z0-9]{36,}\b")),
    ("Slack token", re.compile(rb"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
    ("Google API key", re.compile(rb"\bAIza[0-9A-Za-z_\-]{35}\b")),
    ("Stripe live key", re.compile(rb"\b[sr]k_live_[0-9a-zA-Z]{24,}")),
)
# "secret = <value>": flagged in the app's and its dependencies' files when the
# value looks random enough to be a real credential rather than a word.
ASSIGNED = re.compile(
    rb"(?i)\b(aws_secret_access_key|secret[_-]?key|api[_-]?key|access[_-]?token|auth[_-]?token|"
    rb"client[_-]?secret|password|passwd)\b[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+_\-=.]{16,})"
)
ENTROPY_MIN = 3.5  # bits per character
# Documentation examples that look like keys but are published as fakes.
KNOWN_FAKES = (b"AKIAIOSFODNN7EXAMPLE", b"EXAMPLE")
MAX_SCAN = 5 * 1024 * 1024
# What Debian's essential set ships setuid/setgid; anything else is a finding.
BASE_SETUID = {
    "/usr/bin/su",
    "/usr/bin/mount",
    "/usr/bin/umount",
    "/usr/bin/passwd",
    "/usr/bin/chfn",
    "/usr/bin/chsh",
    "/usr/bin/gpasswd",
    "/usr/bin/newgrp",
    "/usr/bin/chage",
    "/usr/bin/expiry",
    "/usr/sbin/unix_chkpwd",
    "/usr/lib/dbus-1.0/dbus-daemon-launch-helper",
}
SSH_PATHS = ("/usr/sbin/sshd", "/etc/ssh/sshd_config", "/usr/sbin/dropbear")


def entropy(value: bytes) -> float:
    counts = Counter(value)
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _line(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _allowed(path: str, allow: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(path, pattern) for pattern in allow)


def scan_secrets(rootfs: Path, paths: dict[str, bool], allow: tuple[str, ...]) -> list[str]:
    """``paths`` maps an image path to whether the full scan applies (app and deps)."""
    findings: list[str] = []
    for path, full in sorted(paths.items()):
        if _allowed(path, allow):
            continue
        file = rootfs / path.lstrip("/")
        try:
            if file.is_symlink() or not file.is_file() or file.stat().st_size > MAX_SCAN:
                continue
            data = file.read_bytes()
        except OSError:
            continue
        for what, pattern in STRONG:
            for m in pattern.finditer(data):
                if any(fake in m.group(0) for fake in KNOWN_FAKES):
                    continue
                findings.append(
                    f"{path}:{_line(data, m.start())}: {what} ({m.group(0)[:40].decode(errors='replace')}…)"
                )
                break
        if not full:
            continue
        if path.rsplit("/", 1)[-1] == ".env" or path.endswith(".env"):
            findings.append(
                f"{path}:1: a .env file: secrets belong in the environment's secrets file, not the image"
            )
        for m in ASSIGNED.finditer(data):
            value = m.group(2)
            if entropy(value) >= ENTROPY_MIN and not any(fake in value for fake in KNOWN_FAKES):
                name = m.group(1).decode(errors="replace")
                findings.append(
                    f"{path}:{_line(data, m.start())}: {name} assigned a random-looking value "
                    f"({entropy(value):.1f} bits/char)"
                )
    return findings


def _layer_members(store: ImageStore, record: ImageRecord) -> list[dict[str, Member]]:
    return [list_layer(store, layer.digest) for layer in store.layers(record.digest)]


def load_advisories(location: Path) -> list[dict[str, Any]]:
    """OSV records from a JSON file (one record or a list) or a folder of them."""
    files = sorted(location.glob("**/*.json")) if location.is_dir() else [location]
    if not files or not location.exists():
        raise ConfigError(f"advisory database {location} does not exist or holds no .json files")
    records: list[dict[str, Any]] = []
    for file in files:
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"advisory file {file} is not valid JSON: {exc}") from exc
        records += data if isinstance(data, list) else [data]
    return records


def _affected(record: dict[str, Any], name: str, version: str) -> bool:
    for affected in record.get("affected", []):
        pkg = affected.get("package", {})
        if (
            pkg.get("ecosystem") != "PyPI"
            or re.sub(r"[-_.]+", "-", pkg.get("name", "")).lower() != name
        ):
            continue
        if version in affected.get("versions", []):
            return True
        try:
            v = Version(version)
        except InvalidVersion:
            continue
        for rng in affected.get("ranges", []):
            if rng.get("type") != "ECOSYSTEM":
                continue
            introduced: Version | None = None
            for event in rng.get("events", []):
                try:
                    if "introduced" in event:
                        introduced = Version(
                            event["introduced"] if event["introduced"] != "0" else "0"
                        )
                    elif "fixed" in event and introduced is not None:
                        if introduced <= v < Version(event["fixed"]):
                            return True
                        introduced = None
                except InvalidVersion:
                    continue
            if introduced is not None and v >= introduced:
                return True
    return False


def run_static(
    suite: SuiteResult,
    store: ImageStore,
    record: ImageRecord,
    rootfs: Path,
    config: AppConfig,
    advisories: Path | None,
) -> None:
    policy = config.test.security
    layers = _layer_members(store, record)
    merged: dict[str, Member] = {}
    origin: dict[str, int] = {}
    for index, members in enumerate(layers):
        for path, member in members.items():
            merged[path] = member
            origin[path] = index
    files = {p: origin[p] > 0 for p, m in merged.items() if m.kind == "file"}
    secrets = scan_secrets(rootfs, files, policy.allow)
    suite.add(
        "no secrets in the image", not secrets, f"{len(secrets)} found" if secrets else "", secrets
    )

    ssh = [
        p for p in merged if p in SSH_PATHS or p.endswith(("/authorized_keys", "/authorized_keys2"))
    ]
    suite.add(
        "no SSH server, no authorized_keys",
        not ssh,
        "",
        [f"{p}: remote shells have no place in an immutable image" for p in ssh],
    )

    setuid = [
        f"{p}: mode {m.mode:o} is setuid/setgid"
        for p, m in merged.items()
        if m.kind == "file" and m.mode & 0o6000 and p not in BASE_SETUID
    ]
    suite.add("no setuid/setgid binaries beyond the base's", not setuid, "", setuid)

    writable = [
        f"{p}: mode {m.mode:o} is world-writable"
        for p, m in merged.items()
        if m.kind in ("file", "dir")
        and m.mode & 0o002
        and not (m.kind == "dir" and m.mode & 0o1000)
    ]
    suite.add("no world-writable files", not writable, "", writable)

    lock_path = rootfs / "app" / config.build.lock
    try:
        pins = {p.name: p.version for p in read_lock(lock_path)}
    except KilnError as exc:
        suite.add("every dependency pinned by hash", False, str(exc))
        pins = None
    installed = python_packages(sbom(store, record.digest))
    if pins is not None:
        unpinned = [
            f"{name}=={version}: installed but {'pinned to ' + pins[name] if name in pins else 'not in'} {config.build.lock}"
            for name, version in sorted(installed.items())
            if pins.get(name) != version
        ]
        suite.add(
            "every dependency pinned by hash",
            not unpinned,
            f"{len(pins)} pins with hashes",
            unpinned,
        )

    source = advisories or (Path(policy.advisories) if policy.advisories else None)
    if source is None:
        suite.checks.append(
            Check(
                "known-vulnerable dependencies",
                SKIPPED,
                "no advisory database given (--advisories or [test.security].advisories)",
            )
        )
        return
    records = load_advisories(source)
    vulnerable = [
        f"{name}=={version}: {rec.get('id', '?')} {rec.get('summary', '')}".strip()
        for name, version in sorted(installed.items())
        for rec in records
        if _affected(rec, name, version)
    ]
    suite.add(
        "no known-vulnerable dependencies",
        not vulnerable,
        f"checked against {len(records)} advisories",
        vulnerable,
    )


def run_runtime(
    suite: SuiteResult, store: ImageStore, record: ImageRecord, live: LiveInstance
) -> None:
    user = str(store.image_config(record.digest)["config"].get("User", ""))
    uids = []
    for pid in live.app_pids():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        uids.append(int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)))  # type: ignore[union-attr]
    root = user.split(":")[0] in ("", "0", "root") or not uids or 0 in uids
    suite.add(
        "the app runs as non-root",
        not root,
        f"image user {user or '(unset)'}, host uids {sorted(set(uids))}",
    )
    probe = live.exec("touch /app/.kiln-write-probe /.kiln-write-probe")
    suite.add(
        "writing to the root filesystem fails",
        probe.returncode != 0,
        (probe.stderr.strip().splitlines() or ["the write succeeded"])[0],
    )
