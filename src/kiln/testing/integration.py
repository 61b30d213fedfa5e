"""The integration suite: the app's own pytest suite, run against the live instance."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from kiln.errors import UsageError
from kiln.testing.instance import LiveInstance
from kiln.testing.results import ERROR, FAILED, PASSED, SKIPPED, Check, SuiteResult


def locate(relative: str, rootfs: Path, source: Path | None, explicit: Path | None) -> Path:
    """Where the suite is: --tests, else inside the image, else the baked source tree, else here."""
    if explicit is not None:
        if not explicit.is_dir():
            raise UsageError(f"integration tests folder {explicit} does not exist")
        return explicit
    candidates = [rootfs / "app" / relative]
    if source is not None:
        candidates.append(source / relative)
    candidates.append(Path.cwd() / relative)
    for path in candidates:
        if path.is_dir():
            return path
    looked = ", ".join(str(c) for c in candidates)
    raise UsageError(
        f"integration tests folder {relative!r} (from [test].integration) does not exist; looked in {looked}",
        hint="fix [test].integration, or pass --tests DIR",
    )


def run_integration(suite: SuiteResult, live: LiveInstance, folder: Path) -> None:
    pids = live.app_pids()
    with tempfile.TemporaryDirectory(prefix="kiln-pytest-") as tmp:
        report = Path(tmp) / "junit.xml"
        env = {
            **os.environ,
            "KILN_TEST_BASE_URL": live.base_url,
            "KILN_TEST_PID": str(pids[0] if pids else 0),
            "KILN_TEST_UID": str(live.uid),
            "KILN_TEST_GID": str(live.gid),
            "KILN_TEST_ROOTFS": str(live.rootfs),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            str(folder),
            "-p",
            "kiln.testing.plugin",
            "-p",
            "no:pytest11.testinfra",  # its own `host` fixture would point at this machine
            "-p",
            "no:cacheprovider",
            "-q",
            f"--junitxml={report}",
            f"--rootdir={folder}",
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd=folder, timeout=1800, check=False
        )
        if not report.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            suite.checks.append(
                Check("pytest", ERROR, f"pytest did not run (exit {proc.returncode})", tail)
            )
            return
        cases = _cases(report)
    if not cases:
        suite.checks.append(Check("pytest", FAILED, f"no tests were collected in {folder}"))
        return
    suite.checks += cases


def _cases(report: Path) -> list[Check]:
    checks = []
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        seconds = float(case.get("time") or 0)
        result, detail, evidence = PASSED, "", []
        for tag, outcome in (("failure", FAILED), ("error", ERROR), ("skipped", SKIPPED)):
            el = case.find(tag)
            if el is not None:
                result = outcome
                detail = el.get("message", "") or tag
                evidence = (el.text or "").strip().splitlines()[-8:]
                break
        checks.append(Check(name, result, detail, evidence, seconds))
    return checks
