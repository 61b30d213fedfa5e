"""``kiln bake``: an app's source tree → an immutable OCI image in the store.

Three layers, each cached by its own inputs: the Debian base (OS + Python),
the dependencies installed from the hash-pinned lock, and the app's files.
The image config says how to run it (command, user, port, health path); the
manifest carries provenance annotations fixed by the inputs; provenance of
this particular bake and the SBOM are stored beside it as OCI referrers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln import oci
from kiln.base import Base, BaseSpec, ensure_base
from kiln.config import AppConfig, load_config
from kiln.deps import Package, deps_layer, lock_digest, read_lock
from kiln.errors import UsageError
from kiln.faults import fault_point
from kiln.home import Home
from kiln.provenance import SourceInfo, build_epoch, git_info, iso, statement
from kiln.sources import APP_DIR, APP_UID, app_layer, select_sources
from kiln.store import ImageStore
from kiln.tarball import Layer

Progress = Callable[[str], None]

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_VAR_RE = re.compile(r"\$(\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class LayerReport:
    name: str
    layer: Layer
    cached: bool


@dataclass(frozen=True)
class BakeResult:
    digest: str
    app: str
    tags: tuple[str, ...]
    layers: tuple[LayerReport, ...]
    created: str
    previous: str | None
    already_stored: bool
    seconds: float
    provenance: str
    source: SourceInfo = field(repr=False)

    @property
    def size(self) -> int:
        return sum(r.layer.size for r in self.layers)

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "app": self.app,
            "tags": list(self.tags),
            "size": self.size,
            "created": self.created,
            "layers": [
                {"name": r.name, "cached": r.cached, **r.layer.to_json()} for r in self.layers
            ],
            "previous": self.previous,
            "already_stored": self.already_stored,
            "seconds": round(self.seconds, 3),
            "provenance": self.provenance,
            "source": {
                "path": str(self.source.path),
                "commit": self.source.commit,
                "dirty": self.source.dirty,
                "repository": self.source.remote,
            },
        }


def shell_command(args: tuple[str, ...]) -> str:
    """The app's command for ``sh -c``: quoted, but with ``$PORT``-style variables live."""
    parts = []
    for arg in args:
        if _VAR_RE.search(arg):
            escaped = re.sub(r'(["\\`])', r"\\\1", arg)
            parts.append(f'"{escaped}"')
        else:
            parts.append(shlex.quote(arg))
    return "exec " + " ".join(parts)


def _annotations(
    config: AppConfig, source: SourceInfo, base: Base, base_manifest: str, lock: str, created: str
) -> dict[str, str]:
    out = {
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.title": config.app.name,
        "org.opencontainers.image.base.name": config.build.base,
        "org.opencontainers.image.base.digest": base_manifest,
        "dev.kiln.app": config.app.name,
        "dev.kiln.command": json.dumps(list(config.app.command)),
        "dev.kiln.port": str(config.app.port),
        "dev.kiln.health.path": config.health.path,
        "dev.kiln.health.timeout": str(config.health.timeout),
        "dev.kiln.lock.digest": lock,
        "dev.kiln.python": config.build.python,
        "dev.kiln.dirty": "true" if source.dirty else "false",
    }
    if source.commit:
        out["org.opencontainers.image.revision"] = source.commit
    if source.describe:
        out["org.opencontainers.image.version"] = source.describe
    if source.remote:
        out["org.opencontainers.image.source"] = source.remote
    return out


