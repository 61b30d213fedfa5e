"""Runtimes: where instances run. A runtime is a plugin behind the small
:class:`~kiln.runtime.base.Runtime` interface, registered by name; built-ins
register themselves here exactly as a third party would, through the
``kiln.runtimes`` entry-point group."""

from __future__ import annotations

from importlib.metadata import entry_points

from kiln.errors import UsageError
from kiln.runtime.base import InstanceHandle, InstanceSpec, Runtime

_REGISTRY: dict[str, type[Runtime]] = {}


def register(cls: type[Runtime]) -> type[Runtime]:
    _REGISTRY[cls.name] = cls
    return cls


def get_runtime(name: str) -> Runtime:
    if name not in _REGISTRY:
        for ep in entry_points(group="kiln.runtimes"):
            if ep.name == name:
                register(ep.load())
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UsageError(f"unknown runtime {name!r}", hint=f"known runtimes: {known}")
    return _REGISTRY[name]()


from kiln.runtime import local  # noqa: E402  (built-ins register on import)

__all__ = ["InstanceHandle", "InstanceSpec", "Runtime", "get_runtime", "local", "register"]
