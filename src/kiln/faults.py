"""Named fault points, for proving crash safety.

``KILN_FAULT=name`` makes the process SIGKILL itself when it reaches the
point of that name: no cleanup handler runs, exactly as if the machine lost
power there. Tests use it to show that state stays consistent wherever kiln
dies. Unset (always, in normal use), a fault point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    if os.environ.get("KILN_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
