"""Fault injection: kill things at the worst moments and show nothing is lost."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln import procs
from kiln.runtime.local import LocalRuntime
from kit import run_kiln
from releasekit import Load, bake, cleanup, free_port, make_app

pytestmark = pytest.mark.slow

CANARY_LINE = 'canary = { steps = [10, 50, 100], interval = "30s" }'
QUICK_CANARY = 'canary = { steps = [50, 100], interval = "1s", min_requests = 10 }'


@pytest.fixture(autouse=True)
def _stop_everything(kiln_env: Path) -> Iterator[None]:
    yield
    cleanup(kiln_env)


def weights() -> dict[str, tuple[str, int]]:
    envs = run_kiln("status", "--env", "staging", "--json").json()["envs"]
    return {r["release"]: (r["state"], r["weight"]) for r in envs[0]["releases"]}


@pytest.mark.parametrize(
    ("strategy", "point"),
    [
        ("blue-green", "daemon.instance-spawned"),
        ("blue-green", "daemon.before-switch"),
        ("blue-green", "daemon.after-switch"),
        ("rolling", "daemon.instance-spawned"),
        ("rolling", "daemon.after-switch"),
        ("canary", "daemon.before-switch"),
        ("canary", "daemon.after-switch"),
    ],
)
def test_daemon_killed_mid_release_converges(
    tmp_path: Path, kiln_env: Path, strategy: str, point: str
) -> None:
    port = free_port()
    edits = {CANARY_LINE: QUICK_CANARY}
    v1 = bake(make_app(tmp_path / "v1", port, greeting="Hello", toml_edits=edits))
    v2 = bake(make_app(tmp_path / "v2", port, greeting="Howdy", toml_edits=edits))
    assert run_kiln("release", v1, "--env", "staging").code == 0
    run_kiln("daemon", "stop")  # restart it with the fault armed
    with Load(port, clients=4) as load:
        load.wait_for(30)
        armed = run_kiln("daemon", "start", env={"KILN_FAULT": point})
        assert armed.code == 0, armed.err
        # The daemon SIGKILLs itself at the fault point, under the CLI, which
        # starts a fresh daemon (without the fault) and follows the release.
        resumed = run_kiln("release", v2, "--env", "staging", "--strategy", strategy, "--json")
        assert resumed.code == 0, resumed.err
        assert "the daemon went away" in resumed.err
        assert resumed.json()["state"] == "serving"
        load.wait_for(50)
        load.stop()
    assert load.failures() == [], load.failures()[:5]
    # Exactly the intended release serves, with exactly the intended instances
    # (once the replaced ones have drained and stopped).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        live = run_kiln("ps", "--json").json()["instances"]
        if all(i["state"] == "ready" for i in live):
            break
        time.sleep(0.2)
    releases = sorted(i["id"].split("-")[1] for i in live)
    if strategy == "rolling":
        assert weights()["r2"] == ("serving", 100)
        assert releases == ["r2", "r2"]
    else:
        assert weights() == {"r1": ("warm", 0), "r2": ("serving", 100)}
        assert releases == ["r1", "r1", "r2", "r2"]
    running = {h.id for h in LocalRuntime().find(kiln_env / "rootfs")}
    assert running == {i["id"] for i in live}  # no orphan
    assert all(procs.start_time(i["pid"]) is not None for i in live)
    # No record lost: both releases and the daemon's death are in the trail.
    history = run_kiln("history", "--env", "staging", "--json").json()["releases"]
    assert [(r["release"], r["strategy"]) for r in history] == [
        ("r1", "blue-green"),
        ("r2", strategy),
    ]
    kinds = [e["kind"] for e in run_kiln("events", "--json").json()["events"]]
    assert kinds.count("daemon.started") >= 3 and "release.done" in kinds


def test_baseball_bat_random_kills_under_load(tmp_path: Path) -> None:
    """Kill instances at random under load: each is replaced, and the only failed
    requests are ones that were in flight on an instance as it died."""
    port = free_port()
    image = bake(make_app(tmp_path / "app", port, toml_edits={"replicas = 2": "replicas = 3"}))
    assert run_kiln("release", image, "--env", "staging").code == 0
    rng = random.Random(7)
    killed: list[str] = []
    clients = 4
    with Load(port, clients=clients) as load:
        load.wait_for(50)
        for _ in range(4):
            ready = [
                i for i in run_kiln("ps", "--json").json()["instances"] if i["state"] == "ready"
            ]
            victim = rng.choice(ready)
            os.killpg(victim["pid"], signal.SIGKILL)
            killed.append(victim["id"])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                now = run_kiln("ps", "--json").json()["instances"]
                if sum(1 for i in now if i["state"] == "ready") == 3 and victim["id"] not in {
                    i["id"] for i in now
                }:
                    break
                time.sleep(0.2)
            load.wait_for(30)
        load.stop()
    live = run_kiln("ps", "--json").json()["instances"]
    assert len([i for i in live if i["state"] == "ready"]) == 3
    assert not set(killed) & {i["id"] for i in live}  # replaced, never restarted
    events = run_kiln("events", "--json").json()["events"]
    assert sum(1 for e in events if e["kind"] == "instance.replacement") >= len(killed)
    # At most the requests in flight on each killed instance may fail.
    assert len(load.failures()) <= clients * len(killed), load.failures()
    assert len(load.hits) > 200


def test_full_disk_during_bake_is_a_clear_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(small)], check=True)
    try:
        home = small / "home"
        app = make_app(tmp_path / "app", free_port())
        result = run_kiln("bake", str(app), env={"KILN_HOME": str(home)})
        assert result.code == 1
        lines = [ln for ln in result.err.splitlines() if not ln.startswith("• ")]
        assert len(lines) == 1 and "no space left on device" in lines[0].lower(), result.err
        assert "Traceback" not in result.err
        # Nothing half-written is visible, and the store still reads.
        index = json.loads((home / "images" / "index.json").read_text())
        assert index["manifests"] == []
        assert run_kiln("images", "--json", env={"KILN_HOME": str(home)}).json() == {"images": []}
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_full_disk_during_release_and_logging_keeps_serving(tmp_path: Path) -> None:
    """With KILN_HOME's disk full, a new release is refused with a clear error,
    the serving release keeps answering (its log lines may be lost, nothing is
    corrupted), and once space is freed the next release goes through."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    import subprocess
    import urllib.request

    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(disk)], check=True)
    env = {"KILN_HOME": str(disk / "home")}
    try:
        port = free_port()
        v1 = make_app(tmp_path / "v1", port, greeting="Hello")
        v2 = make_app(tmp_path / "v2", port, greeting="Howdy")
        assert run_kiln("bake", str(v1), env=env).code == 0
        assert run_kiln("release", "hello:latest", "--env", "staging", env=env).code == 0
        assert run_kiln("bake", str(v2), env=env).code == 0
        filler = disk / "filler"
        with open(filler, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * (1 << 20))
                    fh.flush()
            except OSError:
                pass
        refused = run_kiln("release", "hello:latest", "--env", "staging", env=env)
        assert refused.code == 1
        assert "No space left on device" in refused.err and "Traceback" not in refused.err
        for _ in range(100):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                assert resp.status == 200 and resp.headers["X-Kiln-Release"] == "r1"
        assert run_kiln("logs", "--env", "staging", "-n", "5", env=env).code == 0
        filler.unlink()
        again = run_kiln("release", "hello:latest", "--env", "staging", "--json", env=env)
        assert again.code == 0, again.err
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            assert resp.headers["X-Kiln-Release"] == "r2"
    finally:
        run_kiln("daemon", "stop", "--all", env=env)
        subprocess.run(["umount", "-l", str(disk)], check=False)
