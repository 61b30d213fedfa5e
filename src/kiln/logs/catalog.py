"""Who wrote a log file: an instance's tags (app, env, release, image), and
whether it is gone, from the daemon's state.

Instance ids are ``<env>-r<N>-<hex>``, which names env and release even for
an instance the state has never heard of (a file left from another daemon's
time).
"""

from __future__ import annotations

import re
from typing import Protocol

from kiln.logs.store import Tags
from kiln.state import LIVE_INSTANCE, State

_ID_RE = re.compile(r"^(?P<env>[a-z0-9][a-z0-9_-]*?)-(?P<release>r\d+)-[0-9a-f]+$")


def tags_from_name(instance: str) -> Tags:
    m = _ID_RE.match(instance)
    return Tags(env=m.group("env"), release=m.group("release")) if m else Tags()


class Catalog(Protocol):
    def tags(self, instance: str) -> Tags | None:
        """The instance's tags, or None while they cannot be known (yet)."""

    def gone(self, instance: str) -> bool:
        """True once the instance will write no more."""


class StateCatalog:
    """Reads instances and their releases from the daemon's State."""

    def __init__(self, state: State) -> None:
        self.state = state

    def tags(self, instance: str) -> Tags | None:
        try:
            inst = self.state.instance(instance)
            release = self.state.release(inst.release_id)
        except KeyError:
            return None
        return Tags(app=release.app, env=release.env, release=release.name, image=release.image)

    def gone(self, instance: str) -> bool:
        try:
            return self.state.instance(instance).state not in LIVE_INSTANCE
        except KeyError:
            return True
