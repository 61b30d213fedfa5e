"""The app's own files: which ones go into the image, and the layer that holds them.

``[build].include`` and ``exclude`` are gitignore-style patterns relative to
the app's directory; the app's ``.gitignore`` and a fixed list of tool
droppings (VCS folders, virtualenvs, caches, compiled bytecode) are always
left out. ``kiln.toml`` and the lock always go in, so an image carries the
defaults it was baked with.
"""

from __future__ import annotations

import os
from pathlib import Path

import pathspec

from kiln.config import AppConfig
from kiln.errors import ConfigError
from kiln.store import ImageStore
from kiln.tarball import Entry, Layer, dir_entry, file_entry, tree_entries, write_layer

APP_DIR = "app"
APP_UID = 1000
ALWAYS_EXCLUDED = (
    ".git/",
    ".hg/",
    ".svn/",
    ".venv/",
    "venv/",
    "__pycache__/",
    "*.py[cod]",
    ".mypy_cache/",
    ".pytest_cache/",
    ".ruff_cache/",
    "*.egg-info/",
    ".DS_Store",
)


def _spec(lines: list[str]) -> pathspec.GitIgnoreSpec:
    return pathspec.GitIgnoreSpec.from_lines(lines)


def select_sources(config: AppConfig) -> list[str]:
    """Relative paths (files and symlinks) of the app that go into /app, sorted."""
    root = config.root
    ignore_lines = list(ALWAYS_EXCLUDED) + list(config.build.exclude)
    gitignore = root / ".gitignore"
    if gitignore.is_file():
        ignore_lines += gitignore.read_text(encoding="utf-8", errors="replace").splitlines()
    ignored = _spec(ignore_lines)
    includes = {p: (None if p in (".", "./", "*") else _spec([p])) for p in config.build.include}
    matched: dict[str, int] = dict.fromkeys(includes, 0)
    always = {"kiln.toml", config.build.lock}
    selected: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir + "/"
        kept_dirs = []
        for d in sorted(dirnames):
            if (Path(dirpath) / d).is_symlink():
                filenames.append(d)  # a link is content, not a folder to walk
            elif not ignored.match_file(prefix + d + "/"):
                kept_dirs.append(d)
        dirnames[:] = kept_dirs
        for name in sorted(filenames):
            rel = prefix + name
            if rel in always:
                selected.append(rel)
                continue
            if ignored.match_file(rel):
                continue
            hit = False
            for pattern, spec in includes.items():
                if spec is None or spec.match_file(rel):
                    matched[pattern] += 1
                    hit = True
            if hit:
                selected.append(rel)
    empty = [p for p, n in matched.items() if n == 0]
    if empty:
        raise ConfigError(
            f"{config.path}: build.include pattern {empty[0]!r} matches no file in {root}",
            hint="fix the pattern, or check .gitignore and build.exclude",
        )
    return sorted(set(selected))


def app_layer(
    store: ImageStore, config: AppConfig, files: list[str], passwd: str, group: str, epoch: int
) -> Layer:
    """/app with the selected files (root-owned, read-only to the app) and the app user."""
    root = config.root
    chosen = set(files)
    parents = {str(Path(f).parent) for f in files} - {"."}
    for p in list(parents):
        parents.update(str(q) for q in Path(p).parents if str(q) != ".")

    def keep(rel: str) -> bool:
        return rel in chosen or rel in parents

    entries: list[Entry] = [dir_entry(APP_DIR)]
    entries += tree_entries(root, APP_DIR, keep=keep, owner=(0, 0), normalize=True)
    user_line = f"app:x:{APP_UID}:{APP_UID}:kiln app:/{APP_DIR}:/usr/sbin/nologin\n"
    group_line = f"app:x:{APP_UID}:\n"
    entries.append(file_entry("etc/passwd", (passwd.rstrip("\n") + "\n" + user_line).encode()))
    entries.append(file_entry("etc/group", (group.rstrip("\n") + "\n" + group_line).encode()))
    return write_layer(store, entries, epoch)
