"""Instance log files: how they are named, and reading the end of one.

The runtime gives an instance's stdout and stderr each a file of its own,
``<instance-id>.out`` and ``<instance-id>.err``, beside the ``<id>.log`` path
the engine names (a runtime that cannot split the streams writes that one,
both together). Separate files cost the order between the two streams,
which Python apps do not keep anyway (stdout is block-buffered off a
terminal), and give every line its stream.
"""

from __future__ import annotations

from pathlib import Path

STREAMS = {".out": "stdout", ".err": "stderr", ".log": "output"}
TAIL_BYTES = 16384


def stdout_path(log_path: Path) -> Path:
    return log_path.with_suffix(".out")


def stderr_path(log_path: Path) -> Path:
    return log_path.with_suffix(".err")


def split_name(name: str) -> tuple[str, str] | None:
    """``"staging-r3-ab12cd.err"`` → ``("staging-r3-ab12cd", "stderr")``."""
    for suffix, stream in STREAMS.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], stream
    return None


def _last_lines(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(fh.tell() - TAIL_BYTES, 0))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    return text.splitlines()[-n:] if n > 0 else []


def tail_lines(log_path: Path, n: int = 12) -> list[str]:
    """The last lines an instance wrote: stdout's, then stderr's (where a
    crash's traceback goes), sharing ``n`` lines with stderr favoured."""
    combined = _last_lines(log_path, n)
    out = _last_lines(stdout_path(log_path), n)
    err = _last_lines(stderr_path(log_path), n)
    if not out and not err:
        return combined
    take_out = min(len(out), max(n - len(err), n // 2))
    lines = (out[-take_out:] if take_out else []) + err[-(n - take_out) :]
    return lines[-n:]
