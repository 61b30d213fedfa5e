"""Central logs: every instance's output, collected, tagged, kept and searched.

Instances are disposable; their logs are not. The runtime points an
instance's stdout and stderr at files under ``KILN_HOME/logs/instances/``;
the daemon's collector (:mod:`kiln.logs.collector`) tails them into a SQLite
store of its own (:mod:`kiln.logs.store`), tagging each line with app, env,
release, image digest, instance and stream, and parsing JSON lines
(:mod:`kiln.logs.lines`). ``kiln logs`` queries it through the daemon
(:mod:`kiln.logs.query`).

Retention: ``KILN_LOG_RETENTION`` (default ``7d``) and ``KILN_LOG_MAX_BYTES``
(default ``1GiB``), read by :func:`retention_from_env`.

Loss window: none for a crash of the daemon or of an instance. The files are
the buffer: a line an app has written is in its file, and the store's
offsets move only together with the lines they cover. Lines still inside an
app's own buffers (say, Python's stdout buffer when it is not a terminal)
die with the app, which no collector can help.
"""

from __future__ import annotations

import logging
import os

from kiln.errors import UsageError
from kiln.logs.timespec import parse_duration, parse_size

DEFAULT_MAX_AGE = "7d"
DEFAULT_MAX_BYTES = "1GiB"

log = logging.getLogger("kiln.logs")


def retention_from_env() -> tuple[float, int]:
    """(max age in seconds, max bytes) from the environment; a bad value is
    reported in the daemon's log and replaced by its default."""
    out: list[float] = []
    for var, default, parse in (
        ("KILN_LOG_RETENTION", DEFAULT_MAX_AGE, parse_duration),
        ("KILN_LOG_MAX_BYTES", DEFAULT_MAX_BYTES, parse_size),
    ):
        raw = os.environ.get(var) or default
        try:
            out.append(parse(raw, var))
        except UsageError as exc:
            log.warning("%s; using %s", exc, default)
            out.append(parse(default, var))
    return out[0], int(out[1])
