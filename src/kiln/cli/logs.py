"""``kiln logs``: what every instance wrote, merged in time order, kept after
the instances are gone; ``-f`` follows new lines as they come."""

from __future__ import annotations

import json
import os
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import click
from rich.text import Text

from kiln.cli.output import err, out
from kiln.cli.times import to_time
from kiln.daemon.client import DaemonClient
from kiln.errors import DaemonError, UsageError
from kiln.home import Home
from kiln.logs.lines import ERROR, WARNING, level_name
from kiln.logs.query import (
    LogBatch,
    LogLine,
    LogQuery,
    compile_grep,
    follow_query,
    normalize_release,
    parse_level,
)

FOLLOW_TAIL = 10  # what -f shows of the past when not told
FOLLOW_WAIT = 1.0  # how long one follow request waits for new lines
PALETTE = (
    "cyan",
    "magenta",
    "green",
    "yellow",
    "blue",
    "bright_cyan",
    "bright_magenta",
    "bright_green",
    "bright_yellow",
    "bright_blue",
)
_SKIP_FIELDS = {"msg", "message", "level", "levelname", "severity", "lvl"}


@click.command()
@click.option("--env", metavar="ENV", help="Only this environment.")
@click.option(
    "--release",
    metavar="rN",
    help="Only this release, e.g. r3 (of every environment, unless --env).",
)
@click.option("--instance", metavar="ID", help="Only this instance (an id, or the start of one).")
@click.option("--stream", type=click.Choice(["stdout", "stderr"]), help="Only this output stream.")
@click.option(
    "--since",
    metavar="TIME",
    callback=to_time,
    help="From this time: 10m or 2h ago, or 2026-01-02T03:04:05.",
)
@click.option(
    "--until", metavar="TIME", callback=to_time, help="Up to this time (same forms as --since)."
)
@click.option(
    "--grep",
    metavar="RE",
    help="Only lines matching this Python regular expression (message or JSON fields).",
)
@click.option(
    "--level",
    metavar="LEVEL",
    help="Only lines at this level or above: debug, info, warning, error, critical "
    "(lines whose level is unknown are left out).",
)
@click.option(
    "-n", "--tail", metavar="N", type=click.IntRange(min=0), help="Only the last N matching lines."
)
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help=f"Keep printing new lines as they come (starts with the last {FOLLOW_TAIL} "
    "unless --since or --tail says otherwise).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON lines: one object per log line with all its tags (unlike other "
    "commands' single document, so that it can stream).",
)
def logs(
    env: str | None,
    release: str | None,
    instance: str | None,
    stream: str | None,
    since: float | None,
    until: float | None,
    grep: str | None,
    level: str | None,
    tail: int | None,
    follow: bool,
    as_json: bool,
) -> None:
    """Log lines of every matching instance, merged in time order.

    Lines are kept after their instance is gone (by default for 7 days or up
    to 1 GiB, see KILN_LOG_RETENTION and KILN_LOG_MAX_BYTES), so the logs of a
    retired release or a crashed instance can still be read.
    """
    if grep is not None:
        compile_grep(grep)
    if follow and until is not None:
        raise UsageError("--until and -f do not go together: nothing new comes before a past time")
    if tail is None and follow and since is None:
        tail = FOLLOW_TAIL
    query = LogQuery(
        env=env,
        release=normalize_release(release) if release else None,
        instance=instance,
        stream=stream,
        since=since,
        until=until,
        grep=grep,
        level=parse_level(level) if level else None,
        tail=tail,
    )
    query.check()
    client = DaemonClient(Home.from_env())
    client.ensure()
    printer = Printer(as_json)
    try:
        cursor = 0
        for batch in _pages(client, query):
            printer.show(batch.lines)
            cursor = batch.cursor
        if follow:
            for batch in _follow(client, follow_query(query, cursor)):
                printer.show(batch.lines)
    except KeyboardInterrupt:
        pass  # how one stops following
    except BrokenPipeError:
        # The reader (say, head) has had enough; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _get(client: DaemonClient, query: LogQuery, wait: float = 0.0) -> LogBatch:
    params = query.to_params()
    if wait:
        params["wait"] = str(wait)
    return LogBatch.from_json(client.get("/logs?" + urlencode(params)))


def _pages(client: DaemonClient, query: LogQuery) -> Iterator[LogBatch]:
    while True:
        batch = _get(client, query)
        yield batch
        if not batch.more:
            return
        query = replace(query, after=batch.cursor, tail=None)


def _follow(client: DaemonClient, query: LogQuery) -> Iterator[LogBatch]:
    while True:
        try:
            batch = _get(client, query, FOLLOW_WAIT)
        except DaemonError:
            # A daemon that died is started again; the logs wait in their files.
            err.print("[yellow]the daemon went away; starting it again to carry on[/]")
            time.sleep(0.5)
            client.ensure()
            continue
        yield batch
        query = replace(query, after=batch.cursor)


class Printer:
    """JSON lines, colored lines on a terminal, or plain lines for a pipe."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.rich = out.is_terminal and not as_json
        self.today = datetime.now().date()

    def show(self, lines: list[LogLine]) -> None:
        if not lines:
            return
        if self.as_json:
            sys.stdout.write("".join(json.dumps(line.to_json()) + "\n" for line in lines))
            sys.stdout.flush()
        elif self.rich:
            for line in lines:
                out.print(self._rich(line), soft_wrap=True)
        else:
            sys.stdout.write("".join(self._plain(line) + "\n" for line in lines))
            sys.stdout.flush()

    def _when(self, ts: float) -> str:
        when = datetime.fromtimestamp(ts)
        clock = when.strftime("%H:%M:%S.") + f"{when.microsecond // 1000:03d}"
        return clock if when.date() == self.today else f"{when:%Y-%m-%d} {clock}"

    def _text(self, line: LogLine) -> str:
        if line.fields is None:
            return line.message
        try:
            fields: Any = json.loads(line.fields)
        except ValueError:
            return line.message
        extra = " ".join(
            f"{k}={v if isinstance(v, str) else json.dumps(v)}"
            for k, v in fields.items()
            if k not in _SKIP_FIELDS
        )
        level = level_name(line.level)
        head = f"{level.upper()} " if level else ""
        return f"{head}{line.message}" + (f"  {extra}" if extra else "")

    def _plain(self, line: LogLine) -> str:
        return f"{self._when(line.ts)} {line.instance} {self._text(line)}"

    def _rich(self, line: LogLine) -> Text:
        color = PALETTE[zlib.crc32(line.instance.encode()) % len(PALETTE)]
        style = ""
        if line.level is not None and line.level >= ERROR:
            style = "red"
        elif line.level is not None and line.level >= WARNING:
            style = "yellow"
        return Text.assemble(
            (self._when(line.ts) + " ", "dim"),
            (line.instance, color),
            " ",
            (self._text(line), style),
        )
