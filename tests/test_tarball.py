from __future__ import annotations

import os
import tarfile
from pathlib import Path

from kiln.store import ImageStore
from kiln.tarball import list_layer, tree_entries, write_layer


def make_tree(root: Path, mtime: int) -> None:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("print('a')\n")
    (root / "pkg" / "run.sh").write_text("#!/bin/sh\n")
    (root / "pkg" / "run.sh").chmod(0o775)
    os.link(root / "pkg" / "a.py", root / "pkg" / "hard.py")
    os.symlink("a.py", root / "pkg" / "link.py")
    for p in root.rglob("*"):
        os.utime(p, (mtime, mtime), follow_symlinks=False)


def test_same_files_give_same_layer_whatever_their_times_and_umask(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    store.init()
    make_tree(tmp_path / "one", 1_000_000)
    make_tree(tmp_path / "two", 2_000_000)
    (tmp_path / "two" / "pkg" / "a.py").chmod(0o600)  # another umask
    layers = [
        write_layer(store, tree_entries(tmp_path / n, "app", owner=(0, 0), normalize=True), 42)
        for n in ("one", "two")
    ]
    assert layers[0] == layers[1]


def test_layer_members_are_sorted_normalised_and_linked(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    store.init()
    make_tree(tmp_path / "src", 5)
    layer = write_layer(
        store, tree_entries(tmp_path / "src", "app", owner=(0, 0), normalize=True), 42
    )
    with tarfile.open(store.blob_path(layer.digest), "r:gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == [
        "app/pkg",
        "app/pkg/a.py",
        "app/pkg/hard.py",
        "app/pkg/link.py",
        "app/pkg/run.sh",
    ]
    assert all(m.mtime == 42 and m.uid == 0 and m.uname == "" for m in members)
    by_name = {m.name: m for m in members}
    assert by_name["app/pkg/hard.py"].islnk()
    assert by_name["app/pkg/link.py"].issym()
    assert by_name["app/pkg/run.sh"].mode == 0o755
    listing = list_layer(store, layer.digest)
    assert listing["/app/pkg/a.py"].kind == "file"
