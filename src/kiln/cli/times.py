"""Options that take a point in time: ``10m`` (ago), ISO times, UNIX times."""

from __future__ import annotations

import click

from kiln.logs.timespec import parse_time


def to_time(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """A click callback: the option's value as a UNIX time; a bad value is a
    one-line kiln UsageError (exit 2)."""
    if value is None:
        return None
    return parse_time(value, f"--{param.name}")
