"""Reading the log store: filters, grep, and batches with a cursor for following.

A query picks the sources (instance files) whose tags match, then walks the
lines in ``id`` order, which is ingest order and so time order: the collector
stamps lines with a time that never goes backwards. ``--since``/``--until``
become id bounds through the time index; ``--grep`` is a Python regex run
inside SQLite, behind a C-speed substring test when the pattern holds a
literal every match must contain.

A batch answers with ``cursor``: the id to continue after. When the batch is
complete it is the store's newest id at the time of the query (everything up
to it has been looked at), so a follower's next query only reads new lines.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln.errors import KilnError, UsageError
from kiln.logs.lines import level_name, level_number
from kiln.logs.store import connect

MAX_LIMIT = 100_000
QUERY_TIMEOUT = 30.0
_RELEASE_RE = re.compile(r"^r?(\d+)$")
_STREAMS = ("stdout", "stderr", "output")


@dataclass(frozen=True)
class LogQuery:
    env: str | None = None
    release: str | None = None  # "r3"
    instance: str | None = None  # an id, or the start of one
    stream: str | None = None
    since: float | None = None  # UNIX times
    until: float | None = None
    grep: str | None = None  # a Python regex, searched in the message or the JSON object
    level: int | None = None  # at least this level (lines of unknown level are left out)
    after: int = 0  # only lines with a greater id: the follower's cursor
    limit: int = 5000
    tail: int | None = None  # only the last N matching lines

    @classmethod
    def from_params(cls, q: Mapping[str, str]) -> LogQuery:
        """From the API's query string; every error is the user's, one line."""

        def number(key: str, kind: type[int] | type[float]) -> Any:
            if key not in q or q[key] == "":
                return None
            try:
                return kind(q[key])
            except ValueError:
                raise UsageError(f"{key} must be a number, not {q[key]!r}") from None

        query = cls(
            env=q.get("env") or None,
            release=normalize_release(q["release"]) if q.get("release") else None,
            instance=q.get("instance") or None,
            stream=q.get("stream") or None,
            since=number("since", float),
            until=number("until", float),
            grep=q.get("grep") or None,
            level=parse_level(q["level"]) if q.get("level") else None,
            after=number("after", int) or 0,
            limit=number("limit", int) or 5000,
            tail=number("tail", int),
        )
        query.check()
        return query

    def to_params(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key in ("env", "release", "instance", "stream", "grep"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        for key in ("since", "until", "tail"):
            value = getattr(self, key)
            if value is not None:
                out[key] = repr(value)
        if self.level is not None:
            out["level"] = str(self.level)
        out["after"] = str(self.after)
        out["limit"] = str(self.limit)
        return out

    def check(self) -> None:
        if self.grep is not None:
            compile_grep(self.grep)
        if self.stream is not None and self.stream not in _STREAMS:
            raise UsageError(f"stream must be one of {', '.join(_STREAMS)}, not {self.stream!r}")
        if not 0 < self.limit <= MAX_LIMIT:
            raise UsageError(f"limit must be between 1 and {MAX_LIMIT}")
        if self.tail is not None and self.tail < 0:
            raise UsageError("tail must not be negative")


def wait_param(q: Mapping[str, str]) -> float:
    """How long a follower's request may wait for new lines: 0 to 30 seconds."""
    try:
        return min(max(float(q.get("wait") or 0), 0.0), 30.0)
    except ValueError:
        raise UsageError(f"wait must be a number of seconds, not {q['wait']!r}") from None


def normalize_release(text: str) -> str:
    m = _RELEASE_RE.match(text.strip().lower())
    if not m:
        raise UsageError(f"a release is named like r3, not {text!r}")
    return f"r{int(m.group(1))}"


def parse_level(text: str) -> int:
    if text.isdigit():
        return int(text)
    level = level_number(text)
    if level is None:
        raise UsageError(
            f"unknown level {text!r}; use debug, info, warning, error or critical",
        )
    return level


