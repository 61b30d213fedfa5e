"""Log collection without a daemon: parsing, the store, the collector, queries,
retention and crash safety, with real writer processes and real files."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.errors import KilnError, UsageError
from kiln.logs import retention_from_env
from kiln.logs.catalog import tags_from_name
from kiln.logs.collector import KEEP_TAIL, PUNCH_STEP, Collector
from kiln.logs.files import tail_lines
from kiln.logs.lines import CRITICAL, DEBUG, ERROR, INFO, WARNING, parse_lines
from kiln.logs.query import LogBatch, LogQuery, LogReader, compile_grep, required_literal
from kiln.logs.store import LogStore, Tags
from kiln.logs.timespec import parse_duration, parse_size, parse_time
from kit import run_kiln

WRITER = r"""
import os, sys, time
path, name, count, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for i in range(count):
    os.write(fd, b"%s line %d GET /items?page=3 200 12ms user=alice\n" % (name.encode(), i))
    if pause and i % 100 == 0:
        time.sleep(pause)
"""

# The collector alone in a process of its own, so that it can be SIGKILLed.
COLLECTOR = r"""
import sys
from pathlib import Path
from kiln.logs.catalog import tags_from_name
from kiln.logs.collector import Collector

class Catalog:
    def tags(self, instance):
        return tags_from_name(instance)
    def gone(self, instance):
        return False

Collector(Path(sys.argv[1]), Path(sys.argv[2]), Catalog(), poll=0.01, scan_every=0.05).run()
"""


class Catalog:
    """Tags from the instance's name; gone when a test says so."""

    def __init__(self) -> None:
        self.dead: set[str] = set()

    def tags(self, instance: str) -> Tags | None:
        found = tags_from_name(instance)
        return Tags("app", found.env, found.release, "sha256:" + "ab" * 32)

    def gone(self, instance: str) -> bool:
        return instance in self.dead


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    d = tmp_path / "instances"
    d.mkdir()
    return d


@pytest.fixture
def collector(logdir: Path, tmp_path: Path) -> Iterator[Collector]:
    c = Collector(logdir, tmp_path / "logs.db", Catalog(), poll=0.01, scan_every=0.05)
    yield c
    c.stop()


def drain(c: Collector, rounds: int = 3) -> None:
    """Run rounds by hand until nothing new comes (the collector's thread is not started)."""
    quiet = 0
    while quiet < rounds:
        stored, busy = c.run_once()
        quiet = 0 if stored or busy else quiet + 1
        c._scanned = 0.0  # look for new files every round


def stored(c: Collector, **filters: object) -> list[str]:
    lines: list[str] = []
    query = LogQuery(**filters, limit=100_000)
    while True:
        batch = c.reader.query(query)
        lines += [line.message for line in batch.lines]
        if not batch.more:
            return lines
        query = LogQuery(**filters, limit=100_000, after=batch.cursor)


def writers(logdir: Path, n: int, count: int, pause: float = 0.0) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(logdir / f"staging-r1-{k:06x}.{'out' if k % 2 else 'err'}"),
                f"w{k}",
                str(count),
                str(pause),
            ]
        )
        for k in range(n)
    ]


# -- lines ---------------------------------------------------------------------
def test_lines_json_fields_and_levels() -> None:
    text = "\n".join(
        [
            '{"level": "warning", "msg": "disk low", "free": 3}',
            '{"levelname": "ERROR", "message": "boom", "user": "ann"}',
            '{"severity": "DEBUG", "message": {"nested": true}}',
            '{"no": "message here"}',
            "[2026-01-02 03:04:05 +0000] [7] [ERROR] Exception in worker process",
            "[2026-01-02 03:04:05 +0000] [7] [INFO] Booting worker with pid: 8",
            "WARNING:root:careful",
            'ts=1 level=error msg="oops"',
            "Traceback (most recent call last):",
            "CRITICAL: the end",
            "127.0.0.1 - - GET / 200",
            "[1, 2, 3]",
            "{not json",
            "windows line\r",
            "",
        ]
    )
    rows = parse_lines(text + "\n", 5.0, 7)
    assert [(r[2], r[3]) for r in rows] == [
        (WARNING, "disk low"),
        (ERROR, "boom"),
        (DEBUG, '{"nested": true}'),
        (None, '{"no": "message here"}'),
        (ERROR, "[2026-01-02 03:04:05 +0000] [7] [ERROR] Exception in worker process"),
        (INFO, "[2026-01-02 03:04:05 +0000] [7] [INFO] Booting worker with pid: 8"),
        (WARNING, "WARNING:root:careful"),
        (ERROR, 'ts=1 level=error msg="oops"'),
        (ERROR, "Traceback (most recent call last):"),
        (CRITICAL, "CRITICAL: the end"),
        (None, "127.0.0.1 - - GET / 200"),
        (None, "[1, 2, 3]"),
        (None, "{not json"),
        (None, "windows line"),
        (None, ""),
    ]
    assert rows[0][4] == '{"level": "warning", "msg": "disk low", "free": 3}'  # kept whole
    assert rows[4][4] is None and all(r[0] == 5.0 and r[1] == 7 for r in rows)


