"""End to end: instances' logs collected by the daemon, kept after the instances
are gone, followed live, and counted exactly through crashes of instances and
of the daemon itself."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kit import KILN, run_kiln
from logkit import chatty_app, release, wait_until
from releasekit import cleanup, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _stop_everything(kiln_env: Path) -> Iterator[None]:
    yield
    cleanup(kiln_env)


def logs_json(*args: str) -> list[dict[str, Any]]:
    result = run_kiln("logs", "--json", *args)
    assert result.code == 0, result.err
    return [json.loads(line) for line in result.out.splitlines()]


def release_state(number: str) -> str:
    releases = run_kiln("history", "--env", "staging", "--json").json()["releases"]
    return str(next(r["state"] for r in releases if r["release"] == number))


class Follower:
    """``kiln logs -f --json`` in the background, each line timed as it arrives."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(KILN), "logs", "-f", "--json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), json.loads(line)))

    def until(self, message: str, timeout: float = 10.0) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            when, line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            if line["message"] == message:
                return when, line

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)  # how a person stops following
        code = self.proc.wait(10)
        self.reader.join(5)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code


def say(port: int, text: str) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/say?text={text}", timeout=5) as resp:
        assert resp.status == 200


def test_logs_followed_live_and_kept_after_their_release_retired(tmp_path: Path) -> None:
    port = free_port()
    image = chatty_app(tmp_path / "v1", port, {"CHATTY_LINES": "50"}, keep_previous='"1s"')
    r1 = release(image)

    # -f: a line an instance writes shows up within a second.
    follower = Follower("--env", "staging", "--tail", "1")
    try:
        # Its first line (the tail) means it is connected and following: only
        # lines written after that are live.
        follower.lines.get(timeout=30)
        latencies = []
        for k in range(5):
            marker = f"marker-{k}-{time.time()}"
            sent = time.monotonic()
            say(port, marker)
            latencies.append(follower.until(marker)[0] - sent)
            time.sleep(0.2)
        print(f"kiln logs -f latency: {', '.join(f'{x * 1000:.0f} ms' for x in latencies)}")
        # Within a second as a rule; a busy CI machine may stall one a little.
        assert sorted(latencies)[len(latencies) // 2] < 1.0 and max(latencies) < 3.0
        say(port, "hello-from-r1")
        release(image)  # the same image again, as r2: new instances, r1 retires
        # The follower picks up instances that did not exist when it started.
        say(port, "hello-from-r2")
        _, line = follower.until("hello-from-r2")
        assert line["release"] == "r2" and line["image"] == image
    finally:
        assert follower.stop() == 0
    wait_until(lambda: release_state("r1") == "retired", 30, "r1 to retire")
    assert all("-r2-" in i["id"] for i in run_kiln("ps", "--json").json()["instances"])

    def all_of_r1() -> list[dict[str, Any]]:
        got = logs_json("--release", "r1")
        return got if sum(x["message"].startswith("chatty") for x in got) == 100 else []

    lines = wait_until(all_of_r1, 10, "r1's lines")
    r1_ids = {i["id"] for i in r1["instances"]}
    assert {x["instance"] for x in lines} == r1_ids
    for inst in r1_ids:
        numbers = [
            int(x["message"].split()[2])
            for x in lines
            if x["instance"] == inst and x["message"].startswith("chatty")
        ]
        assert numbers == list(range(50))
    first = lines[0]
    assert (first["app"], first["env"], first["release"], first["image"]) == (
        "hello",
        "staging",
        "r1",
        image,
    )
    assert sum(x["message"] == "hello-from-r1" for x in lines) == 1
    starting = [x for x in lines if x["fields"]]
    assert starting and starting[0]["message"] == "starting" and starting[0]["level"] == "info"
    assert starting[0]["fields"]["instance"] in r1_ids
    warnings = [x for x in lines if x["message"] == "[WARNING] this goes to stderr"]
    assert len(warnings) == 2
    assert all(x["level"] == "warning" and x["stream"] == "stderr" for x in warnings)
    assert [x["id"] for x in lines] == sorted(x["id"] for x in lines)  # merged in time order
    # Filters compose.
    assert len(logs_json("--release", "r1", "--level", "warning")) == 2
    assert len(logs_json("--release", "r1", "--grep", r"chatty \S+ 4\d$")) == 20
    assert logs_json("--env", "staging", "--release", "r2", "--grep", "hello-from-r1") == []
    assert len(logs_json("--release", "r1", "--tail", "3")) == 3
    plain = run_kiln("logs", "--release", "r1", "--grep", "hello-from")
    assert plain.code == 0
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} staging-r1-\w+ hello-from-r1\n", plain.out)

    # The audit trail shows every step of r2's blue-green release, in order.
    events = run_kiln("events", "--env", "staging", "--since", "10m", "--json").json()["events"]
    kinds = [(e["kind"], e["release"]) for e in events]
    steps = [
        ("release.started", "r2"),
        ("instance.started", "r2"),
        ("instance.ready", "r2"),
        ("traffic.switched", "r2"),
        ("release.serving", "r2"),
        ("release.warm", "r1"),
        ("release.done", "r2"),
        ("release.retiring", "r1"),
        ("instance.draining", None),
        ("instance.stopped", None),
        ("release.retired", "r1"),
    ]
    at = [kinds.index(step) for step in steps]
    assert at == sorted(at), kinds
    switched = events[kinds.index(("traffic.switched", "r2"))]
    assert switched["data"]["weights"] == {"r2": 100, "r1": 0}
    assert run_kiln("events", "--since", "2099-01-01", "--json").json()["events"] == []
    bad = run_kiln("events", "--since", "a while ago")
    assert bad.code == 2 and "--since must be a duration ago" in bad.err


