"""Giving disk space back from log files an app still writes to.

An instance's log file is opened by the app in append mode and grows for as
long as it runs; it cannot be rotated behind the app's back without losing
lines. Once its head is safely in the log store, the collector punches a
hole there (``fallocate(PUNCH_HOLE | KEEP_SIZE)``): the blocks go back to
the filesystem while the file keeps its size, so offsets stay valid and the
app's appends carry on untouched. Reads of a hole return zeros; the store
never reads below its committed offset.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
BLOCK = 4096


def _fallocate() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


_FALLOCATE = _fallocate()


def punch(path: Path, length: int) -> bool:
    """Free the disk blocks of the first ``length`` bytes (rounded down to a
    block) of ``path``. False when this system or filesystem cannot."""
    length -= length % BLOCK
    if _FALLOCATE is None or length <= 0:
        return False
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        return bool(_FALLOCATE(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, length) == 0)
    finally:
        os.close(fd)
