"""OCI image-spec 1.1 vocabulary: media types, descriptors, canonical JSON."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"

IN_TOTO = "application/vnd.in-toto+json"
CYCLONEDX = "application/vnd.cyclonedx+json"
TEST_RESULT = "application/vnd.kiln.test-result+json"

REF_NAME = "org.opencontainers.image.ref.name"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """Byte-stable JSON: the same value always hashes to the same digest."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: tuple[tuple[str, str], ...] = ()
    artifact_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Descriptor:
        return cls(
            media_type=raw["mediaType"],
            digest=raw["digest"],
            size=int(raw["size"]),
            annotations=tuple(sorted((raw.get("annotations") or {}).items())),
            artifact_type=raw.get("artifactType"),
        )

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)

    def with_annotations(self, values: dict[str, str]) -> Descriptor:
        merged = dict(self.annotations)
        merged.update(values)
        return Descriptor(
            self.media_type,
            self.digest,
            self.size,
            tuple(sorted(merged.items())),
            self.artifact_type,
        )
