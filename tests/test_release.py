"""End to end: phoenix releases on the local runtime, under real load."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln import procs
from kit import KILN, run_kiln
from releasekit import Load, bake, cleanup, free_port, make_app, releases_seen

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _stop_everything(kiln_env: Path) -> Iterator[None]:
    yield
    cleanup(kiln_env)


def get(port: int, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("X-Kiln-Release", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("X-Kiln-Release", ""), exc.read().decode()


def release(image: str, *extra: str, env: str = "staging") -> dict:  # type: ignore[type-arg]
    result = run_kiln("release", image, "--env", env, "--json", *extra)
    assert result.code == 0, result.err
    view: dict = json.loads(result.out)  # type: ignore[type-arg]
    return view


def status(env: str = "staging") -> dict:  # type: ignore[type-arg]
    result = run_kiln("status", "--env", env, "--json")
    assert result.code == 0, result.err
    envs = result.json()["envs"]
    assert len(envs) == 1
    data: dict = envs[0]  # type: ignore[type-arg]
    return data


def weights(env: str = "staging") -> dict[str, tuple[str, int]]:
    return {r["release"]: (r["state"], r["weight"]) for r in status(env)["releases"]}


def test_blue_green_rollback_and_rolling_under_load_lose_no_request(tmp_path: Path) -> None:
    port = free_port()
    v1 = bake(make_app(tmp_path / "v1", port, greeting="Hello"))
    v2 = bake(make_app(tmp_path / "v2", port, greeting="Howdy"))
    assert v1 != v2

    first = release(v1)
    assert first["state"] == "serving" and first["release"] == "r1"
    assert get(port)[:2] == (200, "r1")

    with Load(port, clients=8) as load:
        load.wait_for(200)
        # Blue-green: every response before the switch is r1, every one after is r2.
        r2 = release(v2)
        switched = time.monotonic()
        assert r2["release"] == "r2" and r2["state"] == "serving"
        load.wait_for(300)
        assert releases_seen(load.since(switched)) == {"r2"}
        assert weights() == {"r1": ("warm", 0), "r2": ("serving", 100)}

        # Rollback while r1 is warm: one atomic switch, no instance started.
        ps_before = {i["id"] for i in run_kiln("ps", "--json").json()["instances"]}
        back = run_kiln("rollback", "--env", "staging", "--json")
        assert back.code == 0, back.err
        rolled = time.monotonic()
        assert back.json()["release"] == "r1" and back.json()["seconds"] < 2
        load.wait_for(300)
        assert releases_seen(load.since(rolled)) == {"r1"}
        ps_after = {i["id"] for i in run_kiln("ps", "--json").json()["instances"]}
        assert ps_after == ps_before  # nothing new was started
        assert weights() == {"r1": ("serving", 100), "r2": ("warm", 0)}

        # Rolling: r3 replaces r1 instance by instance.
        r3 = release(v2, "--strategy", "rolling")
        rolled_out = time.monotonic()
        assert r3["release"] == "r3" and r3["state"] == "serving"
        load.wait_for(300)
        assert releases_seen(load.since(rolled_out)) == {"r3"}
        load.stop()

    assert load.failures() == [], load.failures()[:5]
    assert len(load.hits) > 1000
    assert releases_seen(load.hits) <= {"r1", "r2", "r3"}
    history = run_kiln("history", "--env", "staging", "--json").json()["releases"]
    assert [(r["release"], r["strategy"]) for r in history] == [
        ("r1", "blue-green"),
        ("r2", "blue-green"),
        ("r3", "rolling"),
    ]
    # No instance of the replaced release is left running.
    live = run_kiln("ps", "--json").json()["instances"]
    assert {i["id"].split("-")[1] for i in live if i["state"] == "ready"} <= {"r2", "r3"}


def test_instances_are_sealed(tmp_path: Path) -> None:
    port = free_port()
    probe = (
        "import os, json; from pathlib import Path\n"
        "def w(p):\n"
        "    try:\n"
        "        Path(p).write_text('x'); return 'writable'\n"
        "    except OSError as e: return type(e).__name__\n"
    )
    app = make_app(tmp_path / "app", port)
    module = app / "hello" / "__init__.py"
    module.write_text(
        module.read_text()
        + "\n\n@app.get('/seal')\ndef seal() -> dict[str, object]:\n"
        + "".join(f"    {line}\n" for line in probe.splitlines())
        + "    return {'uid': os.getuid(), 'pid': os.getpid(), 'root': w('/app/x'), 'tmp': w('/tmp/x'),"
        " 'env': sorted(os.environ), 'hostname': os.uname().nodename}\n"
    )
    from kit import git

    git(app, "commit", "-qam", "seal probe")
    release(bake(app))
    code, _, body = get(port, "/seal")
    assert code == 200, body
    seal = json.loads(body)
    assert seal["uid"] == 1000  # not root
    assert seal["root"] in ("OSError", "PermissionError")  # the image is read-only
    assert seal["tmp"] == "writable"
    assert seal["pid"] < 10  # its own PID namespace
    assert seal["hostname"].startswith("staging-r1-")  # its own UTS namespace
    for var in ("PORT", "KILN_APP", "KILN_ENV", "KILN_RELEASE", "KILN_IMAGE", "KILN_INSTANCE"):
        assert var in seal["env"]
    assert "KILN_HOME" not in seal["env"]  # nothing from the host leaks in
    # Unprivileged on the host as well, with no capabilities at all.
    for inst in run_kiln("ps", "--json").json()["instances"]:
        app_pids = [c for init in procs.children(inst["pid"]) for c in procs.children(init)]
        assert app_pids
        for pid in app_pids:
            status = dict(
                line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            )
            assert status["Uid"].split()[0] != "0"
            assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0


def test_crashing_release_aborts_and_the_old_one_keeps_serving(tmp_path: Path) -> None:
    port = free_port()
    good = bake(make_app(tmp_path / "good", port))
    bad = bake(
        make_app(
            tmp_path / "bad",
            port,
            toml_edits={
                'command = ["gunicorn", "--bind", "0.0.0.0:$PORT", "--workers", "2", "--preload", "--access-logfile", "-", "hello:app"]': 'command = ["python3", "-c", "import sys; print(\'boom: DATABASE_URL is not set\'); sys.exit(3)"]'
            },
        )
    )
    release(good)
    with Load(port, clients=4) as load:
        load.wait_for(50)
        result = run_kiln("release", bad, "--env", "staging")
        load.wait_for(50)
        load.stop()
    assert result.code == 1
    assert "r2 to staging aborted" in result.err and "crashed" in result.err
    assert "boom: DATABASE_URL is not set" in result.err  # the failing instance's last lines
    assert load.failures() == []
    assert releases_seen(load.hits) == {"r1"}
    assert weights() == {"r1": ("serving", 100)}
    assert [i for i in run_kiln("ps", "--json").json()["instances"] if "-r2-" in i["id"]] == []


def test_never_healthy_release_times_out(tmp_path: Path) -> None:
    port = free_port()
    good = bake(make_app(tmp_path / "good", port))
    sick = bake(
        make_app(
            tmp_path / "sick",
            port,
            toml_edits={'path = "/status"': 'path = "/nope"', 'timeout = "15s"': 'timeout = "3s"'},
        )
    )
    release(good)
    started = time.monotonic()
    result = run_kiln("release", sick, "--env", "staging")
    assert result.code == 1
    assert "aborted" in result.err and "ready within" in result.err
    assert time.monotonic() - started < 30
    assert get(port)[:2] == (200, "r1")


def test_bad_input_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    port = free_port()
    image = bake(make_app(tmp_path / "app", port))
    unknown = run_kiln("release", "f" * 12, "--env", "staging")
    assert unknown.code == 2 and "no image 'ffffffffffff'" in unknown.err
    no_env = run_kiln("release", image, "--env", "qa")
    assert (
        no_env.code == 2 and "defines no environment 'qa'" in no_env.err and "staging" in no_env.err
    )
    # The environment's port is taken by someone else.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        taken = run_kiln("release", image, "--env", "staging")
    assert taken.code == 2 and f"127.0.0.1:{port}" in taken.err and "already in use" in taken.err
    ok = release(image)
    assert ok["release"] == "r1"  # the refused attempts left no release behind
    assert get(port)[:2] == (200, "r1")


def test_two_releases_at_once_the_second_is_refused(tmp_path: Path) -> None:
    port = free_port()
    slow = bake(
        make_app(
            tmp_path / "slow",
            port,
            toml_edits={"[env.staging]\n": '[env.staging]\nvars = { HELLO_READY_AFTER = "4" }\n'},
        )
    )
    import subprocess

    first = subprocess.Popen(
        [str(KILN), "release", slow, "--env", "staging"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Wait until the first release holds the environment, then try a second.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            history = run_kiln("history", "--env", "staging", "--json")
            if history.code == 0 and history.json()["releases"]:
                break
            time.sleep(0.1)
        second = run_kiln("release", slow, "--env", "staging")
        assert second.code == 2, second.err
        assert "environment 'staging' is busy: release r1 by" in second.err
    finally:
        _, errs = first.communicate(timeout=60)
    assert first.returncode == 0, errs
    assert weights() == {"r1": ("serving", 100)}


def test_tampered_store_is_refused(tmp_path: Path, kiln_env: Path) -> None:
    port = free_port()
    image = bake(make_app(tmp_path / "app", port))
    manifest = json.loads((kiln_env / "images" / "blobs" / "sha256" / image[7:]).read_text())
    blob = kiln_env / "images" / "blobs" / "sha256" / manifest["layers"][-1]["digest"][7:]
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    result = run_kiln("release", image, "--env", "staging")
    assert result.code == 1
    assert manifest["layers"][-1]["digest"] in result.err and "corrupt" in result.err
    assert not (kiln_env / "rootfs" / image[7:]).exists()


def test_missing_bubblewrap_is_a_clear_error(tmp_path: Path) -> None:
    image = bake(make_app(tmp_path / "app", free_port()))
    result = run_kiln("release", image, "--env", "staging", env={"PATH": str(KILN.parent)})
    assert result.code == 2
    assert (
        "bubblewrap (bwrap) is not installed" in result.err
        and "apt-get install bubblewrap" in result.err
    )


def test_dead_instance_is_replaced_not_restarted(tmp_path: Path) -> None:
    port = free_port()
    release(bake(make_app(tmp_path / "app", port)))
    before = run_kiln("ps", "--json").json()["instances"]
    victim = before[0]
    with Load(port, clients=4) as load:
        load.wait_for(30)
        os.killpg(victim["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = run_kiln("ps", "--json").json()["instances"]
            ready = [i for i in now if i["state"] == "ready"]
            if len(ready) == 2 and victim["id"] not in {i["id"] for i in now}:
                break
            time.sleep(0.2)
        load.wait_for(30)
        load.stop()
    assert len(ready) == 2 and victim["id"] not in {i["id"] for i in ready}
    kinds = [e["kind"] for e in run_kiln("events", "--json").json()["events"]]
    assert "instance.failed" in kinds and "instance.replacement" in kinds
    # Requests in flight on the killed instance may fail; nothing else may.
    assert len(load.failures()) <= 4, load.failures()
