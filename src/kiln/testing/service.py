"""The service suite: the HTTP checks declared in kiln.toml, readiness, clean shutdown."""

from __future__ import annotations

import http.client
import re
import time

from kiln.config import ServiceCheck
from kiln.testing.instance import LiveInstance
from kiln.testing.results import Check, SuiteResult


def run_check(live: LiveInstance, check: ServiceCheck) -> Check:
    name = f"{check.method} {check.path} → {check.status}"
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    start = time.monotonic()
    try:
        conn.request(check.method, check.path, headers=dict(check.headers))
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as exc:
        return Check(name, "failed", f"request failed: {type(exc).__name__}: {exc}")
    finally:
        conn.close()
    latency = time.monotonic() - start
    problems = []
    if resp.status != check.status:
        problems.append(f"status {resp.status}, expected {check.status}")
    if check.contains is not None and check.contains not in body:
        problems.append(f"body does not contain {check.contains!r}")
    if check.regex is not None and not re.search(check.regex, body):
        problems.append(f"body does not match /{check.regex}/")
    if check.max_latency is not None and latency > check.max_latency:
        problems.append(f"took {latency * 1000:.0f} ms, limit {check.max_latency * 1000:.0f} ms")
    evidence = [f"status {resp.status} in {latency * 1000:.1f} ms", f"body: {body[:200]!r}"]
    result = Check(name, "failed" if problems else "passed", "; ".join(problems), evidence, latency)
    return result


def run_service(suite: SuiteResult, live: LiveInstance, checks: tuple[ServiceCheck, ...]) -> None:
    for check in checks:
        suite.checks.append(run_check(live, check))
    if not checks:
        suite.add("declared checks", True, "no [test].service checks in kiln.toml")


def shutdown_check(suite: SuiteResult, live: LiveInstance, grace: float) -> None:
    """SIGTERM must end the app by itself within the grace period (the instance ends here)."""
    start = time.monotonic()
    graceful = live.runtime.stop(live.handle, grace)
    took = time.monotonic() - start
    detail = (
        f"exited {took:.2f}s after SIGTERM"
        if graceful
        else f"still running {grace:.0f}s after SIGTERM: killed"
    )
    check = suite.add(
        f"clean shutdown on SIGTERM within {grace:.0f}s", graceful, detail, live.log_tail(5)
    )
    check.seconds = took
