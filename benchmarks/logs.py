"""Logs: ingest rate from 10 chatty writers, grep over a million stored lines,
and how soon a follower sees a new line.

References, measured in the same run: the writers alone (how fast 10
processes can put lines into files with nothing reading them) and ``cat`` of
the same files for ingest; ``grep -c`` over the same lines in one flat file
for the queries. The collector runs in this process, as a thread, exactly as
in the daemon.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from benchmarks.common import Row, workdir
from kiln.logs.catalog import tags_from_name
from kiln.logs.collector import Collector
from kiln.logs.query import LogQuery, LogReader
from kiln.logs.store import Tags

WRITERS = 10
LINES = 100_000  # per writer: a million in all
WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
name, count = sys.argv[2].encode(), int(sys.argv[3])
for i in range(count):
    os.write(fd, b'%s 127.0.0.1 - - "GET /api/items/%d?page=3 HTTP/1.1" 200 512 in 12ms user=alice\n' % (name, i))
"""


class _Catalog:
    def tags(self, instance: str) -> Tags | None:
        found = tags_from_name(instance)
        return Tags("bench", found.env, found.release, "sha256:" + "0" * 64)

    def gone(self, instance: str) -> bool:
        return False


def _write(directory: Path) -> float:
    """Start the writers, wait for them; seconds taken."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(directory / f"bench-r1-{k:06x}.out"),
                f"w{k}",
                str(LINES),
            ]
        )
        for k in range(WRITERS)
    ]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit("a log writer failed")
    return time.perf_counter() - started


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _command(argv: list[str]) -> Callable[[], object]:
    # A pipe, not /dev/null: GNU grep stops at the first match when its
    # output goes nowhere.
    return lambda: subprocess.run(argv, check=True, stdout=subprocess.PIPE)


def _best(n: int, fn: Callable[[], object]) -> float:
    return min(_timed(fn) for _ in range(n))


def run(console: Console) -> list[Row]:
    tmp = workdir("logs")
    total = WRITERS * LINES

    console.print(f"  {WRITERS} writers alone, {total:,} lines into files…")
    alone_dir = tmp / "alone"
    alone_dir.mkdir()
    alone = _write(alone_dir)
    files = sorted(alone_dir.iterdir())
    cat = _best(3, lambda: subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL))

    console.print("  the same writers with the collector ingesting…")
    logdir = tmp / "instances"
    logdir.mkdir()
    collector = Collector(logdir, tmp / "logs.db", _Catalog())
    collector.start()
    started = time.perf_counter()
    _write(logdir)
    while True:
        with collector.snapshot() as c:
            if c.lines >= total:
                break
        time.sleep(0.005)
    ingest = time.perf_counter() - started
    with collector.snapshot() as c:
        stored = c.lines

    console.print("  a follower waiting for one new line, 20 times…")
    latencies = []
    path = logdir / "bench-r2-ffffff.out"
    for i in range(20):
        cursor = collector.reader.query(LogQuery(tail=0)).cursor
        with open(path, "a") as fh:
            fh.write(f"ping {i}\n")
        sent = time.perf_counter()
        while not collector.read(LogQuery(after=cursor, grep=f"^ping {i}$"), wait=2.0).lines:
            pass
        latencies.append(time.perf_counter() - sent)
        time.sleep(0.05)
    collector.stop()

    console.print("  grep over the million stored lines, and grep -c over a flat file…")
    flat = tmp / "flat.log"
    with open(flat, "wb") as out:
        for f in files:
            out.write(f.read_bytes())
    reader = LogReader(tmp / "logs.db")
    rows = [
        Row(
            f"logs: ingest, {WRITERS} writers, {total / 1e6:g}M lines",
            stored / ingest,
            "lines/s",
            total / alone,
            "the writers alone",
            f"count in {total:,} = count stored {stored:,}",
        ),
        Row(
            "logs: ingest vs reading the files",
            stored / ingest,
            "lines/s",
            total / cat,
            "cat of the same files",
        ),
    ]
    for label, pattern, expect in (
        ("a rare match", r"/api/items/4242\d\?", 10 * WRITERS),
        ("9% match, no narrowing literal", r"items/\d{2}7\d{2}\?", 9000 * WRITERS),
    ):
        found = _grep(reader, pattern)
        if found != expect:
            raise SystemExit(f"grep {pattern!r} found {found} lines, expected {expect}")
        seconds = _best(3, lambda pattern=pattern: _grep(reader, pattern))
        reference = _best(3, _command(["grep", "-cP", pattern, str(flat)]))
        rows.append(
            Row(
                f"logs: --grep over {stored / 1e6:g}M lines, {label}",
                seconds,
                "s",
                reference,
                "grep -cP over a flat file",
                f"{found} matches",
            )
        )
    latencies.sort()
    rows.append(
        Row(
            "logs: a new line reaches a follower (median)",
            latencies[len(latencies) // 2] * 1000,
            "ms",
            note=f"max {latencies[-1] * 1000:.0f} ms; the collector polls every 100 ms",
        )
    )
    rows.append(
        Row(
            f"logs: store size for {stored / 1e6:g}M lines",
            (tmp / "logs.db").stat().st_size / 1e6,
            "MB",
            sum(f.stat().st_size for f in files) / 1e6,
            "the raw files",
        )
    )
    return rows


def _grep(reader: LogReader, pattern: str) -> int:
    """Every matching line, fetched in the API's batches: what ``kiln logs --grep`` reads."""
    n, query = 0, LogQuery(grep=pattern, limit=100_000)
    while True:
        batch = reader.query(query)
        n += len(batch.lines)
        if not batch.more:
            return n
        query = LogQuery(grep=pattern, limit=100_000, after=batch.cursor)
