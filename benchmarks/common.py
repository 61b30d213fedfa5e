"""What every benchmark reports: a figure, the reference measured beside it, their ratio."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KILN = Path(sys.executable).parent / "kiln"


@dataclass
class Row:
    name: str
    value: float
    unit: str
    reference: float | None = None
    reference_name: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.reference in (None, 0):
            return None
        return self.value / self.reference  # type: ignore[operator]

    def cells(self) -> tuple[str, str, str, str, str]:
        ref = (
            f"{self.reference:,.3g} {self.unit} ({self.reference_name})"
            if self.reference is not None
            else "-"
        )
        ratio = f"{self.ratio:.2f}x" if self.ratio is not None else "-"
        return (self.name, f"{self.value:,.3g} {self.unit}", ref, ratio, self.note)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "reference": self.reference,
            "reference_name": self.reference_name,
            "ratio": self.ratio,
            "note": self.note,
        }


def workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"kiln-bench-{prefix}-"))


def kiln(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(KILN), *args], capture_output=True, text=True, env={**os.environ, **env}, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"kiln {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def copy_app(dest: Path) -> Path:
    shutil.copytree(REPO / "examples" / "hello", dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest
