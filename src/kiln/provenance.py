"""Where an image came from: the source tree's git state, annotations, and the
in-toto Statement v1 / SLSA provenance v1 that is stored beside the image.

Only facts fixed by the inputs go into the image's annotations (and so into
its digest): baking the same tree twice must give the same image. Facts about
one particular bake (when, on which host, by whom, why, what came before)
go into the provenance statement, an attestation whose subject is the image.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kiln

BUILD_TYPE = "https://kiln.dev/bake/v1"
BUILDER_ID = "https://kiln.dev/builder/local"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"


@dataclass(frozen=True)
class SourceInfo:
    path: Path
    vcs: str | None = None
    commit: str | None = None
    dirty: bool = False
    remote: str | None = None
    branch: str | None = None
    commit_time: int | None = None
    describe: str | None = None


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _scrub(url: str) -> str:
    """Never record credentials embedded in a remote URL."""
    return re.sub(r"(?<=://)[^/@]+@", "", url)


def git_info(root: Path) -> SourceInfo:
    if _git(root, "rev-parse", "--is-inside-work-tree") != "true":
        return SourceInfo(path=root)
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=normal", "--", ".")
    remote = _git(root, "remote", "get-url", "origin")
    commit_time = _git(root, "log", "-1", "--format=%ct")
    return SourceInfo(
        path=root,
        vcs="git",
        commit=commit,
        dirty=bool(status),
        remote=_scrub(remote) if remote else None,
        branch=_git(root, "rev-parse", "--abbrev-ref", "HEAD"),
        commit_time=int(commit_time) if commit_time and commit_time.isdigit() else None,
        describe=_git(root, "describe", "--tags", "--always", "--dirty"),
    )


def build_epoch(source: SourceInfo) -> int:
    """SOURCE_DATE_EPOCH if set, else the commit's time, else 0: never the clock."""
    env = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if env.isdigit():
        return int(env)
    return source.commit_time or 0


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def statement(
    *,
    subject_name: str,
    digest: str,
    source: SourceInfo,
    inputs: dict[str, Any],
    resolved: list[dict[str, Any]],
    reason: str | None,
    previous: str | None,
    tags: list[str],
    started: float,
    finished: float,
    invocation: str,
) -> dict[str, Any]:
    """An in-toto Statement v1 carrying a SLSA provenance v1 predicate."""
    source_ref: dict[str, Any] = {"path": str(source.path)}
    if source.vcs:
        source_ref.update(
            {
                "vcs": source.vcs,
                "uri": source.remote,
                "commit": source.commit,
                "branch": source.branch,
                "dirty": source.dirty,
            }
        )
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": digest.removeprefix("sha256:")}}],
        "predicateType": SLSA_PROVENANCE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "source": source_ref,
                    "reason": reason,
                    "tags": tags,
                    **inputs,
                },
                "internalParameters": {"previousImage": previous},
                "resolvedDependencies": resolved,
            },
            "runDetails": {
                "builder": {
                    "id": BUILDER_ID,
                    "version": {"kiln": kiln.__version__},
                },
                "metadata": {
                    "invocationId": invocation,
                    "startedOn": iso(started),
                    "finishedOn": iso(finished),
                    "host": socket.gethostname(),
                    "user": _user(),
                },
            },
        },
    }


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
