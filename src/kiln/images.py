"""Reading images back: what ``kiln images``, ``inspect``, ``diff`` and ``export`` show.

``describe`` answers the visibility questions for one image (where, when and
why it was built, from which commit, what came before, how to run and check
it, what is inside); ``diff`` compares two images file by file, dependency by
dependency and setting by setting; ``export`` writes an OCI archive that
Podman and Docker load.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from kiln import oci
from kiln.errors import StoreError, UsageError
from kiln.store import ImageRecord, ImageStore
from kiln.tarball import Member, list_layer

LAYER_NAMES = ("base", "dependencies", "app")


def image_size(store: ImageStore, digest: str) -> int:
    return sum(layer.size for layer in store.layers(digest))


def _artifact_payload(store: ImageStore, desc: oci.Descriptor) -> dict[str, Any]:
    manifest = store.read_json(desc.digest)
    return store.read_json(manifest["layers"][0]["digest"])


def provenance(store: ImageStore, digest: str) -> list[dict[str, Any]]:
    """Every provenance statement recorded for ``digest``, oldest bake first."""
    statements = [_artifact_payload(store, d) for d in store.referrers(digest, oci.IN_TOTO)]
    statements.sort(key=lambda s: s["predicate"]["runDetails"]["metadata"]["startedOn"])
    return statements


def sbom(store: ImageStore, digest: str) -> dict[str, Any] | None:
    found = store.referrers(digest, oci.CYCLONEDX)
    return _artifact_payload(store, found[0]) if found else None


def test_attestations(store: ImageStore, digest: str) -> list[dict[str, Any]]:
    return [_artifact_payload(store, d) for d in store.referrers(digest, oci.TEST_RESULT)]


def latest_tests(store: ImageStore, digest: str) -> list[dict[str, Any]]:
    """Each suite's most recent recorded result: suite, result, when, kiln version."""
    latest: dict[str, dict[str, Any]] = {}
    for doc in test_attestations(store, digest):
        for name, suite in doc.get("suites", {}).items():
            entry = {
                "suite": name,
                "result": suite.get("result"),
                "when": doc.get("when"),
                "kiln_version": doc.get("kiln_version"),
                "checks": len(suite.get("checks", [])),
            }
            if name not in latest or entry["when"] >= latest[name]["when"]:
                latest[name] = entry
    order = ("service", "integration", "security", "compliance")
    return sorted(
        latest.values(), key=lambda e: order.index(e["suite"]) if e["suite"] in order else 9
    )


def python_packages(bom: dict[str, Any] | None) -> dict[str, str]:
    if not bom:
        return {}
    return {
        c["name"].lower(): c["version"]
        for c in bom.get("components", [])
        if c.get("purl", "").startswith("pkg:pypi/")
    }


def _debian_packages(bom: dict[str, Any] | None) -> dict[str, str]:
    if not bom:
        return {}
    return {
        c["name"]: c["version"]
        for c in bom.get("components", [])
        if c.get("purl", "").startswith("pkg:deb/")
    }


def describe(store: ImageStore, record: ImageRecord) -> dict[str, Any]:
    digest = record.digest
    manifest = store.manifest(digest)
    config = store.image_config(digest)
    ann: dict[str, str] = manifest.get("annotations", {})
    runcfg = config.get("config", {})
    statements = provenance(store, digest)
    last = statements[-1] if statements else None
    bom = sbom(store, digest)
    built: dict[str, Any] = {}
    if last:
        pred = last["predicate"]
        meta = pred["runDetails"]["metadata"]
        params = pred["buildDefinition"]["externalParameters"]
        built = {
            "at": meta["startedOn"],
            "finished": meta["finishedOn"],
            "host": meta.get("host"),
            "user": meta.get("user"),
            "reason": params.get("reason"),
            "builder": pred["runDetails"]["builder"]["id"],
            "kiln_version": pred["runDetails"]["builder"]["version"].get("kiln"),
            "source_path": params["source"].get("path"),
            "previous_image": pred["buildDefinition"]["internalParameters"].get("previousImage"),
            "bakes": len(statements),
        }
    app = record.app
    layers = [
        {
            "name": LAYER_NAMES[i] if i < len(LAYER_NAMES) else f"layer{i}",
            "digest": d["digest"],
            "size": d["size"],
        }
        for i, d in enumerate(manifest["layers"])
    ]
    env_names = [e.split("=", 1)[0] for e in runcfg.get("Env", [])]
    return {
        "digest": digest,
        "app": app,
        "tags": list(record.tags),
        "created": ann.get("org.opencontainers.image.created"),
        "size": sum(layer["size"] for layer in layers),
        "layers": layers,
        "source": {
            "repository": ann.get("org.opencontainers.image.source"),
            "revision": ann.get("org.opencontainers.image.revision"),
            "version": ann.get("org.opencontainers.image.version"),
            "dirty": ann.get("dev.kiln.dirty") == "true",
        },
        "build": built,
        "base": {
            "name": ann.get("org.opencontainers.image.base.name"),
            "digest": ann.get("org.opencontainers.image.base.digest"),
            "python": ann.get("dev.kiln.python"),
        },
        "lock_digest": ann.get("dev.kiln.lock.digest"),
        "run": {
            "command": json.loads(ann.get("dev.kiln.command", "[]")),
            "user": runcfg.get("User"),
            "workdir": runcfg.get("WorkingDir"),
            "port": int(ann.get("dev.kiln.port", "0") or 0),
            "env": env_names,
        },
        "health": {
            "path": ann.get("dev.kiln.health.path"),
            "timeout": ann.get("dev.kiln.health.timeout"),
        },
        "how": {
            "start": f"kiln release {record.short} --env ENV  (or kiln export, then podman load/run)",
            "validate": f"kiln test {record.short}",
            "monitor": f"kiln status --env ENV; kiln logs --env ENV; GET {ann.get('dev.kiln.health.path')}",
            "update": "change the source, then kiln bake && kiln release (never patch an instance)",
        },
        "sbom": {
            "format": "CycloneDX 1.5" if bom else None,
            "python_packages": python_packages(bom),
            "debian_packages": len(_debian_packages(bom)),
        },
        "attestations": [
            {"type": d.artifact_type, "digest": d.digest} for d in store.referrers(digest)
        ],
        "tests": latest_tests(store, digest),
        "annotations": ann,
        "provenance": last,
    }


