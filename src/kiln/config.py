"""``kiln.toml``: the app's description, parsed strictly into dataclasses.

Unknown keys are errors (a typo must not silently fall back to a default),
and every error names the file and the dotted key that is wrong.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kiln.canary import Thresholds
from kiln.errors import ConfigError

CONFIG_NAME = "kiln.toml"
APP_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ENV_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
VAR_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

# The Debian suites kiln can build a base from, and the Python each ships.
BASES = {"debian:bookworm": "3.11", "debian:trixie": "3.13"}
STRATEGIES = ("blue-green", "canary", "rolling")
RESERVED_VARS = ("PORT", "KILN_APP", "KILN_ENV", "KILN_RELEASE", "KILN_IMAGE", "KILN_INSTANCE")

T = TypeVar("T")


def parse_duration(value: object, where: str) -> float:
    """``"30s"``, ``"15m"``, ``"250ms"`` or a number of seconds → seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a duration like '30s', not {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"{where} must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value.strip())
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ConfigError(f"{where} must be a duration like '30s', '15m' or '250ms', not {value!r}")


@dataclass(frozen=True)
class AppSection:
    name: str
    command: tuple[str, ...]
    port: int = 8000


@dataclass(frozen=True)
class BuildSection:
    python: str = "3.11"
    base: str = "debian:bookworm"
    packages: tuple[str, ...] = ()
    lock: str = "requirements.lock"
    requirements: str | None = None
    include: tuple[str, ...] = (".",)
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class HealthSection:
    path: str = "/"
    timeout: float = 30.0
    interval: float = 0.2


@dataclass(frozen=True)
class ServiceCheck:
    path: str
    method: str = "GET"
    status: int = 200
    contains: str | None = None
    regex: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    max_latency: float | None = None


@dataclass(frozen=True)
class SecurityPolicy:
    allow: tuple[str, ...] = ()  # path globs where secret-looking content is expected
    advisories: str | None = None  # an offline OSV database: a JSON file or a folder of them


DEFAULT_LABELS = (
    "org.opencontainers.image.created",
    "org.opencontainers.image.title",
    "org.opencontainers.image.base.name",
    "org.opencontainers.image.base.digest",
)
# Licenses a typical company lets its services ship without review.
DEFAULT_LICENSES = (
    "MIT",
    "BSD",
    "Apache-2.0",
    "ISC",
    "PSF",
    "MPL-2.0",
    "LGPL",
    "Unlicense",
    "0BSD",
    "Python",
)


@dataclass(frozen=True)
class CompliancePolicy:
    required_labels: tuple[str, ...] = DEFAULT_LABELS
    allowed_bases: tuple[str, ...] = tuple(BASES)
    allowed_licenses: tuple[str, ...] = DEFAULT_LICENSES
    max_size: int | None = None  # bytes, compressed layers


@dataclass(frozen=True)
class TestSection:
    service: tuple[ServiceCheck, ...] = ()
    integration: str | None = None
    shutdown_grace: float = 10.0
    security: SecurityPolicy = field(default_factory=SecurityPolicy)
    compliance: CompliancePolicy = field(default_factory=CompliancePolicy)


@dataclass(frozen=True)
class CanarySection:
    steps: tuple[int, ...] = (10, 50, 100)
    interval: float = 30.0
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass(frozen=True)
class ReleaseSection:
    strategy: str = "blue-green"
    replicas: int = 2
    keep_previous: float = 900.0
    max_surge: int = 1
    max_unavailable: int = 0
    canary: CanarySection = field(default_factory=CanarySection)


@dataclass(frozen=True)
class EnvSection:
    name: str
    listen: str
    replicas: int | None = None
    require_tests: tuple[str, ...] = ()  # suites a release needs a passing attestation for
    vars: Mapping[str, str] = field(default_factory=dict)
    secrets_file: str | None = None
    keep_previous: float | None = None
    strategy: str | None = None
    sticky: bool = False


@dataclass(frozen=True)
class AppConfig:
    path: Path
    app: AppSection
    build: BuildSection
    health: HealthSection
    test: TestSection
    release: ReleaseSection
    envs: Mapping[str, EnvSection]

    @property
    def root(self) -> Path:
        return self.path.parent


class _Table:
    """A TOML table being read: tracks which keys were used to reject the rest."""

    def __init__(self, data: object, where: str, file: Path) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: [{where}] must be a table")
        self.data: dict[str, Any] = data
        self.where = where
        self.file = file

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, message: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.key(name)} {message}")

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: T) -> T:
        if name not in self.data:
            return default
        value = self.data[name]
        if isinstance(value, bool) and kind is int:
            raise self.fail(name, "must be an integer")
        if not isinstance(value, kind):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise self.fail(name, f"must be {names}, not {value!r}")
        return value  # type: ignore[return-value]

    def optional(self, name: str, kind: type[T]) -> T | None:
        if name not in self.data:
            return None
        value: T = self.get(name, kind, self.data[name])
        return value

    def require(self, name: str, kind: type[T]) -> T:
        value = self.optional(name, kind)
        if value is None:
            raise ConfigError(f"{self.file}: {self.key(name)} is required")
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, list, None)
        if value is None:
            return default
        if not all(isinstance(v, str) for v in value):
            raise self.fail(name, "must be a list of strings")
        return tuple(value)

    def duration(self, name: str, default: float) -> float:
        if name not in self.data:
            return default
        return parse_duration(self.data[name], f"{self.file}: {self.key(name)}")

    def sub(self, name: str) -> _Table:
        return _Table(self.data.get(name, {}), self.key(name), self.file)

    def only(self, *allowed: str) -> None:
        for name in self.data:
            if name not in allowed:
                raise ConfigError(
                    f"{self.file}: unknown key {self.key(name)!r}",
                    hint=f"allowed here: {', '.join(allowed)}",
                )


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    bool: "true or false",
    list: "a list",
    dict: "a table",
}