def test_times_sizes_and_bad_input() -> None:
    now = 1_000_000.0
    assert parse_time("10m", "--since", now) == now - 600
    assert parse_time("2h", "--since", now) == now - 7200
    assert parse_time("1.5d", "--since", now) == now - 1.5 * 86400
    assert parse_time("1700000000.5", "--since") == 1700000000.5
    assert parse_time("2026-01-02T03:04:05Z", "--since") == 1767323045.0
    assert parse_duration("7d", "x") == 7 * 86400
    assert parse_size("1GiB", "x") == 1 << 30
    assert parse_size("500MB", "x") == 500_000_000
    assert parse_size("4096", "x") == 4096
    for bad in ("yesterday", "10 minutes", "-5m"):
        with pytest.raises(UsageError, match="--since must be a duration ago") as info:
            parse_time(bad, "--since")
        assert info.value.exit_code == 2
    with pytest.raises(UsageError, match="size like"):
        parse_size("lots", "KILN_LOG_MAX_BYTES")
    with pytest.raises(UsageError, match="not a valid regular expression"):
        compile_grep("(unclosed")
    with pytest.raises(UsageError, match="a release is named like r3"):
        LogQuery.from_params({"release": "latest"})
    with pytest.raises(UsageError, match="unknown level 'loud'"):
        LogQuery.from_params({"level": "loud"})
    with pytest.raises(UsageError, match="after must be a number"):
        LogQuery.from_params({"after": "x"})


def test_retention_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert retention_from_env() == (7 * 86400, 1 << 30)
    monkeypatch.setenv("KILN_LOG_RETENTION", "36h")
    monkeypatch.setenv("KILN_LOG_MAX_BYTES", "200MiB")
    assert retention_from_env() == (36 * 3600, 200 << 20)
    monkeypatch.setenv("KILN_LOG_RETENTION", "forever")  # bad: logged, default kept
    assert retention_from_env()[0] == 7 * 86400


@pytest.mark.parametrize(
    ("pattern", "literal"),
    [
        ("timeout", ("timeout", False)),
        (r"GET /api/\d+ 500", ("GET /api/", False)),
        ("colou?r error", ("r error", False)),
        ("(?i)Connection reset", ("Connection reset", True)),
        ("a|bcdef", None),
        ("(optional)?xy", None),
        (r"\d+\.\d+", None),
        ("user=[a-z]+ login", (" login", False)),
        (r"price \$100", ("price $100", False)),
        ("ab{2}cdef", ("cdef", False)),
        ("(?x) spaced out", None),
    ],
)
def test_grep_prefilter_literals(pattern: str, literal: tuple[str, bool] | None) -> None:
    assert required_literal(pattern) == literal


def test_grep_prefilter_never_hides_a_match() -> None:
    texts = [
        "colour error at x",
        "color error",
        "GET /api/12 500",
        "CONNECTION RESET by peer",
        "user=bob login ok",
        "price $100",
        "abbcdef",
    ]
    patterns = ["colou?r error", r"GET /api/\d+ 500", "(?i)connection reset", "user=[a-z]+ login"]
    patterns += [r"price \$100", "ab{2}cdef", "(?i)ERROR", "o+r e"]
    for pattern in patterns:
        hint = required_literal(pattern)
        for text in texts:
            if re.search(pattern, text) and hint is not None:
                literal, ignore_case = hint
                haystack, needle = (
                    (text.lower(), literal.lower()) if ignore_case else (text, literal)
                )
                assert needle in haystack, (pattern, text)