def _image_config(
    config: AppConfig, layers: list[LayerReport], annotations: dict[str, str], created: str
) -> dict[str, Any]:
    history_by = {
        "base": f"kiln: {config.build.base} + python{config.build.python} (mmdebstrap)",
        "dependencies": f"kiln: install {config.build.lock} (uv, --require-hashes)",
        "app": f"kiln: copy app files into /{APP_DIR}",
    }
    return {
        "created": created,
        "architecture": ARCH.get(os.uname().machine, os.uname().machine),
        "os": "linux",
        "config": {
            "User": f"{APP_UID}:{APP_UID}",
            "Env": [
                f"PATH={PATH}",
                "LANG=C.UTF-8",
                "PYTHONDONTWRITEBYTECODE=1",
                "PYTHONUNBUFFERED=1",
                f"HOME=/{APP_DIR}",
                f"PORT={config.app.port}",
            ],
            "Cmd": ["/bin/sh", "-c", shell_command(config.app.command)],
            "WorkingDir": f"/{APP_DIR}",
            "ExposedPorts": {f"{config.app.port}/tcp": {}},
            "StopSignal": "SIGTERM",
            "Labels": annotations,
        },
        "rootfs": {"type": "layers", "diff_ids": [r.layer.diff_id for r in layers]},
        "history": [{"created": created, "created_by": history_by[r.name]} for r in layers],
    }


def _manifest(
    config_digest: str, config_size: int, layers: list[Layer], annotations: dict[str, str] | None
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": oci.MANIFEST,
        "config": {"mediaType": oci.CONFIG, "digest": config_digest, "size": config_size},
        "layers": [layer.descriptor().to_json() for layer in layers],
    }
    if annotations:
        doc["annotations"] = annotations
    return doc


def _store_base_image(store: ImageStore, base: Base) -> str:
    """The base as an image of its own, so ``base.digest`` names a real manifest."""
    created = iso(base.epoch)
    cfg = {
        "created": created,
        "architecture": ARCH.get(os.uname().machine, os.uname().machine),
        "os": "linux",
        "config": {"Env": [f"PATH={PATH}"], "Cmd": ["/usr/bin/python3"]},
        "rootfs": {"type": "layers", "diff_ids": [base.layer.diff_id]},
    }
    cfg_digest, cfg_size = store.put_json(cfg)
    manifest = _manifest(
        cfg_digest, cfg_size, [base.layer], {"org.opencontainers.image.title": base.spec.name}
    )
    return store.put_bytes(oci.canonical_json(manifest))


def sbom_document(
    config: AppConfig, base: Base, packages: list[Package], created: str, version: str | None
) -> dict[str, Any]:
    """A CycloneDX 1.5 SBOM of everything installed: Debian and Python packages."""
    distro = "debian-" + {"bookworm": "12", "trixie": "13"}[base.spec.suite]
    components: list[dict[str, Any]] = []
    for pkg in packages:
        comp: dict[str, Any] = {
            "type": "library",
            "name": pkg.name,
            "version": pkg.version,
            "purl": f"pkg:pypi/{pkg.name.lower().replace('_', '-')}@{pkg.version}",
        }
        if pkg.license:
            comp["licenses"] = [{"license": {"name": pkg.license}}]
        components.append(comp)
    for name, deb_version in base.packages:
        components.append(
            {
                "type": "library",
                "name": name,
                "version": deb_version,
                "purl": f"pkg:deb/debian/{name}@{deb_version}?distro={distro}",
            }
        )
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {
            "timestamp": created,
            "tools": {"components": [{"type": "application", "name": "kiln"}]},
            "component": {
                "type": "application",
                "name": config.app.name,
                "version": version or "unversioned",
            },
        },
        "components": components,
    }


def _resolved(
    source: SourceInfo,
    config: AppConfig,
    base_manifest: str,
    lock_path: Path,
    lock: str,
    packages: list[Package],
) -> list[dict[str, Any]]:
    """SLSA resolvedDependencies: the commit, the base, the lock and each package."""
    resolved: list[dict[str, Any]] = []
    if source.commit:
        resolved.append(
            {
                "name": "source",
                "uri": f"git+{source.remote or source.path}",
                "digest": {"gitCommit": source.commit},
            }
        )
    resolved.append(
        {"name": "base", "uri": f"oci:{config.build.base}", "digest": {"sha256": base_manifest[7:]}}
    )
    resolved.append({"name": "lock", "uri": str(lock_path), "digest": {"sha256": lock[7:]}})
    resolved += [{"name": p.name, "uri": f"pkg:pypi/{p.name}@{p.version}"} for p in packages]
    return resolved