def compile_grep(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--grep {pattern!r} is not a valid regular expression: {exc}") from None


@dataclass(frozen=True)
class LogLine:
    id: int
    ts: float
    app: str | None
    env: str | None
    release: str | None
    image: str | None
    instance: str
    stream: str
    level: int | None
    message: str
    fields: str | None  # the JSON object as the app wrote it

    def to_json(self) -> dict[str, Any]:
        fields: Any = None
        if self.fields is not None:
            try:
                fields = json.loads(self.fields)
            except ValueError:
                fields = self.fields
        return {
            "id": self.id,
            "time": datetime.fromtimestamp(self.ts, UTC).isoformat(timespec="microseconds"),
            "ts": self.ts,
            "app": self.app,
            "env": self.env,
            "release": self.release,
            "image": self.image,
            "instance": self.instance,
            "stream": self.stream,
            "level": level_name(self.level),
            "message": self.message,
            "fields": fields,
        }


_SOURCE_KEYS = ("app", "env", "release", "image", "instance", "stream")


@dataclass
class LogBatch:
    lines: list[LogLine] = field(default_factory=list)
    cursor: int = 0
    more: bool = False

    def to_json(self) -> dict[str, Any]:
        """Compact: each source's tags once, then rows that point at them."""
        sources: dict[str, dict[str, Any]] = {}
        rows = []
        for line in self.lines:
            key = f"{line.instance}/{line.stream}"
            if key not in sources:
                sources[key] = {k: getattr(line, k) for k in _SOURCE_KEYS}
            rows.append([line.id, line.ts, key, line.level, line.message, line.fields])
        return {"sources": sources, "lines": rows, "cursor": self.cursor, "more": self.more}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LogBatch:
        sources = data["sources"]
        lines = [
            LogLine(
                id=row[0],
                ts=row[1],
                level=row[3],
                message=row[4],
                fields=row[5],
                **{k: sources[row[2]][k] for k in _SOURCE_KEYS},
            )
            for row in data["lines"]
        ]
        return cls(lines, int(data["cursor"]), bool(data["more"]))


class LogReader:
    """Runs queries on its own read-only connection to the store."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def query(self, q: LogQuery, timeout: float = QUERY_TIMEOUT) -> LogBatch:
        if not self.path.exists():
            return LogBatch(cursor=q.after)
        db = connect(self.path, readonly=True)
        try:
            return _run(db, q, timeout)
        except sqlite3.OperationalError as exc:
            if "interrupted" in str(exc):
                raise KilnError(
                    f"the log query took longer than {timeout:.0f}s",
                    hint="narrow it with --since, --env, --release or --instance",
                ) from None
            raise KilnError(f"cannot read the log store {self.path}: {exc}") from exc
        finally:
            db.close()


def _run(db: sqlite3.Connection, q: LogQuery, timeout: float) -> LogBatch:
    deadline = time.monotonic() + timeout
    db.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
    db.execute("BEGIN")  # one snapshot for the bounds and the lines
    try:
        top = db.execute("SELECT MAX(id) FROM lines").fetchone()[0] or 0
        sources = _sources(db, q)
        if not sources or top <= q.after:
            return LogBatch(cursor=max(top, q.after))
        where = ["l.id > ?", "l.id <= ?"]
        args: list[Any] = [q.after, top]
        if len(sources) < _source_count(db):
            where.append(f"l.source IN ({','.join('?' * len(sources))})")
            args += list(sources)
        if q.since is not None:
            # Ingest times never go backwards, so the first line at or after
            # `since` in time order is also the first in id order.
            row = db.execute(
                "SELECT id FROM lines WHERE ts >= ? ORDER BY ts LIMIT 1", (q.since,)
            ).fetchone()
            if row is None:
                return LogBatch(cursor=top)
            where.append("l.id >= ?")
            args.append(row[0])
        if q.until is not None:
            row = db.execute(
                "SELECT id FROM lines WHERE ts <= ? ORDER BY ts DESC LIMIT 1", (q.until,)
            ).fetchone()
            if row is None:
                return LogBatch(cursor=top)
            where.append("l.id <= ?")
            args.append(row[0])
        if q.level is not None:
            where.append("l.level >= ?")
            args.append(q.level)
        if q.grep is not None:
            pattern = compile_grep(q.grep)
            search = pattern.search
            db.create_function(
                "kiln_grep", 1, lambda text: search(text) is not None, deterministic=True
            )
            hint = required_literal(q.grep)
            if hint is not None:
                literal, ignore_case = hint
                if ignore_case:
                    escaped = literal.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                    where.append("COALESCE(l.fields, l.message) LIKE ? ESCAPE '\\'")
                    args.append(f"%{escaped}%")
                else:
                    where.append("instr(COALESCE(l.fields, l.message), ?) > 0")
                    args.append(literal)
            where.append("kiln_grep(COALESCE(l.fields, l.message))")
        sql = (
            "SELECT l.id, l.ts, l.source, l.level, l.message, l.fields FROM lines l WHERE "
            + " AND ".join(where)
        )
        if q.tail is not None:
            rows = db.execute(sql + " ORDER BY l.id DESC LIMIT ?", (*args, q.tail)).fetchall()
            rows.reverse()
            more = False
        else:
            rows = db.execute(sql + " ORDER BY l.id LIMIT ?", (*args, q.limit + 1)).fetchall()
            more = len(rows) > q.limit
            del rows[q.limit :]
    finally:
        db.execute("COMMIT")
    lines = [LogLine(r[0], r[1], *sources[r[2]], r[3], r[4], r[5]) for r in rows]
    return LogBatch(lines, lines[-1].id if more else top, more)


_SourceTags = tuple[str | None, str | None, str | None, str | None, str, str]


def _sources(db: sqlite3.Connection, q: LogQuery) -> dict[int, _SourceTags]:
    sql = "SELECT id, app, env, release, image, instance, stream FROM sources WHERE 1=1"
    args: list[Any] = []
    if q.env is not None:
        sql += " AND env = ?"
        args.append(q.env)
    if q.release is not None:
        sql += " AND release = ?"
        args.append(q.release)
    if q.instance is not None:
        sql += " AND (instance = ? OR substr(instance, 1, ?) = ?)"
        args += [q.instance, len(q.instance), q.instance]
    if q.stream is not None:
        sql += " AND stream = ?"
        args.append(q.stream)
    return {r[0]: tuple(r[1:]) for r in db.execute(sql, args)}


def _source_count(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COUNT(*) FROM sources").fetchone()[0])


def follow_query(q: LogQuery, cursor: int) -> LogQuery:
    """The query a follower sends next: only lines after what it has seen."""
    return replace(q, after=max(q.after, cursor), tail=None, since=None)


# -- grep's literal prefilter ------------------------------------------------
_SPECIAL = set(".^$*+?{}[]\\|()")
_CLASS_ESCAPES = set("dDwWsSbBAZzGx0123456789uUN")


def required_literal(pattern: str) -> tuple[str, bool] | None:
    """The longest run of plain characters every match of ``pattern`` must
    contain, and whether the pattern ignores case; None when unsure.

    Deliberately conservative: anything inside a group, any alternation,
    and any character made optional by a quantifier ends the analysis of
    that part. A wrong answer would hide matching lines, a missing one only
    costs speed.
    """
    runs: list[str] = []
    run: list[str] = []
    ignore_case = False
    i = 0
    n = len(pattern)

    def cut() -> None:
        if run:
            runs.append("".join(run))
            run.clear()

    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                return None
            nxt = pattern[i + 1]
            if nxt in _CLASS_ESCAPES or nxt.isalpha():
                cut()
                i += 2
                # \x41, \u00e9 and the like: skip their digits with them.
                continue
            run.append(nxt)
            i += 2
            continue
        if c == "|":
            return None
        if c in "*?":
            if run:
                run.pop()
            cut()
            i += 1
            continue
        if c == "{":
            if run:
                run.pop()
            cut()
            close = pattern.find("}", i)
            i = n if close < 0 else close + 1
            continue
        if c == "+":
            cut()
            i += 1
            continue
        if c in ".^$":
            cut()
            i += 1
            continue
        if c == "[":
            cut()
            i = _skip_class(pattern, i)
            continue
        if c == "(":
            if pattern.startswith("(?", i):
                m = re.match(r"\(\?([aiLmsux]+)\)", pattern[i:])
                if m:
                    if "x" in m.group(1):
                        return None
                    ignore_case = ignore_case or "i" in m.group(1)
                    i += m.end()
                    continue
            cut()
            end = _skip_group(pattern, i)
            if end is None:
                return None
            i = end
            continue
        if c == ")":
            return None
        run.append(c)
        i += 1
    cut()
    if not runs:
        return None
    best = max(runs, key=len)
    if len(best) < 3 or (ignore_case and not best.isascii()):
        return None
    return best, ignore_case


def _skip_class(pattern: str, i: int) -> int:
    j = i + 1
    if j < len(pattern) and pattern[j] == "^":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1


def _skip_group(pattern: str, i: int) -> int | None:
    depth = 0
    j = i
    while j < len(pattern):
        c = pattern[j]
        if c == "\\":
            j += 2
            continue
        if c == "[":
            j = _skip_class(pattern, j)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None