# -- collector and store -------------------------------------------------------
def test_ten_writers_every_line_stored_once_and_fast(
    logdir: Path, collector: Collector, tmp_path: Path
) -> None:
    count = 20_000
    collector.start()
    started = time.perf_counter()
    procs = writers(logdir, 10, count)
    for p in procs:
        assert p.wait(30) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with collector.snapshot() as c:
            if c.lines >= 10 * count:
                break
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    rate = 10 * count / elapsed
    print(f"ingested {10 * count} lines from 10 writers in {elapsed:.2f}s: {rate:,.0f} lines/s")
    db = sqlite3.connect(tmp_path / "logs.db")
    total, distinct = db.execute("SELECT COUNT(*), COUNT(DISTINCT message) FROM lines").fetchone()
    assert total == distinct == 10 * count
    assert rate >= 50_000
    # Every line carries its tags; stdout and stderr are told apart.
    assert len(stored(collector, env="staging", release="r1", stream="stderr")) == 5 * count
    with collector.snapshot() as c:
        assert c.by_tag == {("staging", "stdout"): 5 * count, ("staging", "stderr"): 5 * count}


def test_collector_killed_at_random_resumes_without_loss_or_duplicates(
    logdir: Path, tmp_path: Path
) -> None:
    db_path = tmp_path / "logs.db"

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", COLLECTOR, str(logdir), str(db_path)])

    count = 30_000
    procs = writers(logdir, 4, count, pause=0.01)
    proc = start()
    kills = 0
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.15 + 0.1 * (kills % 3))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            proc = start()
        deadline = time.monotonic() + 20
        total = 0
        while time.monotonic() < deadline:
            try:
                with sqlite3.connect(db_path) as db:
                    total = db.execute("SELECT COUNT(*) FROM lines").fetchone()[0]
            except sqlite3.OperationalError:
                pass
            if total >= 4 * count:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
        for p in procs:
            p.kill()
            p.wait()
    assert kills >= 8
    db = sqlite3.connect(db_path)
    total, distinct = db.execute("SELECT COUNT(*), COUNT(DISTINCT message) FROM lines").fetchone()
    assert (total, distinct) == (4 * count, 4 * count)
    numbers = sorted(
        int(m.split()[2])
        for (m,) in db.execute("SELECT message FROM lines WHERE message LIKE 'w0 %'")
    )
    assert numbers == list(range(count))
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_partial_lines_wait_for_their_end_unless_the_instance_is_gone(
    logdir: Path, tmp_path: Path
) -> None:
    catalog = Catalog()
    c = Collector(logdir, tmp_path / "logs.db", catalog, idle_close=0.2)
    try:
        live = logdir / "staging-r1-aaaaaa.out"
        with open(live, "ab", buffering=0) as fh:
            fh.write(b"first\nhalf a ")
            drain(c)
            time.sleep(0.3)
            drain(c)  # idle, but its instance lives: the half line waits
            assert stored(c) == ["first"]
            fh.write(b"line\n")
        drain(c)
        assert stored(c) == ["first", "half a line"]
        dead = logdir / "staging-r1-bbbbbb.err"
        dead.write_bytes(b"Traceback (most recent call last):\nSystemExit: no newline at the end")
        drain(c)
        catalog.dead.add("staging-r1-bbbbbb")
        time.sleep(0.3)
        drain(c)
        assert stored(c, instance="staging-r1-bbbbbb") == [
            "Traceback (most recent call last):",
            "SystemExit: no newline at the end",
        ]
        assert stored(c, level=ERROR) == ["Traceback (most recent call last):"]
        assert "staging-r1-bbbbbb.err" not in c.tails  # drained and closed
        # A huge line without a newline is stored in pieces, not held forever.
        (logdir / "staging-r1-cccccc.out").write_bytes(b"x" * (200 << 10))
        drain(c)
        pieces = stored(c, instance="staging-r1-cccccc")
        assert len(pieces) == 3 and "".join(pieces) == "x" * (192 << 10)
    finally:
        c.stop()


