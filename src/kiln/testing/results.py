"""Checks, suite results, and what becomes of them: JUnit XML and the attestation."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kiln

SUITES = ("service", "integration", "security", "compliance")
PASSED, FAILED, SKIPPED, ERROR = "passed", "failed", "skipped", "error"


@dataclass
class Check:
    """One verdict with the evidence behind it (file and line for findings)."""

    name: str
    result: str
    detail: str = ""
    evidence: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "result": self.result,
            "detail": self.detail,
            "evidence": self.evidence,
            "seconds": round(self.seconds, 4),
        }


@dataclass
class SuiteResult:
    suite: str
    checks: list[Check] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished: float = 0.0

    @property
    def result(self) -> str:
        if any(c.result == ERROR for c in self.checks):
            return ERROR
        if any(c.result == FAILED for c in self.checks):
            return FAILED
        return PASSED

    @property
    def passed(self) -> bool:
        return self.result == PASSED

    def add(
        self, name: str, ok: bool, detail: str = "", evidence: list[str] | None = None
    ) -> Check:
        check = Check(name, PASSED if ok else FAILED, detail, evidence or [])
        self.checks.append(check)
        return check

    def to_json(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "result": self.result,
            "started": self.started,
            "finished": self.finished,
            "checks": [c.to_json() for c in self.checks],
        }


def attestation(image: str, suites: list[SuiteResult]) -> dict[str, Any]:
    """The payload stored beside the image: which suites passed, when, by which kiln."""
    return {
        "image": image,
        "when": datetime.now(UTC).isoformat(timespec="microseconds"),
        "kiln_version": kiln.__version__,
        "result": PASSED if all(s.passed for s in suites) else FAILED,
        "suites": {s.suite: s.to_json() for s in suites},
    }


def junit_xml(image: str, suites: list[SuiteResult]) -> bytes:
    root = ET.Element("testsuites", name=f"kiln test {image}")
    for suite in suites:
        failures = sum(1 for c in suite.checks if c.result == FAILED)
        errors = sum(1 for c in suite.checks if c.result == ERROR)
        skipped = sum(1 for c in suite.checks if c.result == SKIPPED)
        el = ET.SubElement(
            root,
            "testsuite",
            name=suite.suite,
            tests=str(len(suite.checks)),
            failures=str(failures),
            errors=str(errors),
            skipped=str(skipped),
            time=f"{max(suite.finished - suite.started, 0):.3f}",
        )
        for check in suite.checks:
            case = ET.SubElement(
                el,
                "testcase",
                classname=f"kiln.{suite.suite}",
                name=check.name,
                time=f"{check.seconds:.3f}",
            )
            body = "\n".join([check.detail, *check.evidence]).strip()
            if check.result == FAILED:
                ET.SubElement(case, "failure", message=check.detail or "failed").text = body
            elif check.result == ERROR:
                ET.SubElement(case, "error", message=check.detail or "error").text = body
            elif check.result == SKIPPED:
                ET.SubElement(case, "skipped", message=check.detail)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data