def test_a_dead_instances_last_words_are_kept(tmp_path: Path) -> None:
    port = free_port()
    image = chatty_app(
        tmp_path / "app", port, {"CHATTY_LINES": "5", "CHATTY_DIE_AFTER": "2"}, replicas="1"
    )
    first = release(image)["instances"][0]["id"]
    failed = wait_until(
        lambda: [
            e
            for e in run_kiln("events", "--json").json()["events"]
            if e["kind"] == "instance.failed" and e["instance"] == first
        ],
        15,
        "the instance to die",
    )
    # The engine's own record of the death carries the file's last lines …
    assert failed[0]["data"]["log_tail"][-1] == "dying: no newline at the very end"
    # … and the log store has every line, the unterminated last one too.
    lines = wait_until(
        lambda: (
            (got := [x["message"] for x in logs_json("--instance", first)])
            and got[-1].startswith("dying")
            and got
        ),
        10,
        "the last words to be stored",
    )
    assert f"last words of {first}" in lines
    assert lines[-1] == "dying: no newline at the very end"
    assert [x for x in lines if x.startswith("chatty")] == [f"chatty {first} {n}" for n in range(5)]
    replaced = [
        e
        for e in run_kiln("events", "--json").json()["events"]
        if e["kind"] == "instance.replacement"
    ]
    assert replaced and replaced[0]["data"]["reason"].startswith(f"{first} exited")


def _file_numbers(path: Path) -> list[int]:
    return [
        int(line.split()[2]) for line in path.read_text().splitlines() if line.startswith("chatty")
    ]


def test_chaos_kills_lose_and_duplicate_no_line(tmp_path: Path, kiln_env: Path) -> None:
    """Instances and the daemon are SIGKILLed while the apps log heavily; every
    line written is stored exactly once (the documented loss window is zero)."""
    port = free_port()
    image = chatty_app(
        tmp_path / "app", port, {"CHATTY_LINES": "25000", "CHATTY_BURST": "50"}, replicas="3"
    )
    release(image)
    pid_file = kiln_env / "run" / "daemon.pid"
    killed_instances = 0
    killed_daemons = 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        time.sleep(0.8)
        if (killed_instances + killed_daemons) % 2 == 0:
            ready = [
                i for i in run_kiln("ps", "--json").json()["instances"] if i["state"] == "ready"
            ]
            if ready:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(ready[0]["pid"], signal.SIGKILL)  # bwrap, its init and the app
                    killed_instances += 1
                continue
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        killed_daemons += 1
        time.sleep(0.3)
        assert run_kiln("daemon", "start").code == 0
    assert killed_instances >= 2 and killed_daemons >= 2

    logdir = kiln_env / "logs" / "instances"
    db_path = kiln_env / "logs" / "logs.db"

    def stored() -> dict[str, list[int]]:
        with sqlite3.connect(db_path) as db:
            rows = db.execute(
                "SELECT s.instance, l.message FROM lines l JOIN sources s ON s.id = l.source "
                "WHERE s.stream = 'stdout' AND l.message LIKE 'chatty %' ORDER BY l.id"
            ).fetchall()
        out: dict[str, list[int]] = {}
        for instance, message in rows:
            out.setdefault(instance, []).append(int(message.split()[2]))
        return out

    # The survivors still write; compare once the files are still and the
    # store has caught up with them.
    def settled() -> bool:
        before = {f: f.stat().st_size for f in logdir.glob("*.out")}
        time.sleep(0.5)
        if any(f.stat().st_size != size for f, size in before.items()):
            return False
        now = stored()
        return all(now.get(f.stem) == _file_numbers(f) for f in before)

    try:
        wait_until(settled, 40, "the store to catch up with every file")
    except AssertionError:
        now = stored()
        for f in logdir.glob("*.out"):
            written, kept = _file_numbers(f), now.get(f.stem, [])
            assert kept == written, (f.name, len(written), len(kept))
        raise
    files = list(logdir.glob("*.out"))
    assert len(files) > 3  # the killed were replaced, and their files kept
    written_total = sum(len(_file_numbers(f)) for f in files)
    print(
        f"chaos: {killed_instances} instances and {killed_daemons} daemons SIGKILLed; "
        f"{written_total} numbered lines written by {len(files)} instances, all stored once"
    )
    assert written_total > 50_000
