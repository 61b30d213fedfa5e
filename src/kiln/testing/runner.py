"""Running the suites against one image and recording what they found."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln import oci
from kiln.config import AppConfig
from kiln.errors import UsageError
from kiln.home import Home
from kiln.images import latest_tests, provenance
from kiln.releasespec import baked_config
from kiln.rootfs import ensure_rootfs
from kiln.runtime import get_runtime
from kiln.state import State
from kiln.store import ImageRecord, ImageStore
from kiln.testing import compliance, integration, security, service
from kiln.testing.instance import LiveInstance, ephemeral_instance, wait_ready
from kiln.testing.results import ERROR, SUITES, Check, SuiteResult, attestation

Progress = Callable[[str], None]


@dataclass
class TestRun:
    record: ImageRecord
    suites: list[SuiteResult]
    attestation: str

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.suites)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.record.digest,
            "app": self.record.app,
            "passed": self.passed,
            "attestation": self.attestation,
            "suites": [s.to_json() for s in self.suites],
        }


def parse_suites(raw: str | None) -> list[str]:
    if not raw:
        return list(SUITES)
    chosen = [s.strip() for s in raw.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SUITES]
    if unknown or not chosen:
        raise UsageError(
            f"unknown suite {unknown[0] if unknown else raw!r}",
            hint=f"choose from {', '.join(SUITES)}",
        )
    return [s for s in SUITES if s in chosen]


def _source_dir(store: ImageStore, record: ImageRecord) -> Path | None:
    statements = provenance(store, record.digest)
    if not statements:
        return None
    path = statements[-1]["predicate"]["buildDefinition"]["externalParameters"]["source"].get(
        "path"
    )
    return Path(path) if path else None


def run_tests(
    home: Home,
    ref: str,
    suites: list[str],
    *,
    tests_dir: Path | None = None,
    advisories: Path | None = None,
    progress: Progress = lambda _: None,
) -> TestRun:
    home.ensure()
    store = ImageStore(home.images)
    store.init()
    record = store.resolve(ref)
    rootfs = ensure_rootfs(store, home.rootfs, record.digest)
    config = baked_config(rootfs, record)
    if advisories is not None and not advisories.exists():
        raise UsageError(f"advisory database {advisories} does not exist")
    folder = None
    if "integration" in suites:
        if config.test.integration is None and tests_dir is None:
            raise UsageError(
                "the integration suite needs [test].integration in kiln.toml (a pytest folder)",
                hint="set it and bake again, pass --tests DIR, or leave the suite out with --suite",
            )
        folder = integration.locate(
            config.test.integration or "", rootfs, _source_dir(store, record), tests_dir
        )
    results = {name: SuiteResult(name) for name in suites}

    if "security" in results:
        progress("security: scanning the image")
        security.run_static(results["security"], store, record, rootfs, config, advisories)
    if "compliance" in results:
        progress("compliance: checking the policy")
        compliance.run_compliance(results["compliance"], store, record, config)

    live_suites = [s for s in ("service", "integration", "security") if s in results]
    if live_suites:
        progress("starting an ephemeral instance")
        with ephemeral_instance(home, store, record, config, get_runtime("local")) as live:
            _live(results, live, config, folder, store, record, progress)
    for suite in results.values():
        suite.finished = time.time()
    ordered = [results[s] for s in suites]
    digest = _record(home, store, record, ordered)
    return TestRun(record, ordered, digest)


def _live(
    results: dict[str, SuiteResult],
    live: LiveInstance,
    config: AppConfig,
    folder: Path | None,
    store: ImageStore,
    record: ImageRecord,
    progress: Progress,
) -> None:
    progress(f"waiting for GET {config.health.path} to answer 2xx")
    ready, last, seconds = wait_ready(live, config.health.path, config.health.timeout)
    target = results.get("service") or next(iter(results.values()))
    check = target.add(
        f"ready within {config.health.timeout:.0f}s",
        ready,
        f"GET {config.health.path} {last} after {seconds:.1f}s",
        [] if ready else live.log_tail(10),
    )
    check.seconds = seconds
    if not ready:
        for name in ("service", "integration", "security"):
            if name in results and results[name] is not target:
                results[name].checks.append(
                    Check("live checks", ERROR, "the instance never became ready")
                )
        return
    if "service" in results:
        progress("service: declared HTTP checks")
        service.run_service(results["service"], live, config.test.service)
    if "integration" in results and folder is not None:
        progress(f"integration: pytest {folder}")
        integration.run_integration(results["integration"], live, folder)
    if "security" in results:
        progress("security: checking the live instance")
        security.run_runtime(results["security"], store, record, live)
    if "service" in results:
        progress("service: clean shutdown on SIGTERM")
        service.shutdown_check(results["service"], live, config.test.shutdown_grace)


def _record(home: Home, store: ImageStore, record: ImageRecord, suites: list[SuiteResult]) -> str:
    payload = json.dumps(attestation(record.digest, suites), indent=1, sort_keys=True).encode()
    manifest_size = len(store.read_bytes(record.digest))
    descriptor = store.put_artifact(record.digest, manifest_size, oci.TEST_RESULT, payload)
    store.add_referrer(descriptor)
    state = State(home.state_db)
    try:
        summary = ", ".join(f"{s.suite} {s.result}" for s in suites)
        state.event(
            "test.finished",
            f"tests of {record.app} {record.short}: {summary}",
            image=record.digest,
            data={"suites": {s.suite: s.result for s in suites}, "attestation": descriptor.digest},
        )
    finally:
        state.close()
    return descriptor.digest


def passed_suites(store: ImageStore, digest: str) -> dict[str, str]:
    """Each suite's latest recorded result for an image: what release gates read."""
    return {t["suite"]: t["result"] for t in latest_tests(store, digest)}