def test_queries_filter_merge_and_page(logdir: Path, collector: Collector) -> None:
    a = logdir / "staging-r1-aaaaaa.out"
    b = logdir / "staging-r2-bbbbbb.err"
    p = logdir / "production-r1-cccccc.out"
    a.write_text("a1\n")
    drain(collector)
    b.write_text('{"level": "error", "msg": "b1 failed", "order": 12345}\n')
    drain(collector)
    p.write_text("p1 [WARNING] slow\n")
    drain(collector)
    with open(a, "a") as fh:
        fh.write("a2\n")
    drain(collector)
    assert stored(collector) == ["a1", "b1 failed", "p1 [WARNING] slow", "a2"]  # time order
    assert stored(collector, env="staging") == ["a1", "b1 failed", "a2"]
    assert stored(collector, release="r1") == ["a1", "p1 [WARNING] slow", "a2"]
    assert stored(collector, instance="staging-r2") == ["b1 failed"]  # an id's start
    assert stored(collector, level=WARNING) == ["b1 failed", "p1 [WARNING] slow"]
    assert stored(collector, grep="order.*12345") == ["b1 failed"]  # JSON fields searchable
    assert stored(collector, grep="(?i)P1 \\[warn") == ["p1 [WARNING] slow"]
    assert stored(collector, tail=2) == ["p1 [WARNING] slow", "a2"]
    assert stored(collector, env="nowhere") == []
    # Paging: small batches with a cursor reach every line once.
    seen: list[str] = []
    query = LogQuery(limit=1)
    while True:
        batch = collector.reader.query(query)
        seen += [line.message for line in batch.lines]
        if not batch.more:
            break
        query = LogQuery(limit=1, after=batch.cursor)
    assert seen == ["a1", "b1 failed", "p1 [WARNING] slow", "a2"]
    # Time bounds: ingest times never go backwards.
    everything = collector.reader.query(LogQuery())
    ts = [line.ts for line in everything.lines]
    assert ts == sorted(ts)
    middle = collector.reader.query(LogQuery(since=ts[1], until=ts[2]))
    assert [line.message for line in middle.lines] == ["b1 failed", "p1 [WARNING] slow"]
    # The API's compact shape round-trips, tags and all.
    back = LogBatch.from_json(everything.to_json())
    assert back == everything
    line = back.lines[1].to_json()
    assert line["fields"] == {"level": "error", "msg": "b1 failed", "order": 12345}
    assert (line["env"], line["release"], line["stream"], line["level"]) == (
        "staging",
        "r2",
        "stderr",
        "error",
    )
    assert line["image"] == "sha256:" + "ab" * 32 and line["app"] == "app"
    # A follower's cursor is the newest id: nothing is read twice.
    assert collector.reader.query(LogQuery(after=everything.cursor)).lines == []


def test_follow_waits_for_new_lines(logdir: Path, collector: Collector) -> None:
    collector.start()
    path = logdir / "staging-r1-aaaaaa.out"
    path.write_text("old\n")
    time.sleep(0.3)
    first = collector.read(LogQuery())
    assert [line.message for line in first.lines] == ["old"]
    started = time.monotonic()
    got = collector.read(LogQuery(after=first.cursor), wait=2.0)
    assert got.lines == [] and time.monotonic() - started >= 1.9
    with open(path, "a") as fh:
        fh.write("new\n")
        fh.flush()
        written = time.monotonic()
        got = collector.read(LogQuery(after=first.cursor), wait=5.0)
    assert [line.message for line in got.lines] == ["new"]
    assert time.monotonic() - written < 1.0


def test_restart_replaced_and_truncated_files(logdir: Path, tmp_path: Path) -> None:
    path = logdir / "staging-r1-aaaaaa.out"
    path.write_text("one\ntwo\n")
    c = Collector(logdir, tmp_path / "logs.db", Catalog())
    drain(c)
    c.stop()
    with open(path, "a") as fh:
        fh.write("three\n")
    c = Collector(logdir, tmp_path / "logs.db", Catalog())  # resumes at its offset
    try:
        drain(c)
        assert stored(c) == ["one", "two", "three"]
        path.write_text("new file\n")  # truncated (same inode, smaller): all new
        drain(c)
        assert stored(c) == ["one", "two", "three", "new file"]
        path.unlink()
        path.write_text("another\nfile\n")  # replaced: a new inode
        c._full_scanned = 0.0
        drain(c)
        assert stored(c)[-2:] == ["another", "file"]
    finally:
        c.stop()


