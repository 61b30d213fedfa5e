"""Deterministic layer tarballs.

The same files always give the same bytes: entries sorted by path, owner and
group numeric with no names, timestamps fixed (or clamped) to the build's
epoch, no access/change times, and gzip with a zeroed header. The
uncompressed stream is hashed as it is written (the layer's ``diff_id``) and
the compressed one is stored as the blob (the layer's digest).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kiln import oci
from kiln.store import ImageStore

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Layer:
    """A stored layer: ``digest`` of the gzip blob, ``diff_id`` of the tar inside."""

    digest: str
    diff_id: str
    size: int
    media_type: str = oci.LAYER_GZIP

    def descriptor(self) -> oci.Descriptor:
        return oci.Descriptor(self.media_type, self.digest, self.size)

    def to_json(self) -> dict[str, object]:
        return {"digest": self.digest, "diff_id": self.diff_id, "size": self.size}


@dataclass(frozen=True)
class Entry:
    """One member of a layer; ``source`` is a host path or literal bytes."""

    name: str
    kind: bytes
    mode: int
    uid: int = 0
    gid: int = 0
    source: Path | bytes | Callable[[], IO[bytes]] | None = None
    linkname: str = ""
    mtime: int | None = None
    size: int = 0

    @property
    def sort_key(self) -> tuple[str, ...]:
        return tuple(self.name.split("/"))


def file_entry(name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(name, tarfile.REGTYPE, mode, uid, gid, data)


def dir_entry(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(name, tarfile.DIRTYPE, mode, uid, gid)


def tree_entries(
    root: Path,
    prefix: str = "",
    *,
    keep: Callable[[str], bool] | None = None,
    owner: tuple[int, int] | None = None,
    keep_mtime: bool = False,
    normalize: bool = False,
) -> list[Entry]:
    """Everything below ``root`` as entries named ``prefix/relative``.

    ``keep`` filters relative paths; ``owner`` forces uid/gid (app files are
    root-owned whoever checked them out); sockets, fifos and device nodes are
    left out (the runtime provides /dev). ``normalize`` reduces modes to
    0755/0644 so a checkout's umask does not change the image.
    """
    entries: list[Entry] = []
    seen_inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if keep is not None and not keep(rel):
                if name in dirnames:
                    dirnames.remove(name)
                continue
            path = Path(dirpath) / name
            st = path.lstat()
            uid, gid = owner if owner else (st.st_uid, st.st_gid)
            mode = stat.S_IMODE(st.st_mode)
            if normalize:
                mode = 0o755 if stat.S_ISDIR(st.st_mode) or mode & 0o111 else 0o644
            arc = f"{prefix}/{rel}" if prefix else rel
            mtime = int(st.st_mtime) if keep_mtime else None
            if stat.S_ISDIR(st.st_mode):
                entries.append(Entry(arc, tarfile.DIRTYPE, mode, uid, gid, mtime=mtime))
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
                entries.append(
                    Entry(arc, tarfile.SYMTYPE, mode, uid, gid, linkname=target, mtime=mtime)
                )
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen_inodes:
                    entries.append(
                        Entry(
                            arc,
                            tarfile.LNKTYPE,
                            mode,
                            uid,
                            gid,
                            linkname=seen_inodes[key],
                            mtime=mtime,
                        )
                    )
                else:
                    seen_inodes[key] = arc
                    entries.append(Entry(arc, tarfile.REGTYPE, mode, uid, gid, path, mtime=mtime))
    return entries


class _Sink(io.RawIOBase):
    """tar → (sha256 of tar) → gzip → blob writer, in one pass."""

    def __init__(self, write_out: Callable[[bytes], object]) -> None:
        self._out = write_out
        self.diff_hash = hashlib.sha256()
        self._z = zlib.compressobj(6, zlib.DEFLATED, 31)

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self.diff_hash.update(data)
        out = self._z.compress(data)
        if out:
            self._out(out)
        return len(data)

    def finish(self) -> None:
        self._out(self._z.flush())


def write_layer(
    store: ImageStore, entries: Iterable[Entry], epoch: int, *, clamp: bool = False
) -> Layer:
    """Store a layer made of ``entries``; returns its digests.

    With ``clamp`` an entry keeps its own mtime when older than ``epoch``
    (the Debian base: compiled .pyc files record their sources' mtimes);
    otherwise every mtime is ``epoch``.
    """
    ordered = sorted(entries, key=lambda e: e.sort_key)
    writer = store.writer()
    try:
        sink = _Sink(writer.write)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for entry in ordered:
                _add(tar, entry, epoch, clamp)
        sink.finish()
        diff_id = "sha256:" + sink.diff_hash.hexdigest()
        digest = writer.commit()
    except BaseException:
        writer.discard()
        raise
    return Layer(digest=digest, diff_id=diff_id, size=writer.size)


def _add(tar: tarfile.TarFile, entry: Entry, epoch: int, clamp: bool) -> None:
    info = tarfile.TarInfo(entry.name + ("/" if entry.kind == tarfile.DIRTYPE else ""))
    info.type = entry.kind
    info.mode = entry.mode
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    own = entry.mtime if entry.mtime is not None else epoch
    info.mtime = min(own, epoch) if clamp else epoch
    info.linkname = entry.linkname
    if entry.kind != tarfile.REGTYPE:
        tar.addfile(info)
        return
    if isinstance(entry.source, bytes):
        info.size = len(entry.source)
        tar.addfile(info, io.BytesIO(entry.source))
    elif isinstance(entry.source, Path):
        with open(entry.source, "rb") as fh:
            info.size = os.fstat(fh.fileno()).st_size
            tar.addfile(info, fh)
    elif entry.source is None:
        info.size = 0
        tar.addfile(info)
    else:
        info.size = entry.size
        with entry.source() as fh:
            tar.addfile(info, fh)


@dataclass(frozen=True)
class Member:
    """What a layer says of one path: enough to tell two images apart."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    sha256: str
    linkname: str


_KINDS = {
    tarfile.REGTYPE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
}


def list_layer(store: ImageStore, digest: str) -> dict[str, Member]:
    """Every member of a stored layer, after verifying the blob's digest."""
    store.verify_blob(digest)
    members: dict[str, Member] = {}
    with tarfile.open(store.blob_path(digest), mode="r:gz") as tar:
        for info in tar:
            content = ""
            if info.isreg():
                fh = tar.extractfile(info)
                h = hashlib.sha256()
                if fh is not None:
                    while chunk := fh.read(_CHUNK):
                        h.update(chunk)
                content = h.hexdigest()
            members["/" + info.name.rstrip("/")] = Member(
                kind=_KINDS.get(info.type, "other"),
                mode=info.mode,
                uid=info.uid,
                gid=info.gid,
                size=info.size,
                sha256=content,
                linkname=info.linkname,
            )
    return members
