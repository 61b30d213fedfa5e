"""The compliance suite: the policy in ``[test.compliance]`` held against the image."""

from __future__ import annotations

import re

from kiln.config import AppConfig
from kiln.images import image_size, sbom
from kiln.store import ImageRecord, ImageStore
from kiln.testing.results import SuiteResult

# Spellings found in package metadata → the names policies use.
_LICENSE_NAMES = (
    (r"\bmit\b", "MIT"),
    (r"\b0bsd\b", "0BSD"),
    (r"\bbsd\b", "BSD"),
    (r"apache", "Apache-2.0"),
    (r"\bisc\b", "ISC"),
    (r"python software foundation|\bpsf\b", "PSF"),
    (r"mozilla|\bmpl\b", "MPL-2.0"),
    (r"\blgpl\b|lesser general public", "LGPL"),
    (r"\bagpl\b|affero", "AGPL"),
    (r"\bgpl\b|general public license", "GPL"),
    (r"unlicense", "Unlicense"),
)


def license_names(text: str) -> set[str]:
    """Every license a metadata string mentions (an OR expression mentions several)."""
    lowered = text.lower()
    found = set()
    for pattern, name in _LICENSE_NAMES:
        if re.search(pattern, lowered):
            found.add(name)
            if name in ("LGPL", "AGPL"):
                lowered = re.sub(pattern, "", lowered)  # so "LGPL" is not also read as "GPL"
    return found


def _allowed(names: set[str], allowed: tuple[str, ...]) -> bool:
    wanted = {a.lower() for a in allowed}
    return any(n.lower() in wanted or n.split("-")[0].lower() in wanted for n in names)


def run_compliance(
    suite: SuiteResult, store: ImageStore, record: ImageRecord, config: AppConfig
) -> None:
    policy = config.test.compliance
    annotations = store.manifest(record.digest).get("annotations", {})
    missing = [label for label in policy.required_labels if not annotations.get(label)]
    suite.add(
        "required OCI labels present",
        not missing,
        f"{len(policy.required_labels)} required",
        [f"{label}: missing" for label in missing],
    )
    base = annotations.get("org.opencontainers.image.base.name", "")
    suite.add(
        "base image from the allowed list",
        base in policy.allowed_bases,
        f"{base or '(none)'}; allowed: {', '.join(policy.allowed_bases)}",
    )
    bom = sbom(store, record.digest) or {}
    problems = []
    counted = 0
    for comp in bom.get("components", []):
        if not comp.get("purl", "").startswith("pkg:pypi/"):
            continue
        counted += 1
        text = " ".join(
            lic.get("license", {}).get("name", "") or lic.get("expression", "")
            for lic in comp.get("licenses", [])
        )
        names = license_names(text)
        if not names:
            problems.append(
                f"{comp['name']}=={comp['version']}: license unknown ({text or 'not declared'})"
            )
        elif not _allowed(names, policy.allowed_licenses):
            problems.append(f"{comp['name']}=={comp['version']}: {text} is not in the allowed set")
    suite.add(
        "dependency licenses within the allowed set",
        not problems,
        f"{counted} Python packages from the CycloneDX SBOM; allowed: {', '.join(policy.allowed_licenses)}",
        problems,
    )
    if policy.max_size is not None:
        size = image_size(store, record.digest)
        suite.add(
            "image size under the limit",
            size <= policy.max_size,
            f"{size / 1e6:.1f} MB of {policy.max_size / 1e6:.1f} MB",
        )