def test_retention_by_age_and_size_keeps_ids_growing(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs.db")
    src = store.add_source("x.out", "x", "stdout", Tags(), None)
    now = time.time()
    old = [(now - 10 * 86400, src.id, None, f"old {i}", None) for i in range(1000)]
    new = [(now, src.id, None, f"new {i} " + "y" * 200, None) for i in range(20_000)]
    store.commit(old, {src.id: 100})
    store.commit(new, {src.id: 200})
    assert store.expire(7 * 86400, 1 << 30, now) == 1000
    reader = LogReader(tmp_path / "logs.db")
    assert reader.query(LogQuery(limit=1)).lines[0].message.startswith("new 0 ")
    cap = 1 << 20
    assert store.used_bytes() > cap
    deleted = store.expire(7 * 86400, cap, now)
    assert store.used_bytes() <= cap and 0 < deleted < 20_000
    newest = reader.query(LogQuery(tail=1)).lines[0]
    assert newest.message.startswith("new 19999 ")
    store.expire(0, cap, now + 1)  # everything goes …
    store.commit([(now + 2, src.id, None, "after", None)], {src.id: 300})
    after = reader.query(LogQuery()).lines
    assert [line.message for line in after] == ["after"]
    assert after[0].id > newest.id  # … but a follower's cursor stays valid
    store.close()


def test_stored_heads_of_big_files_give_disk_back(logdir: Path, tmp_path: Path) -> None:
    c = Collector(logdir, tmp_path / "logs.db", Catalog(), retention_every=0)
    path = logdir / "staging-r1-aaaaaa.err"
    try:
        block = b"".join(b"line %07d %s\n" % (i, b"z" * 80) for i in range(120_000))
        path.write_bytes(block)
        size = path.stat().st_size
        assert size > PUNCH_STEP + KEEP_TAIL
        drain(c)
        c.retain()
        assert path.stat().st_size == size  # offsets stay valid
        on_disk = path.stat().st_blocks * 512
        assert on_disk <= PUNCH_STEP + KEEP_TAIL + 2 * 4096 and on_disk < size / 4
        assert tail_lines(logdir / "staging-r1-aaaaaa.log", 2)[-1].startswith("line 0119999 ")
        with open(path, "ab") as fh:
            fh.write(b"after the hole\n")
        drain(c)
        assert stored(c, tail=1) == ["after the hole"]
        assert len(stored(c)) == 120_001
    finally:
        c.stop()
    # A store lost (deleted by hand) reads the file again, skipping the hole
    # and the line it cut, not a flood of zeros.
    for leftover in tmp_path.glob("logs.db*"):
        leftover.unlink()
    c = Collector(logdir, tmp_path / "logs.db", Catalog())
    try:
        drain(c)
        again = stored(c)
        assert again[-1] == "after the hole" and "\0" not in "".join(again)
        assert again[0].startswith("line 0") and 10_000 < len(again) < 120_000
    finally:
        c.stop()


def test_gone_instances_stay_queryable_after_their_files_expire(
    logdir: Path, tmp_path: Path
) -> None:
    catalog = Catalog()
    c = Collector(logdir, tmp_path / "logs.db", catalog, idle_close=0.0, max_age=3600)
    try:
        path = logdir / "staging-r1-aaaaaa.out"
        path.write_text("last words\n")
        catalog.dead.add("staging-r1-aaaaaa")
        drain(c)
        os.utime(path, (time.time() - 7200, time.time() - 7200))
        c.retain()
        assert not path.exists()
        assert stored(c, release="r1") == ["last words"]
    finally:
        c.stop()


def test_tail_lines_of_split_streams(tmp_path: Path) -> None:
    base = tmp_path / "i.log"
    assert tail_lines(base) == []
    (tmp_path / "i.out").write_text("boom: DATABASE_URL is not set\n")
    assert tail_lines(base) == ["boom: DATABASE_URL is not set"]
    (tmp_path / "i.err").write_text("".join(f"err {i}\n" for i in range(20)))
    lines = tail_lines(base, 12)
    assert lines[0] == "boom: DATABASE_URL is not set" and lines[-1] == "err 19"
    assert len(lines) == 12


def test_query_timeout_is_one_clear_error(logdir: Path, collector: Collector) -> None:
    (logdir / "staging-r1-aaaaaa.out").write_text("".join(f"{'a' * 8}\n" for _ in range(20_000)))
    drain(collector)
    with pytest.raises(KilnError, match="took longer than 0s") as info:
        collector.reader.query(LogQuery(grep="(a*)*b"), timeout=0.0)
    assert info.value.hint and "--since" in info.value.hint


def test_cli_refuses_bad_flags_with_one_line(tmp_path: Path) -> None:
    for args, message in [
        (("--since", "last tuesday"), "--since must be a duration ago like '10m'"),
        (("--grep", "(oops"), "is not a valid regular expression"),
        (("--level", "loud"), "unknown level 'loud'"),
        (("--release", "newest"), "a release is named like r3"),
        (("-f", "--until", "1h"), "--until and -f do not go together"),
    ]:
        result = run_kiln("logs", *args)
        assert result.code == 2, result
        assert message in result.err and len(result.err.strip().splitlines()) == 1
    assert "JSON lines" in run_kiln("logs", "--help").out
