"""Times, durations and sizes as people type them on a command line or in an env var.

``--since 10m`` means ten minutes ago; ``--since 2026-01-02T03:04`` is an ISO
time (local time unless it names a zone); a bare number is a UNIX time, as
``kiln events --since`` always accepted. Sizes take decimal and binary units.
"""

from __future__ import annotations

import re
import time
from datetime import datetime

from kiln.errors import UsageError

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?$", re.IGNORECASE)
_SIZE_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_duration(text: str, where: str) -> float:
    """``"90s"``, ``"10m"``, ``"2h"``, ``"7d"`` → seconds."""
    m = _DURATION_RE.match(text.strip())
    if not m:
        raise UsageError(
            f"{where} must be a duration like '30s', '10m', '2h' or '7d', not {text!r}"
        )
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_time(text: str, where: str, now: float | None = None) -> float:
    """A duration ago, an ISO 8601 time or a UNIX time → a UNIX time."""
    raw = text.strip()
    if _DURATION_RE.match(raw):
        return (time.time() if now is None else now) - parse_duration(raw, where)
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        # A naive time is the machine's local time, like the times kiln prints.
        return datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise UsageError(
            f"{where} must be a duration ago like '10m' or '2h', or a time like "
            f"'2026-01-02T03:04:05', not {text!r}"
        ) from None


def parse_size(text: str, where: str) -> int:
    """``"1GiB"``, ``"500MB"``, ``"1048576"`` → bytes."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise UsageError(f"{where} must be a size like '500MB' or '1GiB', not {text!r}")
    unit = (m.group(2) or "b").lower()
    factor = 1
    if unit[0] in _SIZE_UNITS:
        factor = 1024 ** ("kmgt".index(unit[0]) + 1) if "i" in unit else _SIZE_UNITS[unit[0]]
    return int(float(m.group(1)) * factor)