def bake(
    directory: Path,
    home: Home,
    *,
    reason: str | None = None,
    tags: tuple[str, ...] = (),
    progress: Progress = lambda _: None,
) -> BakeResult:
    started = time.time()
    config = load_config(directory)
    for tag in tags:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag):
            raise UsageError(f"invalid tag {tag!r}: use letters, digits, '_', '.' or '-'")
    progress("reading sources")
    source = git_info(config.root)
    epoch = build_epoch(source)
    created = iso(epoch)
    files = select_sources(config)
    lock_path = config.root / config.build.lock
    read_lock(lock_path)
    lock = lock_digest(lock_path)

    home.ensure()
    store = ImageStore(home.images)
    store.init()
    known_blobs = set(os.listdir(store.root / "blobs" / "sha256"))
    try:
        progress("base layer")
        base = ensure_base(BaseSpec(config.build.base, config.build.packages), store, progress)
        fault_point("bake.after-base")
        progress("dependencies layer")
        deps, packages, deps_cached = deps_layer(store, lock_path, config.build.python, epoch)
        progress("app layer")
        app = app_layer(store, config, files, base.passwd, base.group, epoch)
        reports = [
            LayerReport("base", base.layer, base.cached),
            LayerReport("dependencies", deps, deps_cached),
            LayerReport("app", app, app.digest.removeprefix("sha256:") in known_blobs),
        ]
        fault_point("bake.after-layers")
        progress("image manifest")
        base_manifest = _store_base_image(store, base)
        annotations = _annotations(config, source, base, base_manifest, lock, created)
        cfg_digest, cfg_size = store.put_json(_image_config(config, reports, annotations, created))
        manifest = _manifest(cfg_digest, cfg_size, [r.layer for r in reports], annotations)
        manifest_bytes = oci.canonical_json(manifest)
        digest = oci.sha256_digest(manifest_bytes)
        existing = {r.digest: r for r in store.images()}
        already = digest in existing
        earlier = [r for r in existing.values() if r.app == config.app.name and r.digest != digest]
        previous = earlier[-1].digest if earlier else None
        store.put_bytes(manifest_bytes)

        all_tags = sorted({"latest", *tags})
        if source.describe:
            all_tags = sorted({*all_tags, re.sub(r"[^A-Za-z0-9_.-]", "-", source.describe)[:128]})
        sbom = sbom_document(config, base, packages, created, source.describe)
        sbom_ref = store.put_artifact(
            digest, len(manifest_bytes), oci.CYCLONEDX, oci.canonical_json(sbom)
        )
        doc = statement(
            subject_name=config.app.name,
            digest=digest,
            source=source,
            inputs={
                "app": config.app.name,
                "config": str(config.path),
                "python": config.build.python,
            },
            resolved=_resolved(source, config, base_manifest, lock_path, lock, packages),
            reason=reason,
            previous=previous,
            tags=all_tags,
            started=started,
            finished=time.time(),
            invocation=str(uuid.uuid4()),
        )
        payload = json.dumps(doc, indent=1, sort_keys=True).encode()
        provenance_ref = store.put_artifact(digest, len(manifest_bytes), oci.IN_TOTO, payload)
        fault_point("bake.before-index")
        # One index update publishes the image with its SBOM and provenance.
        store.add_image(
            digest,
            len(manifest_bytes),
            config.app.name,
            all_tags,
            referrers=[sbom_ref, provenance_ref],
        )
        fault_point("bake.after-index")
    finally:
        store.cleanup()
    return BakeResult(
        digest=digest,
        app=config.app.name,
        tags=tuple(all_tags),
        layers=tuple(reports),
        created=created,
        previous=previous,
        already_stored=already,
        seconds=time.time() - started,
        provenance=provenance_ref.digest,
        source=source,
    )
