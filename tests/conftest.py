"""Fixtures: an isolated KILN_HOME per test, a machine-wide build cache, the example
app copied into a git repository of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from kit import TEST_CACHE, copy_example


@pytest.fixture(autouse=True)
def kiln_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "kiln-home"
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.setenv("KILN_CACHE_DIR", str(TEST_CACHE))
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    monkeypatch.delenv("KILN_FAULT", raising=False)
    return home


@pytest.fixture
def hello(tmp_path: Path) -> Path:
    """The example app in a fresh git repository with a fixed commit date."""
    return copy_example(tmp_path / "hello")
