"""Bake: cold (no cached base), warm after a one-line change, no change; sizes.

References: the cold bake is compared with mmdebstrap alone building the same
Debian packages (the floor no baker can beat); sizes are compared with a
python:3.11-slim-style layout built the same way, Debian's apt variant with
python3, pip and venv (what a `FROM debian:bookworm-slim` + `apt-get install
python3-pip` Dockerfile ships; Docker Hub is not reachable here, so the
official image itself cannot be measured).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.common import Row, copy_app, kiln, workdir


def _timed_bake(app: Path, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    out = kiln("bake", str(app), "--json", env=env).stdout
    return time.perf_counter() - start, json.loads(out)


def _mmdebstrap_seconds(out: Path, variant: str, include: str) -> tuple[float, int]:
    start = time.perf_counter()
    subprocess.run(
        [
            "mmdebstrap",
            "--quiet",
            f"--variant={variant}",
            f"--include={include}",
            "bookworm",
            str(out),
        ],
        check=True,
        env={**os.environ, "SOURCE_DATE_EPOCH": "1767225600"},
    )
    return time.perf_counter() - start, out.stat().st_size


def run(console: Console) -> list[Row]:
    tmp = workdir("bake")
    env = {
        "KILN_HOME": str(tmp / "home"),
        "KILN_CACHE_DIR": str(tmp / "cache"),
        "SOURCE_DATE_EPOCH": "1767225600",
    }
    app = copy_app(tmp / "hello")

    console.print("  cold bake (builds the Debian base)…")
    cold, first = _timed_bake(app, env)
    console.print("  mmdebstrap alone, same packages…")
    floor, _ = _mmdebstrap_seconds(tmp / "floor.tar", "essential", "python3,ca-certificates,tzdata")

    module = app / "hello" / "__init__.py"
    module.write_text(module.read_text() + "\n# one-line change\n")
    warm, second = _timed_bake(app, env)
    nochange, third = _timed_bake(app, env)
    assert third["digest"] == second["digest"]

    console.print("  python:3.11-slim-style layout for size…")
    _, slim_tar = _mmdebstrap_seconds(
        tmp / "slim.tar", "apt", "python3,python3-pip,python3-venv,ca-certificates"
    )
    layers = {layer["name"]: layer["size"] for layer in first["layers"]}
    home_images = Path(env["KILN_HOME"]) / "images" / "blobs" / "sha256"
    uncompressed = 0
    for layer in first["layers"]:
        with gzip.open(home_images / layer["digest"].removeprefix("sha256:")) as fh:
            while chunk := fh.read(1 << 20):
                uncompressed += len(chunk)
    rows = [
        Row("bake: cold (base not cached)", cold, "s", floor, "mmdebstrap alone"),
        Row(
            "bake: warm, one-line code change",
            warm,
            "s",
            cold,
            "cold bake",
            "only the app layer is rebuilt",
        ),
        Row("bake: no change (cache hit)", nochange, "s", cold, "cold bake", "same digest"),
        Row("image size, compressed (base)", layers["base"] / 1e6, "MB"),
        Row("image size, compressed (dependencies)", layers["dependencies"] / 1e6, "MB"),
        Row("image size, compressed (app)", layers["app"] / 1e6, "MB"),
        Row(
            "image size, uncompressed (all layers)",
            uncompressed / 1e6,
            "MB",
            slim_tar / 1e6,
            "slim-style OS+python3+pip, no app",
        ),
    ]
    return rows
