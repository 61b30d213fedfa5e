"""The image store: an OCI image layout under ``KILN_HOME/images``.

Blobs are content-addressed and written to a private temporary directory
first, then renamed into place, so a bake killed at any moment leaves either
a whole blob or none. ``index.json`` is the only mutable file; it is
rewritten atomically under a lock and always last, so an image appears only
once everything it references is stored. Reads verify digests.

Each stored image has one index entry per tag (``ref.name`` = ``app:tag``)
or, once all its tags moved on, one untagged entry. Attestations (provenance,
SBOM, test results) are OCI 1.1 artifact manifests whose ``subject`` is the
image, listed in the same index.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from kiln import oci
from kiln.errors import ImageNotFound, StoreError

APP_ANNOTATION = "dev.kiln.app"
STORED_ANNOTATION = "dev.kiln.stored"
SUBJECT_ANNOTATION = "dev.kiln.subject"
_HEX_RE = re.compile(r"^[0-9a-f]{12,64}$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ImageRecord:
    digest: str
    app: str
    tags: tuple[str, ...]
    stored: str
    size: int

    @property
    def short(self) -> str:
        return self.digest.removeprefix("sha256:")[:12]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BlobWriter:
    """Stream bytes into the store, hashing as they go; commit() renames into place."""

    def __init__(self, store: ImageStore) -> None:
        self._store = store
        fd, name = tempfile.mkstemp(dir=store.scratch(), prefix="blob.")
        self.path = Path(name)
        self._fh: BinaryIO = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._fh.write(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._fh.flush()

    def commit(self) -> str:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        digest = "sha256:" + self._hash.hexdigest()
        self._store.adopt(self.path, digest)
        return digest

    def discard(self) -> None:
        self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._scratch: Path | None = None

    # -- layout -----------------------------------------------------------
    def init(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        layout = self.root / "oci-layout"
        if not layout.exists():
            atomic_write(layout, b'{"imageLayoutVersion":"1.0.0"}')
        if not (self.root / "index.json").exists():
            self._write_index([])
        self._sweep_scratch()

    def _sweep_scratch(self) -> None:
        """Remove temporary files left by bakes that died (their pid is gone)."""
        tmp = self.root / "tmp"
        if not tmp.is_dir():
            return
        for entry in tmp.iterdir():
            pid_text = entry.name.split("-", 1)[0]
            if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                shutil.rmtree(entry, ignore_errors=True)

    def scratch(self) -> Path:
        """A temporary directory on the store's filesystem, private to this process."""
        if self._scratch is None or not self._scratch.exists():
            tmp = self.root / "tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            self._scratch = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{os.getpid()}-"))
        return self._scratch

    def cleanup(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # -- blobs ------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexpart):
            raise StoreError(f"not a sha256 digest: {digest!r}")
        return self.root / "blobs" / "sha256" / hexpart

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def adopt(self, path: Path, digest: str) -> None:
        """Move an already-hashed temporary file into place as ``digest``."""
        target = self.blob_path(digest)
        if target.exists():
            path.unlink()
            return
        os.chmod(path, 0o444)
        os.replace(path, target)
        _fsync_dir(target.parent)

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def put_bytes(self, data: bytes) -> str:
        digest = oci.sha256_digest(data)
        if not self.has_blob(digest):
            w = self.writer()
            w.write(data)
            w.commit()
        return digest

    def put_json(self, value: Any) -> tuple[str, int]:
        data = oci.canonical_json(value)
        return self.put_bytes(data), len(data)

    def put_artifact(
        self, subject: str, subject_size: int, artifact_type: str, payload: bytes
    ) -> oci.Descriptor:
        """Store ``payload`` as an OCI 1.1 artifact manifest whose subject is an image.

        Only blobs are written; the returned descriptor is published with
        :meth:`add_image` or :meth:`add_referrer`.
        """
        blob = self.put_bytes(payload)
        empty = self.put_bytes(oci.EMPTY_JSON)
        manifest = {
            "schemaVersion": 2,
            "mediaType": oci.MANIFEST,
            "artifactType": artifact_type,
            "config": {"mediaType": oci.EMPTY, "digest": empty, "size": len(oci.EMPTY_JSON)},
            "layers": [{"mediaType": artifact_type, "digest": blob, "size": len(payload)}],
            "subject": {"mediaType": oci.MANIFEST, "digest": subject, "size": subject_size},
        }
        data = oci.canonical_json(manifest)
        digest = self.put_bytes(data)
        return oci.Descriptor(
            oci.MANIFEST, digest, len(data), ((SUBJECT_ANNOTATION, subject),), artifact_type
        )

    def read_bytes(self, digest: str) -> bytes:
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise StoreError(
                f"blob {digest} is missing from the store at {self.root}",
                hint="re-bake the image",
            ) from exc
        if oci.sha256_digest(data) != digest:
            raise StoreError(
                f"blob {digest} in {self.root} is corrupt: its content does not match its digest",
                hint="re-bake the image; the store refuses tampered content",
            )
        return data

    def read_json(self, digest: str) -> dict[str, Any]:
        value = json.loads(self.read_bytes(digest))
        if not isinstance(value, dict):
            raise StoreError(f"blob {digest} is not a JSON object")
        return value

    def verify_blob(self, digest: str, size: int | None = None) -> None:
        path = self.blob_path(digest)
        h = hashlib.sha256()
        n = 0
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
                    n += len(chunk)
        except FileNotFoundError as exc:
            raise StoreError(f"blob {digest} is missing from the store at {self.root}") from exc
        if "sha256:" + h.hexdigest() != digest or (size is not None and size != n):
            raise StoreError(
                f"blob {digest} in {self.root} is corrupt: its content does not match its digest",
                hint="re-bake the image; the store refuses tampered content",
            )

    # -- index ------------------------------------------------------------
    def _read_index(self) -> list[oci.Descriptor]:
        path = self.root / "index.json"
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return []
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path} is corrupt: {exc}") from exc
        return [oci.Descriptor.from_json(m) for m in raw.get("manifests", [])]

    def _write_index(self, entries: list[oci.Descriptor]) -> None:
        doc = {
            "schemaVersion": 2,
            "mediaType": oci.INDEX,
            "manifests": [e.to_json() for e in entries],
        }
        atomic_write(self.root / "index.json", json.dumps(doc, indent=1, sort_keys=True).encode())

    def add_image(
        self,
        manifest_digest: str,
        size: int,
        app: str,
        tags: list[str],
        referrers: Sequence[oci.Descriptor] = (),
    ) -> None:
        """Record an image (whose blobs are all stored) with its attestations, and
        move ``tags`` onto it, in one atomic update of the index."""
        moving = {f"{app}:{t}" for t in tags}
        with self.locked():
            entries = self._read_index()
            mine = [e for e in entries if e.artifact_type is None and e.digest == manifest_digest]
            stored = next(
                (s for e in mine if (s := e.annotation(STORED_ANNOTATION))),
                datetime.now(UTC).isoformat(timespec="seconds"),
            )
            refs = moving | {r for e in mine if (r := e.annotation(oci.REF_NAME))}
            displaced = [
                e
                for e in entries
                if e.artifact_type is None
                and e.digest != manifest_digest
                and e.annotation(oci.REF_NAME) in moving
            ]
            kept = [e for e in entries if e not in mine and e not in displaced]
            common = {APP_ANNOTATION: app, STORED_ANNOTATION: stored}
            plain = oci.Descriptor(oci.MANIFEST, manifest_digest, size)
            kept.extend(plain.with_annotations({**common, oci.REF_NAME: r}) for r in sorted(refs))
            if not refs:
                kept.append(plain.with_annotations(common))
            # An image whose tags all moved elsewhere stays listed, untagged.
            for e in displaced:
                if not any(k.digest == e.digest and k.artifact_type is None for k in kept):
                    untagged = {k: v for k, v in e.annotations if k != oci.REF_NAME}
                    kept.append(
                        oci.Descriptor(e.media_type, e.digest, e.size).with_annotations(untagged)
                    )
            kept += [r for r in referrers if not any(k.digest == r.digest for k in kept)]
            self._write_index(kept)

    def add_referrer(self, descriptor: oci.Descriptor) -> None:
        """Attach an attestation (e.g. test results) to an image already stored."""
        with self.locked():
            entries = self._read_index()
            if not any(e.digest == descriptor.digest for e in entries):
                entries.append(descriptor)
                self._write_index(entries)

    def images(self) -> list[ImageRecord]:
        grouped: dict[str, list[oci.Descriptor]] = {}
        for e in self._read_index():
            if e.artifact_type is None and e.media_type == oci.MANIFEST:
                grouped.setdefault(e.digest, []).append(e)
        records = []
        for digest, descs in grouped.items():
            tags = tuple(
                sorted(r.split(":", 1)[1] for d in descs if (r := d.annotation(oci.REF_NAME)))
            )
            records.append(
                ImageRecord(
                    digest=digest,
                    app=descs[0].annotation(APP_ANNOTATION) or "",
                    tags=tags,
                    stored=descs[0].annotation(STORED_ANNOTATION) or "",
                    size=descs[0].size,
                )
            )
        records.sort(key=lambda r: (r.stored, r.digest))
        return records

    def referrers(self, subject: str, artifact_type: str | None = None) -> list[oci.Descriptor]:
        return [
            e
            for e in self._read_index()
            if e.artifact_type is not None
            and e.annotation(SUBJECT_ANNOTATION) == subject
            and (artifact_type is None or e.artifact_type == artifact_type)
        ]

    def resolve(self, ref: str) -> ImageRecord:
        """A full digest, a unique hex prefix (≥ 12), or ``APP:TAG`` → the image."""
        records = self.images()
        ref = ref.strip()
        if ":" in ref and not ref.startswith("sha256:"):
            app, _, tag = ref.partition(":")
            for r in records:
                if r.app == app and tag in r.tags:
                    return r
            raise ImageNotFound(f"no image tagged {ref!r}", hint="see 'kiln images'")
        hexpart = ref.removeprefix("sha256:")
        if not _HEX_RE.match(hexpart):
            if ":" not in ref:
                tagged = [r for r in records if r.app == ref and "latest" in r.tags]
                if tagged:
                    return tagged[0]
            raise ImageNotFound(
                f"{ref!r} is not an image reference",
                hint="use a digest, a digest prefix of at least 12 hex digits, or APP:TAG",
            )
        matches = [r for r in records if r.digest.removeprefix("sha256:").startswith(hexpart)]
        if not matches:
            raise ImageNotFound(f"no image {ref!r} in this store", hint="see 'kiln images'")
        if len(matches) > 1:
            raise ImageNotFound(
                f"{ref!r} is ambiguous: it matches {len(matches)} images",
                hint="give more digits",
            )
        return matches[0]

    # -- images -----------------------------------------------------------
    def manifest(self, digest: str) -> dict[str, Any]:
        return self.read_json(digest)

    def image_config(self, digest: str) -> dict[str, Any]:
        manifest = self.manifest(digest)
        return self.read_json(manifest["config"]["digest"])

    def layers(self, digest: str) -> list[oci.Descriptor]:
        return [oci.Descriptor.from_json(layer) for layer in self.manifest(digest)["layers"]]
