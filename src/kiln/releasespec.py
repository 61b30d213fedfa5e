"""What a release runs: the image's own settings plus its environment's.

The image carries the app's kiln.toml (baked defaults, including the
``[env.NAME]`` sections); environment values such as vars and secrets are
injected when an instance starts, never baked into the image. The result is
a plain JSON-able dict stored with the release, so a restarted daemon starts
exactly the same instances.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from kiln.config import AppConfig, config_from_text
from kiln.errors import ConfigError, EnvironmentNotFound, UsageError
from kiln.store import ImageRecord, ImageStore


def read_secrets(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments allowed) → a dict; never logged."""
    if not path.is_file():
        raise ConfigError(f"secrets file {path} does not exist")
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"{path}:{n}: expected KEY=VALUE")
        out[key.strip()] = value.strip().strip('"')
    return out


def baked_config(rootfs: Path, record: ImageRecord) -> AppConfig:
    """The kiln.toml baked into the image: its environments, tests and policies."""
    path = rootfs / "app" / "kiln.toml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(
            f"image {record.short} carries no /app/kiln.toml; was it baked by kiln?"
        ) from exc
    return config_from_text(text, Path(f"{record.app}@{record.short}:/app/kiln.toml"))


def build_spec(
    store: ImageStore,
    record: ImageRecord,
    rootfs: Path,
    env: str,
    home_root: Path,
    strategy: str | None,
    canary_steps: list[int] | None = None,
    canary_interval: float | None = None,
) -> dict[str, Any]:
    config = baked_config(rootfs, record)
    if env not in config.envs:
        known = ", ".join(sorted(config.envs)) or "none"
        raise EnvironmentNotFound(
            f"image {record.short} ({record.app}) defines no environment {env!r}",
            hint=f"its kiln.toml defines: {known}; add [env.{env}] and bake again",
        )
    section = config.envs[env]
    image_config = store.image_config(record.digest)["config"]
    annotations = store.manifest(record.digest).get("annotations", {})
    uid, _, gid = str(image_config.get("User", "1000:1000")).partition(":")
    image_env = dict(e.split("=", 1) for e in image_config.get("Env", []) if "=" in e)
    secrets_file = None
    if section.secrets_file:
        path = Path(section.secrets_file)
        secrets_file = str(path if path.is_absolute() else home_root / "secrets" / path)
        read_secrets(Path(secrets_file))  # fail now, not at instance start
    chosen = strategy or section.strategy or config.release.strategy
    canary = config.release.canary
    steps = list(canary_steps) if canary_steps else list(canary.steps)
    if config.release.max_surge + config.release.max_unavailable < 1:
        raise ConfigError("release.max_surge + release.max_unavailable must be at least 1")
    return {
        "app": record.app,
        "image": record.digest,
        "command": list(image_config.get("Cmd", [])),
        "workdir": image_config.get("WorkingDir", "/"),
        "uid": int(uid or 1000),
        "gid": int(gid or uid or 1000),
        "image_env": image_env,
        "vars": dict(section.vars),
        "secrets_file": secrets_file,
        "listen": section.listen,
        "replicas": section.replicas or config.release.replicas,
        "keep_previous": section.keep_previous
        if section.keep_previous is not None
        else config.release.keep_previous,
        "strategy": chosen,
        "max_surge": config.release.max_surge,
        "max_unavailable": config.release.max_unavailable,
        "health_path": annotations.get("dev.kiln.health.path", config.health.path),
        "health_timeout": float(annotations.get("dev.kiln.health.timeout", config.health.timeout)),
        "health_interval": config.health.interval,
        "require_tests": list(section.require_tests),
        "command_json": json.loads(annotations.get("dev.kiln.command", "[]")),
        "sticky": section.sticky,
        "canary": {
            "steps": steps,
            "interval": canary.interval if canary_interval is None else canary_interval,
            "thresholds": canary.thresholds.to_json(),
        },
    }


def listen_free(listen: str) -> bool:
    """Whether HOST:PORT can be bound right now (nothing else listens there)."""
    host, _, port = listen.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
