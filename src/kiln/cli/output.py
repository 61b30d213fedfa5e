"""Printing for the CLI: JSON for scripts on stdout, rich for people, errors as one line."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from rich.console import Console

# Off a terminal nobody reads at 80 columns: don't cut digests in half.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(
    stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 200
)


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def short(digest: str | None, n: int = 12) -> str:
    return digest.removeprefix("sha256:")[:n] if digest else "-"


def ago(iso_time: str | None) -> str:
    if not iso_time:
        return "-"
    try:
        then = datetime.fromisoformat(iso_time.replace("Z", "+00:00"))
    except ValueError:
        return iso_time
    seconds = (datetime.now(UTC) - then).total_seconds()
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(max(seconds, 0))}s ago"


@contextmanager
def steps(enabled: bool) -> Iterator[Any]:
    """A spinner naming the current step on a terminal; plain lines otherwise."""
    if not enabled:
        yield lambda _msg: None
        return
    if err.is_terminal:
        with err.status("starting") as status:
            yield lambda msg: status.update(f"[bold]{msg}")
    else:
        yield lambda msg: err.print(f"• {msg}")
