"""Unpacked images: the read-only root filesystems instances run from.

An image is unpacked once per digest into ``KILN_HOME/rootfs/<hex>``: every
layer blob is verified against its digest first (a tampered store is refused
with the name of the bad blob), the layers are extracted into a temporary
directory, and the directory is renamed into place only when whole. A rootfs
that exists is therefore complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tarfile
from pathlib import Path

from kiln.errors import StoreError
from kiln.store import ImageStore


def rootfs_path(home_rootfs: Path, digest: str) -> Path:
    return home_rootfs / digest.removeprefix("sha256:")


def ensure_rootfs(store: ImageStore, home_rootfs: Path, digest: str) -> Path:
    """The unpacked root filesystem of ``digest``, unpacking it if needed."""
    target = rootfs_path(home_rootfs, digest)
    if target.is_dir():
        return target
    home_rootfs.mkdir(parents=True, exist_ok=True)
    with open(home_rootfs / ".lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if target.is_dir():
            return target
        layers = store.layers(digest)
        for layer in layers:
            store.verify_blob(layer.digest, layer.size)
        tmp = home_rootfs / f".unpack-{os.getpid()}-{target.name[:12]}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o755)
        try:
            for layer in layers:
                _extract(store.blob_path(layer.digest), tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
        except (OSError, tarfile.TarError) as exc:
            raise StoreError(f"cannot unpack image {digest}: {exc}") from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _extract(blob: Path, dest: Path) -> None:
    with tarfile.open(blob, mode="r:gz") as tar:
        for member in tar:
            parent, _, name = member.name.rstrip("/").rpartition("/")
            if name.startswith(".wh."):
                # An OCI whiteout: the path it names is deleted by this layer.
                gone = dest / parent / name.removeprefix(".wh.")
                if gone.is_dir() and not gone.is_symlink():
                    shutil.rmtree(gone)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        gone.unlink()
                continue
            # "tar" refuses paths outside dest and strips setuid/setgid bits:
            # nothing inside a sandbox needs them.
            tar.extract(member, dest, filter="tar")


def remove_unused(home_rootfs: Path, keep: set[str]) -> list[str]:
    """Delete unpacked images whose digest is not in ``keep``; returns what went."""
    removed: list[str] = []
    if not home_rootfs.is_dir():
        return removed
    for entry in home_rootfs.iterdir():
        if entry.name.startswith(".") or f"sha256:{entry.name}" in keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed
