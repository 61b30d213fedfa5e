"""End to end: canary releases judged on real traffic, under continuous load."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kit import KILN, run_kiln
from releasekit import Load, bake, cleanup, free_port, make_app

pytestmark = pytest.mark.slow

CANARY_LINE = 'canary = { steps = [10, 50, 100], interval = "30s" }'


@pytest.fixture(autouse=True)
def _stop_everything(kiln_env: Path) -> Iterator[None]:
    yield
    cleanup(kiln_env)


def app(tmp: Path, name: str, port: int, canary: str, env_vars: str = "") -> str:
    edits = {CANARY_LINE: f"canary = {canary}"}
    if env_vars:
        edits["[env.staging]\n"] = f"[env.staging]\nvars = {{ {env_vars} }}\n"
    return bake(make_app(tmp / name, port, toml_edits=edits))


def status() -> dict[str, tuple[str, int]]:
    envs = run_kiln("status", "--env", "staging", "--json").json()["envs"]
    return {r["release"]: (r["state"], r["weight"]) for r in envs[0]["releases"]}


def history() -> list[dict[str, Any]]:
    releases: list[dict[str, Any]] = run_kiln("history", "--env", "staging", "--json").json()[
        "releases"
    ]
    return releases


FAST = '{ steps = [10, 50, 100], interval = "2s", min_requests = 30 }'


def test_failing_canary_is_aborted_automatically(tmp_path: Path) -> None:
    port = free_port()
    stable = app(tmp_path, "v1", port, FAST)
    broken = app(tmp_path, "v2", port, FAST, 'HELLO_FAIL_RATE = "0.3"')
    assert run_kiln("release", stable, "--env", "staging").code == 0
    with Load(port, clients=8) as load:
        load.wait_for(100)
        result = run_kiln("release", broken, "--env", "staging", "--strategy", "canary")
        load.wait_for(200)
        load.stop()
    assert result.code == 1
    assert "r2 to staging aborted: canary failed at 10%: error rate" in result.err
    failed_share = len(load.failures()) / len(load.hits)
    assert failed_share < 0.05, (failed_share, len(load.hits))
    assert status() == {"r1": ("serving", 100)}
    trail = history()[-1]["trail"]
    assert trail[-1]["result"] == "fail" and trail[-1]["numbers"]["canary_error_rate"] > 0.1
    assert trail[-1]["thresholds"]["max_error_increase"] == 0.02
    assert "r2 step 1 at 10%: fail" in run_kiln("history", "--env", "staging").out


def test_slow_canary_is_aborted(tmp_path: Path) -> None:
    port = free_port()
    stable = app(tmp_path, "v1", port, FAST)
    slow = app(tmp_path, "v2", port, FAST, 'HELLO_DELAY = "0.15"')
    assert run_kiln("release", stable, "--env", "staging").code == 0
    with Load(port, clients=8) as load:
        load.wait_for(100)
        result = run_kiln("release", slow, "--env", "staging", "--strategy", "canary")
        load.stop()
    assert result.code == 1, result.err
    assert "latency" in result.err
    assert load.failures() == []
    assert status() == {"r1": ("serving", 100)}
    verdict = history()[-1]["trail"][-1]
    assert verdict["numbers"]["canary_p99"] > 5 * verdict["numbers"]["stable_p99"]


def test_healthy_canary_is_promoted_and_gets_its_share(tmp_path: Path) -> None:
    port = free_port()
    stable = app(tmp_path, "v1", port, FAST)
    steady = '{ steps = [20, 100], interval = "5s", min_requests = 30 }'
    healthy = app(tmp_path, "v2", port, steady)
    assert run_kiln("release", stable, "--env", "staging").code == 0
    clock_offset = time.time() - time.monotonic()  # events use wall time, the load monotonic
    with Load(port, clients=8) as load:
        load.wait_for(100)
        proc = subprocess.Popen(
            [str(KILN), "release", healthy, "--env", "staging", "--strategy", "canary"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and status().get("r2") != ("starting", 20):
                time.sleep(0.1)
            # Testers reach the canary by name, whatever its weight.
            for _ in range(5):
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/", headers={"X-Kiln-Release": "canary"}
                )
                with urllib.request.urlopen(req, timeout=5) as resp:
                    assert resp.headers["X-Kiln-Release"] == "r2"
        finally:
            _, errs = proc.communicate(timeout=90)
        load.stop()
    assert proc.returncode == 0, errs
    # The share r2 actually got while the router was told 20%: between the two steps.
    events = run_kiln("events", "--env", "staging", "--json").json()["events"]
    first, second = (e["ts"] - clock_offset for e in events if e["kind"] == "canary.step")
    window = [h for h in load.hits if first + 0.2 <= h.start and h.end <= second - 0.2]
    share = sum(1 for h in window if h.release == "r2") / len(window)
    assert len(window) > 500, len(window)
    assert abs(share - 0.20) < 0.04, share
    assert load.failures() == []
    assert status() == {"r1": ("warm", 0), "r2": ("serving", 100)}
    assert [d["result"] for d in history()[-1]["trail"]] == ["pass", "pass"]


def test_promote_pause_resume_and_abort(tmp_path: Path) -> None:
    port = free_port()
    slow_steps = '{ steps = [10, 50, 100], interval = "60s", min_requests = 30 }'
    stable = app(tmp_path, "v1", port, slow_steps)
    candidate = app(tmp_path, "v2", port, slow_steps)
    assert run_kiln("release", stable, "--env", "staging").code == 0

    def start_canary() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [str(KILN), "release", candidate, "--env", "staging", "--strategy", "canary", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(w == 10 for s, w in status().values() if s == "starting"):
                return proc
            time.sleep(0.1)
        raise AssertionError("the canary never reached its first step")

    first = start_canary()
    assert run_kiln("abort", "--env", "staging").code == 0
    out, _ = first.communicate(timeout=30)
    assert first.returncode == 1
    assert json.loads(out)["state"] == "aborted"
    assert status() == {"r1": ("serving", 100)}

    second = start_canary()
    paused = run_kiln("pause", "--env", "staging", "--json")
    assert paused.code == 0 and paused.json()["progress"]["paused"] is True
    assert run_kiln("resume", "--env", "staging", "--json").json()["progress"]["paused"] is False
    promoted = run_kiln("promote", "--env", "staging")
    assert promoted.code == 0, promoted.err
    out, _ = second.communicate(timeout=30)
    assert second.returncode == 0 and json.loads(out)["state"] == "serving"
    assert status() == {"r1": ("warm", 0), "r3": ("serving", 100)}
    kinds = [e["kind"] for e in run_kiln("events", "--env", "staging", "--json").json()["events"]]
    for kind in (
        "canary.step",
        "canary.paused",
        "canary.resumed",
        "canary.promoted",
        "release.aborted",
    ):
        assert kind in kinds
    assert run_kiln("promote", "--env", "staging").code == 2  # nothing left to promote


def test_too_little_traffic_pauses_and_says_so(tmp_path: Path) -> None:
    port = free_port()
    quiet = '{ steps = [10, 100], interval = "1s", min_requests = 50, max_inconclusive = 2 }'
    stable = app(tmp_path, "v1", port, quiet)
    candidate = app(tmp_path, "v2", port, quiet)
    assert run_kiln("release", stable, "--env", "staging").code == 0
    proc = subprocess.Popen(
        [str(KILN), "release", candidate, "--env", "staging", "--strategy", "canary"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 40
        paused = []
        while time.monotonic() < deadline and not paused:
            events = run_kiln("events", "--env", "staging", "--json").json()["events"]
            paused = [e for e in events if e["kind"] == "canary.paused"]
            time.sleep(0.2)
        assert paused, "the canary never paused"
        assert "only 0 canary requests" in paused[0]["message"]
        assert status()["r2"] == ("starting", 10)  # it did not pass silently
    finally:
        run_kiln("abort", "--env", "staging")
        proc.communicate(timeout=30)
    assert proc.returncode == 1