def _positive(table: _Table, name: str, default: int, minimum: int = 1) -> int:
    value = table.get(name, int, default)
    if value < minimum:
        raise table.fail(name, f"must be at least {minimum}")
    return value


def _parse_app(t: _Table) -> AppSection:
    t.only("name", "command", "port")
    name = t.require("name", str)
    if not APP_NAME_RE.match(name):
        raise t.fail("name", "must be lowercase letters, digits, '.', '_' or '-' (max 63)")
    command = t.strings("command", ())
    if not command:
        raise t.fail("command", "is required: the program that serves on $PORT")
    port = t.get("port", int, 8000)
    if not 1 <= port <= 65535:
        raise t.fail("port", "must be a TCP port (1-65535)")
    return AppSection(name=name, command=command, port=port)


def _parse_build(t: _Table) -> BuildSection:
    t.only("python", "base", "packages", "lock", "requirements", "include", "exclude")
    base = t.get("base", str, "debian:bookworm")
    if base not in BASES:
        raise t.fail("base", f"must be one of {', '.join(BASES)}, not {base!r}")
    python = t.get("python", str, BASES[base])
    if python != BASES[base]:
        raise t.fail("python", f"is {python!r} but {base} ships Python {BASES[base]}")
    include = t.strings("include", (".",))
    if not include:
        raise t.fail("include", "must name at least one path or pattern")
    packages = t.strings("packages", ())
    for pkg in packages:
        if not re.match(r"^[a-z0-9][a-z0-9+.-]+$", pkg):
            raise t.fail("packages", f"has an invalid Debian package name {pkg!r}")
    return BuildSection(
        python=python,
        base=base,
        packages=packages,
        lock=t.get("lock", str, "requirements.lock"),
        requirements=t.optional("requirements", str),
        include=include,
        exclude=t.strings("exclude", ()),
    )


def _parse_health(t: _Table) -> HealthSection:
    t.only("path", "timeout", "interval")
    path = t.get("path", str, "/")
    if not path.startswith("/"):
        raise t.fail("path", "must start with '/'")
    return HealthSection(
        path=path, timeout=t.duration("timeout", 30.0), interval=t.duration("interval", 0.2)
    )