def image_files(store: ImageStore, digest: str) -> dict[str, Member]:
    """The image's merged filesystem as its layers stack up (whiteouts applied)."""
    files: dict[str, Member] = {}
    for layer in store.layers(digest):
        for path, member in list_layer(store, layer.digest).items():
            name = path.rsplit("/", 1)[-1]
            if name.startswith(".wh."):
                gone = path.rsplit("/", 1)[0] + "/" + name.removeprefix(".wh.")
                for key in [k for k in files if k == gone or k.startswith(gone + "/")]:
                    del files[key]
                continue
            files[path] = member
    return files


def _changes(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {
        "added": {k: b[k] for k in sorted(b.keys() - a.keys())},
        "removed": {k: a[k] for k in sorted(a.keys() - b.keys())},
        "changed": {k: [a[k], b[k]] for k in sorted(a.keys() & b.keys()) if a[k] != b[k]},
    }


def diff(store: ImageStore, a: ImageRecord, b: ImageRecord) -> dict[str, Any]:
    """Files, dependencies and settings that differ from image ``a`` to image ``b``."""
    layers_a = {d.digest for d in store.layers(a.digest)}
    layers_b = {d.digest for d in store.layers(b.digest)}
    files_a = {
        p: f"{m.kind} {m.mode:o} {m.sha256[:12] or m.linkname}"
        for p, m in image_files(store, a.digest).items()
    }
    files_b = {
        p: f"{m.kind} {m.mode:o} {m.sha256[:12] or m.linkname}"
        for p, m in image_files(store, b.digest).items()
    }
    file_changes = _changes(files_a, files_b)
    cfg_a, cfg_b = store.image_config(a.digest)["config"], store.image_config(b.digest)["config"]
    settings_a = {k: json.dumps(v, sort_keys=True) for k, v in cfg_a.items() if k != "Labels"}
    settings_b = {k: json.dumps(v, sort_keys=True) for k, v in cfg_b.items() if k != "Labels"}
    ann_a = store.manifest(a.digest).get("annotations", {})
    ann_b = store.manifest(b.digest).get("annotations", {})
    bom_a, bom_b = sbom(store, a.digest), sbom(store, b.digest)
    return {
        "a": a.digest,
        "b": b.digest,
        "shared_layers": len(layers_a & layers_b),
        "files": {k: sorted(v) for k, v in file_changes.items()},
        "file_details": file_changes,
        "python_packages": _changes(python_packages(bom_a), python_packages(bom_b)),
        "debian_packages": _changes(_debian_packages(bom_a), _debian_packages(bom_b)),
        "config": _changes(settings_a, settings_b),
        "annotations": _changes(ann_a, ann_b),
    }


def _tar_add(
    tar: tarfile.TarFile, name: str, data: bytes | None = None, path: Path | None = None
) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    if path is not None:
        info.size = path.stat().st_size
        with open(path, "rb") as fh:
            tar.addfile(info, fh)
    else:
        payload = data or b""
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))


def export(store: ImageStore, record: ImageRecord, out: Path, ref: str | None = None) -> int:
    """Write ``record`` as an OCI archive (image layout in a tar); returns its size.

    Every blob is verified before it is written, so a corrupt store never
    produces an archive that looks fine.
    """
    digest = record.digest
    manifest_bytes = store.read_bytes(digest)
    manifest = json.loads(manifest_bytes)
    blobs = [manifest["config"], *manifest["layers"]]
    for blob in blobs:
        store.verify_blob(blob["digest"], blob["size"])
    name = ref or (f"{record.app}:{record.tags[0]}" if record.tags else record.app)
    index = {
        "schemaVersion": 2,
        "mediaType": oci.INDEX,
        "manifests": [
            {
                "mediaType": oci.MANIFEST,
                "digest": digest,
                "size": len(manifest_bytes),
                "annotations": {oci.REF_NAME: name},
            }
        ],
    }
    if out.exists() and out.is_dir():
        raise UsageError(f"{out} is a directory; give a file name, e.g. {out / 'image.tar'}")
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            _tar_add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            _tar_add(tar, "index.json", oci.canonical_json(index))
            _tar_add(tar, f"blobs/sha256/{digest.removeprefix('sha256:')}", manifest_bytes)
            for blob in blobs:
                _tar_add(
                    tar,
                    f"blobs/sha256/{blob['digest'].removeprefix('sha256:')}",
                    path=store.blob_path(blob["digest"]),
                )
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return out.stat().st_size
