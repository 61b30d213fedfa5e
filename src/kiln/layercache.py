"""Layers cached by their inputs in the shared build cache.

A cached layer is built once per machine (per ``KILN_CACHE_DIR``) into a
private staging store, then its blob and metadata are renamed into the cache
folder; a ``meta.json`` present means the entry is whole. Concurrent bakes
wait on a lock file rather than building the same thing twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kiln.home import cache_dir
from kiln.store import ImageStore, atomic_write
from kiln.tarball import Layer

Builder = Callable[[ImageStore], tuple[Layer, dict[str, Any]]]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield


def cached_layer(
    kind: str, key: str, store: ImageStore, build: Builder
) -> tuple[Layer, dict[str, Any], bool]:
    """The layer for ``key``, stored in ``store``; returns (layer, metadata, was_cached)."""
    folder = cache_dir() / kind / key
    with _locked(folder.parent / f"{key}.lock"):
        meta_path = folder / "meta.json"
        was_cached = meta_path.is_file()
        if not was_cached:
            staging_root = folder.parent / f".staging-{key}-{os.getpid()}"
            shutil.rmtree(staging_root, ignore_errors=True)
            try:
                staging = ImageStore(staging_root)
                staging.init()
                layer, extra = build(staging)
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / ".layer.tmp"
                shutil.copyfile(staging.blob_path(layer.digest), tmp)
                os.replace(tmp, folder / "layer.tar.gz")
                meta = {"layer": layer.to_json(), **extra}
                atomic_write(meta_path, json.dumps(meta, indent=1).encode())
            finally:
                shutil.rmtree(staging_root, ignore_errors=True)
        meta = json.loads(meta_path.read_text())
        raw = meta["layer"]
        layer = Layer(raw["digest"], raw["diff_id"], raw["size"])
        if not store.has_blob(layer.digest):
            tmp = store.scratch() / f"{kind}.tar.gz"
            shutil.copyfile(folder / "layer.tar.gz", tmp)
            store.adopt(tmp, layer.digest)
        # The cache is shared and long-lived: never trust it without checking.
        store.verify_blob(layer.digest, layer.size)
    return layer, meta, was_cached
