"""The router's desired state: environments, their pools and instances.

This is the JSON the daemon sends with ``PUT /config`` and the router keeps
in its state file. Parsing is strict because a typo here silently moves
production traffic; every error names the offending field.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.store import atomic_write

# Names end up in response headers and cookies, so they must be header- and
# cookie-safe without any quoting.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")


class InvalidConfig(ValueError):
    """The config document is malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: object, where: str) -> Address:
        if not isinstance(text, str):
            raise InvalidConfig(f"{where}: expected 'host:port' string")
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise InvalidConfig(f"{where}: {text!r} is not 'host:port'")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            # Only literals: the router must never block on DNS.
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise InvalidConfig(f"{where}: {host!r} is not an IP address") from None
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise InvalidConfig(f"{where}: bad port in {text!r}")
        return cls(host, int(port_text))


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    id: str
    addr: Address


@dataclass(frozen=True, slots=True)
class PoolSpec:
    release: str
    weight: int
    instances: tuple[InstanceSpec, ...]
    # Other names a client may pin to with X-Kiln-Release, e.g. "canary".
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EnvSpec:
    listen: Address
    pools: tuple[PoolSpec, ...]
    sticky: bool = False


@dataclass(frozen=True, slots=True)
class RouterConfig:
    generation: int
    envs: dict[str, EnvSpec]

    @classmethod
    def empty(cls) -> RouterConfig:
        return cls(0, {})

    @classmethod
    def from_json(cls, data: object) -> RouterConfig:
        obj = _mapping(data, "config")
        _only(obj, {"generation", "envs"}, "config")
        generation = obj.get("generation", 0)
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            raise InvalidConfig("generation: expected a non-negative integer")
        envs: dict[str, EnvSpec] = {}
        seen_listen: dict[Address, str] = {}
        for name, env_data in _mapping(obj.get("envs", {}), "envs").items():
            where = f"envs.{name}"
            if not _NAME.match(name):
                raise InvalidConfig(f"{where}: invalid environment name")
            env = _parse_env(env_data, where)
            other = seen_listen.get(env.listen)
            if other is not None:
                raise InvalidConfig(f"{where}.listen: {env.listen} is also used by {other}")
            seen_listen[env.listen] = name
            envs[name] = env
        return cls(generation, envs)

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "envs": {
                name: {
                    "listen": str(env.listen),
                    "sticky": env.sticky,
                    "pools": [
                        {
                            "release": pool.release,
                            "weight": pool.weight,
                            **({"aliases": list(pool.aliases)} if pool.aliases else {}),
                            "instances": [
                                {"id": inst.id, "addr": str(inst.addr)} for inst in pool.instances
                            ],
                        }
                        for pool in env.pools
                    ],
                }
                for name, env in self.envs.items()
            },
        }


def _parse_env(data: object, where: str) -> EnvSpec:
    obj = _mapping(data, where)
    _only(obj, {"listen", "pools", "sticky"}, where)
    listen = Address.parse(obj.get("listen"), f"{where}.listen")
    sticky = obj.get("sticky", False)
    if not isinstance(sticky, bool):
        raise InvalidConfig(f"{where}.sticky: expected true or false")
    pools_data = obj.get("pools", [])
    if not isinstance(pools_data, list):
        raise InvalidConfig(f"{where}.pools: expected a list")
    pools: list[PoolSpec] = []
    releases: set[str] = set()
    instance_ids: set[str] = set()
    for i, pool_data in enumerate(pools_data):
        pwhere = f"{where}.pools[{i}]"
        pool_obj = _mapping(pool_data, pwhere)
        _only(pool_obj, {"release", "weight", "instances", "aliases"}, pwhere)
        release = pool_obj.get("release")
        if not isinstance(release, str) or not _NAME.match(release):
            raise InvalidConfig(f"{pwhere}.release: expected a release name like 'r3'")
        aliases = pool_obj.get("aliases", [])
        if not isinstance(aliases, list) or not all(
            isinstance(a, str) and _NAME.match(a) for a in aliases
        ):
            raise InvalidConfig(f"{pwhere}.aliases: expected a list of names like 'canary'")
        for name in (release, *aliases):
            if name in releases:
                raise InvalidConfig(f"{pwhere}: {name!r} appears twice")
            releases.add(name)
        weight = pool_obj.get("weight", 0)
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 1_000_000:
            raise InvalidConfig(f"{pwhere}.weight: expected an integer >= 0")
        inst_data = pool_obj.get("instances", [])
        if not isinstance(inst_data, list):
            raise InvalidConfig(f"{pwhere}.instances: expected a list")
        instances: list[InstanceSpec] = []
        for j, one in enumerate(inst_data):
            iwhere = f"{pwhere}.instances[{j}]"
            inst_obj = _mapping(one, iwhere)
            _only(inst_obj, {"id", "addr"}, iwhere)
            inst_id = inst_obj.get("id")
            if not isinstance(inst_id, str) or not _NAME.match(inst_id):
                raise InvalidConfig(f"{iwhere}.id: expected an instance id like 'i-abc'")
            if inst_id in instance_ids:
                raise InvalidConfig(f"{iwhere}.id: {inst_id!r} appears twice in {where}")
            instance_ids.add(inst_id)
            instances.append(InstanceSpec(inst_id, Address.parse(inst_obj.get("addr"), iwhere)))
        pools.append(PoolSpec(release, weight, tuple(instances), tuple(aliases)))
    return EnvSpec(listen, tuple(pools), sticky)


def _mapping(data: object, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidConfig(f"{where}: expected an object")
    return data


def _only(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise InvalidConfig(f"{where}: unknown key {unknown[0]!r}")


def load_state(path: Path) -> RouterConfig | None:
    """The config saved by the last router, or None if there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidConfig(f"state file {path}: {exc.strerror or exc}") from exc
    try:
        return RouterConfig.from_json(json.loads(text))
    except (ValueError, InvalidConfig) as exc:
        raise InvalidConfig(f"state file {path}: {exc}") from exc


def save_state(path: Path, config: RouterConfig) -> None:
    """Write the state so that a crash at any point leaves the old or the new file."""
    atomic_write(path, json.dumps(config.to_json(), indent=2, sort_keys=True).encode() + b"\n")
