"""The one exception tree of kiln.

Every error a user can cause or meet derives from :class:`KilnError`. Each
carries the process exit code the CLI uses and, where there is one, a hint
saying what to do about it. Third-party errors are translated at the
boundary (``raise ConfigError(...) from exc``) so callers only ever catch
``KilnError``.

    KilnError                 exit 1: the thing failed
    ├── UsageError            exit 2: bad input
    │   ├── ConfigError       invalid or missing kiln.toml / lock
    │   ├── ImageNotFound     unknown or ambiguous image reference
    │   └── EnvironmentNotFound
    ├── MissingTool           a required host program is absent (exit 2)
    ├── BakeError             the bake itself failed
    │   └── LockError         dependencies could not be resolved or verified (exit 2)
    ├── StoreError            the image store is corrupt or inconsistent
    ├── RuntimeFailure        an instance could not start or run
    ├── RouterError           the router could not be reached or configured
    ├── ReleaseError          a release failed or was aborted
    │   └── ReleaseLocked     another release holds the environment (exit 2)
    └── DaemonError           the daemon could not be reached or started
"""

from __future__ import annotations


class KilnError(Exception):
    """Base of every kiln error. ``str(err)`` is the one line shown to users."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(KilnError):
    exit_code = 2


class ConfigError(UsageError):
    pass


class ImageNotFound(UsageError):
    pass


class EnvironmentNotFound(UsageError):
    pass


class MissingTool(KilnError):
    exit_code = 2


class BakeError(KilnError):
    pass


class LockError(BakeError):
    exit_code = 2


class StoreError(KilnError):
    pass


class RuntimeFailure(KilnError):
    pass


class RouterError(KilnError):
    pass


class ReleaseError(KilnError):
    pass


class ReleaseLocked(ReleaseError):
    exit_code = 2


class DaemonError(KilnError):
    pass