def _parse_check(raw: object, where: str, file: Path) -> ServiceCheck:
    t = _Table(raw, where, file)
    t.only("path", "method", "status", "contains", "regex", "headers", "max_latency")
    path = t.require("path", str)
    if not path.startswith("/"):
        raise t.fail("path", "must start with '/'")
    headers = t.get("headers", dict, {})
    regex = t.optional("regex", str)
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as exc:
            raise t.fail("regex", f"is not a valid regular expression: {exc}") from exc
    return ServiceCheck(
        path=path,
        method=t.get("method", str, "GET").upper(),
        status=t.get("status", int, 200),
        contains=t.optional("contains", str),
        regex=regex,
        headers=tuple((str(k), str(v)) for k, v in headers.items()),
        max_latency=t.duration("max_latency", 0.0) or None,
    )


_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)$", re.I)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(value: object, where: str) -> int:
    """``"200MB"``, ``"1.5GiB"`` or a number of bytes → bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value.strip())
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ConfigError(f"{where} must be a size like '200MB' or '1GiB', not {value!r}")


def _parse_security(t: _Table) -> SecurityPolicy:
    t.only("allow", "advisories")
    return SecurityPolicy(allow=t.strings("allow", ()), advisories=t.optional("advisories", str))


def _parse_compliance(t: _Table) -> CompliancePolicy:
    t.only("required_labels", "allowed_bases", "allowed_licenses", "max_size")
    bases = t.strings("allowed_bases", tuple(BASES))
    unknown = [b for b in bases if b not in BASES]
    if unknown:
        raise t.fail(
            "allowed_bases", f"names an unknown base {unknown[0]!r} (known: {', '.join(BASES)})"
        )
    max_size = None
    if "max_size" in t.data:
        max_size = parse_size(t.data["max_size"], f"{t.file}: {t.key('max_size')}")
    return CompliancePolicy(
        required_labels=t.strings("required_labels", DEFAULT_LABELS),
        allowed_bases=bases,
        allowed_licenses=t.strings("allowed_licenses", DEFAULT_LICENSES),
        max_size=max_size,
    )


def _parse_test(t: _Table) -> TestSection:
    t.only("service", "integration", "shutdown_grace", "security", "compliance")
    raw_checks = t.get("service", list, [])
    checks = tuple(
        _parse_check(c, f"{t.key('service')}[{i}]", t.file) for i, c in enumerate(raw_checks)
    )
    return TestSection(
        service=checks,
        integration=t.optional("integration", str),
        shutdown_grace=t.duration("shutdown_grace", 10.0),
        security=_parse_security(t.sub("security")),
        compliance=_parse_compliance(t.sub("compliance")),
    )


def _parse_canary(raw: object, where: str, file: Path) -> CanarySection:
    t = _Table(raw, where, file)
    t.only(
        "steps",
        "interval",
        "min_requests",
        "max_error_increase",
        "max_latency_ratio",
        "latency_floor",
        "count_4xx",
        "max_inconclusive",
    )
    steps = t.get("steps", list, [10, 50, 100])
    if not steps or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
        raise t.fail("steps", "must be a list of percentages, e.g. [10, 50, 100]")
    if any(not 0 < s <= 100 for s in steps) or list(steps) != sorted(steps):
        raise t.fail("steps", "must rise from above 0 up to at most 100")
    defaults = Thresholds()
    error_increase = t.get("max_error_increase", (int, float), defaults.max_error_increase)
    ratio = t.get("max_latency_ratio", (int, float), defaults.max_latency_ratio)
    if not 0 <= float(error_increase) <= 1:
        raise t.fail("max_error_increase", "must be a fraction between 0 and 1, e.g. 0.02")
    if float(ratio) < 1:
        raise t.fail("max_latency_ratio", "must be at least 1")
    thresholds = Thresholds(
        min_requests=_positive(t, "min_requests", defaults.min_requests),
        max_error_increase=float(error_increase),
        max_latency_ratio=float(ratio),
        latency_floor=t.duration("latency_floor", defaults.latency_floor),
        count_4xx=t.get("count_4xx", bool, defaults.count_4xx),
        max_inconclusive=_positive(t, "max_inconclusive", defaults.max_inconclusive),
    )
    return CanarySection(
        steps=tuple(steps), interval=t.duration("interval", 30.0), thresholds=thresholds
    )


def _parse_strategy(t: _Table, default: str | None) -> str | None:
    strategy = t.optional("strategy", str) or default
    if strategy is not None and strategy not in STRATEGIES:
        raise t.fail("strategy", f"must be one of {', '.join(STRATEGIES)}")
    return strategy


def _parse_release(t: _Table) -> ReleaseSection:
    t.only("strategy", "replicas", "keep_previous", "max_surge", "max_unavailable", "canary")
    return ReleaseSection(
        strategy=_parse_strategy(t, "blue-green") or "blue-green",
        replicas=_positive(t, "replicas", 2),
        keep_previous=t.duration("keep_previous", 900.0),
        max_surge=_positive(t, "max_surge", 1, minimum=0),
        max_unavailable=_positive(t, "max_unavailable", 0, minimum=0),
        canary=_parse_canary(t.data.get("canary", {}), t.key("canary"), t.file),
    )


def _parse_listen(t: _Table) -> str:
    listen = t.require("listen", str)
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise t.fail("listen", f"must be HOST:PORT, e.g. 127.0.0.1:8080, not {listen!r}")
    return listen


SUITES = ("service", "integration", "security", "compliance")


def _parse_required_suites(t: _Table, env: str) -> tuple[str, ...]:
    """``require_tests = true`` means every suite; a list names some."""
    raw = t.data.get("require_tests", env == "production")
    if isinstance(raw, bool):
        return SUITES if raw else ()
    if isinstance(raw, list) and all(isinstance(s, str) and s in SUITES for s in raw):
        return tuple(raw)
    raise t.fail(
        "require_tests", f"must be true, false or a list of suites from {', '.join(SUITES)}"
    )


def _parse_env(name: str, t: _Table) -> EnvSection:
    if not ENV_NAME_RE.match(name):
        raise ConfigError(
            f"{t.file}: environment name {name!r} must be lowercase letters, digits, '-' or '_'"
        )
    t.only(
        "listen", "replicas", "require_tests", "vars", "secrets_file", "keep_previous", "strategy"
    )
    env_vars = t.get("vars", dict, {})
    for key, value in env_vars.items():
        if not VAR_NAME_RE.match(key):
            raise t.fail("vars", f"has an invalid variable name {key!r}")
        if key in RESERVED_VARS:
            raise t.fail("vars", f"must not set {key}: kiln sets it for every instance")
        if not isinstance(value, str | int | float | bool):
            raise t.fail("vars", f"value of {key} must be a string or number")
    replicas = t.optional("replicas", int)
    if replicas is not None and replicas < 1:
        raise t.fail("replicas", "must be at least 1")
    keep = t.duration("keep_previous", -1.0)
    return EnvSection(
        name=name,
        listen=_parse_listen(t),
        replicas=replicas,
        require_tests=_parse_required_suites(t, name),
        vars={k: str(v) for k, v in env_vars.items()},
        secrets_file=t.optional("secrets_file", str),
        keep_previous=None if keep < 0 else keep,
        strategy=_parse_strategy(t, None),
        sticky=t.get("sticky", bool, False),
    )


def parse_config(data: Mapping[str, Any], path: Path) -> AppConfig:
    top = _Table(dict(data), "", path)
    top.only("app", "build", "health", "test", "release", "env")
    if "app" not in data:
        raise ConfigError(f"{path}: [app] is required (name and command)")
    envs_table = top.sub("env")
    envs = {name: _parse_env(name, envs_table.sub(name)) for name in envs_table.data}
    return AppConfig(
        path=path,
        app=_parse_app(top.sub("app")),
        build=_parse_build(top.sub("build")),
        health=_parse_health(top.sub("health")),
        test=_parse_test(top.sub("test")),
        release=_parse_release(top.sub("release")),
        envs=envs,
    )


def load_config(directory: Path) -> AppConfig:
    """Read ``DIR/kiln.toml``; every problem becomes a one-line ConfigError."""
    path = (directory / CONFIG_NAME).absolute()
    if not path.is_file():
        raise ConfigError(
            f"no {CONFIG_NAME} in {directory}", hint="run 'kiln init' there to write one"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from exc
    return parse_config(data, path)


def config_from_text(text: str, path: Path) -> AppConfig:
    """Parse kiln.toml text carried inside an image (already validated at bake)."""
    try:
        return parse_config(tomllib.loads(text), path)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
