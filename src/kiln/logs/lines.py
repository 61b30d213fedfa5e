"""What one log line says: its level, its message and, for JSON lines, its fields.

A line that is a JSON object is structured: its level comes from ``level``,
``levelname`` or ``severity``, its message from ``msg`` or ``message``, and
the whole object is kept so every field stays searchable. Any other line is
plain text; its level is guessed from the usual markers (gunicorn's
``[ERROR]``, logging's ``WARNING:``, logfmt's ``level=warn``, a Python
traceback) in its first characters, or left unknown.

This is the collector's hot path: one call per chunk read, a few string
operations per line, and a regex only over a line's head.
"""

from __future__ import annotations

import json
import re
from typing import Any

DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50
LEVEL_NAMES = {
    DEBUG: "debug",
    INFO: "info",
    WARNING: "warning",
    ERROR: "error",
    CRITICAL: "critical",
}
_LEVEL_WORDS = {
    "trace": DEBUG,
    "debug": DEBUG,
    "info": INFO,
    "information": INFO,
    "notice": INFO,
    "warn": WARNING,
    "warning": WARNING,
    "error": ERROR,
    "err": ERROR,
    "critical": CRITICAL,
    "crit": CRITICAL,
    "fatal": CRITICAL,
    "alert": CRITICAL,
    "emergency": CRITICAL,
    "panic": CRITICAL,
}
# Separate small patterns behind cheap C-speed checks: one regex with all the
# alternatives costs ten times more per line.
_BRACKET = re.compile(r"\[(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\]")
_LEADING = re.compile(r"(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\b")
_LOGFMT = re.compile(r"\blevel=\"?([A-Za-z]+)")
_INITIALS = frozenset("DIWECF")
_HEAD = 120  # the markers sit at a line's start; never scan a long line whole
_LEVEL_KEYS = ("level", "levelname", "severity", "lvl")
_MESSAGE_KEYS = ("msg", "message")

Row = tuple[float, int, int | None, str, str | None]  # ts, source, level, message, fields


def level_number(name: str) -> int | None:
    """``"warn"`` → 30; ``"nonsense"`` → None."""
    return _LEVEL_WORDS.get(name.strip().lower())


def level_name(level: int | None) -> str | None:
    if level is None:
        return None
    return LEVEL_NAMES.get(level) or LEVEL_NAMES[min(LEVEL_NAMES, key=lambda n: abs(n - level))]


def _structured(line: str) -> tuple[int | None, str] | None:
    try:
        obj: Any = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    level = None
    for key in _LEVEL_KEYS:
        value = obj.get(key)
        if isinstance(value, str):
            level = _LEVEL_WORDS.get(value.lower())
            break
    message = line
    for key in _MESSAGE_KEYS:
        if key in obj:
            value = obj[key]
            message = value if isinstance(value, str) else json.dumps(value)
            break
    return level, message


def plain_level(line: str) -> int | None:
    m = _BRACKET.search(line, 0, _HEAD)
    if m is not None:
        return _LEVEL_WORDS[m.group(1).lower()]
    if line[:1] in _INITIALS:
        m = _LEADING.match(line)
        if m is not None:
            return _LEVEL_WORDS[m.group(1).lower()]
    if line.find("level=", 0, _HEAD) >= 0:
        m = _LOGFMT.search(line, 0, _HEAD)
        if m is not None:
            return _LEVEL_WORDS.get(m.group(1).lower())
    if line.startswith("Traceback (most recent call last)"):
        return ERROR
    return None


def parse_lines(text: str, ts: float, source: int) -> list[Row]:
    """Rows for ``text``, complete lines each ended by a newline (the last may lack one)."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    rows: list[Row] = []
    append = rows.append
    level_of = plain_level
    for line in lines:
        if line.endswith("\r"):
            line = line[:-1]
        if line.startswith("{"):
            parsed = _structured(line)
            if parsed is not None:
                append((ts, source, parsed[0], parsed[1], line))
                continue
        append((ts, source, level_of(line), line, None))
    return rows
