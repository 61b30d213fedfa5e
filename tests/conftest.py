"""Shared fixtures: an isolated KILN_HOME per test, a machine-wide build cache,
the example app copied into a git repository of its own, and a CLI runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "hello"
KILN = Path(sys.executable).parent / "kiln"
# The Debian base takes ~20 s to build; every test on this machine shares it
# (it is content-addressed and written atomically, so sharing is safe).
TEST_CACHE = Path(os.environ.get("KILN_TEST_CACHE", Path.home() / ".cache" / "kiln-tests"))
FIXED_DATE = "2026-01-02T03:04:05+00:00"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture(autouse=True)
def kiln_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "kiln-home"
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.setenv("KILN_CACHE_DIR", str(TEST_CACHE))
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    monkeypatch.delenv("KILN_FAULT", raising=False)
    return home


def run_kiln(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 600
) -> Result:
    proc = subprocess.run(
        [str(KILN), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def kiln() -> Any:
    return run_kiln


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_AUTHOR_DATE": FIXED_DATE,
        "GIT_COMMITTER_DATE": FIXED_DATE,
    }
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, env=env, check=True
    ).stdout.strip()


def copy_example(dest: Path, commit: bool = True) -> Path:
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    if commit:
        git(dest, "init", "-q", "-b", "main")
        git(dest, "add", "-A")
        git(dest, "commit", "-q", "-m", "hello")
    return dest


@pytest.fixture
def hello(tmp_path: Path) -> Path:
    """The example app in a fresh git repository with a fixed commit date."""
    return copy_example(tmp_path / "hello")


@pytest.fixture
def bake_hello(hello: Path) -> Iterator[Any]:
    def bake(*extra: str, path: Path = hello) -> str:
        result = run_kiln("bake", str(path), "--json", *extra)
        assert result.code == 0, result.err
        digest: str = result.json()["digest"]
        return digest

    yield bake
