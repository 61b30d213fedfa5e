"""The log store: ``KILN_HOME/logs/logs.db``, SQLite in WAL mode.

A database apart from ``state.db`` so that log volume never slows the
daemon's own state. Two tables:

- ``sources``: one row per instance log file (an instance's stdout, its
  stderr, or one combined file), with the tags every line of it shares (app,
  env, release, image, instance, stream) and the byte **offset** up to which
  the file has been stored.
- ``lines``: one row per line: ingest time, source, level, message, and for
  JSON lines the object as written (so every field stays searchable). Its
  ``id`` only ever grows (AUTOINCREMENT, even after retention empties the
  table), which makes it the cursor of ``kiln logs -f``.

Crash safety: the lines read from a file and that file's new offset are
committed in one transaction, and an offset always ends at a newline. A
daemon killed at any moment restarts from the last committed offset: lines
in the lost transaction are read again from the file, none twice. The files
themselves are written by the apps (``O_APPEND``) and outlive the daemon.

The writer is the collector's thread alone; readers open their own
connections (WAL lets them read while it writes).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln.logs.lines import Row

log = logging.getLogger("kiln.logs")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sources (
    id INTEGER PRIMARY KEY,
    file TEXT NOT NULL UNIQUE,
    instance TEXT NOT NULL,
    stream TEXT NOT NULL,
    app TEXT,
    env TEXT,
    release TEXT,
    image TEXT,
    inode INTEGER,
    offset INTEGER NOT NULL DEFAULT 0,
    punched INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS lines (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    source INTEGER NOT NULL,
    level INTEGER,
    message TEXT NOT NULL,
    fields TEXT
);
CREATE INDEX IF NOT EXISTS lines_by_time ON lines (ts);
CREATE INDEX IF NOT EXISTS lines_by_source ON lines (source);
"""

# Deleting in slices keeps each retention transaction short: the collector
# that runs it is the one that must keep ingesting.
DELETE_SLICE = 50_000


@dataclass(frozen=True)
class Tags:
    """What every line of one instance shares."""

    app: str | None = None
    env: str | None = None
    release: str | None = None
    image: str | None = None


@dataclass
class Source:
    id: int
    file: str
    instance: str
    stream: str
    tags: Tags
    inode: int | None
    offset: int
    punched: int


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        db = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA busy_timeout=30000")
    return db


class LogStore:
    """The writer's side: sources, batches of lines with their offsets, retention."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = connect(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL survives the death of the process; a machine crash may lose the
        # last commits, and then their offsets with them, so they are read again.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA cache_size=-16000")
        # A burst leaves a big WAL behind; give the disk back after checkpoints.
        self.db.execute("PRAGMA journal_size_limit=67108864")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- sources -----------------------------------------------------------
    def sources(self) -> dict[str, Source]:
        rows = self.db.execute(
            "SELECT id, file, instance, stream, app, env, release, image, inode, offset, punched "
            "FROM sources"
        )
        return {
            r[1]: Source(r[0], r[1], r[2], r[3], Tags(*r[4:8]), r[8], r[9], r[10]) for r in rows
        }

    def add_source(
        self, file: str, instance: str, stream: str, tags: Tags, inode: int | None
    ) -> Source:
        cur = self.db.execute(
            "INSERT INTO sources (file, instance, stream, app, env, release, image, inode) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (file, instance, stream, tags.app, tags.env, tags.release, tags.image, inode),
        )
        return Source(int(cur.lastrowid or 0), file, instance, stream, tags, inode, 0, 0)

    def set_tags(self, source: int, tags: Tags) -> None:
        self.db.execute(
            "UPDATE sources SET app = ?, env = ?, release = ?, image = ? WHERE id = ?",
            (tags.app, tags.env, tags.release, tags.image, source),
        )

    def reset_source(self, source: int, inode: int | None) -> None:
        """The file was replaced or truncated: read it again from its start."""
        self.db.execute(
            "UPDATE sources SET offset = 0, punched = 0, inode = ? WHERE id = ?", (inode, source)
        )

    def set_punched(self, source: int, punched: int) -> None:
        self.db.execute("UPDATE sources SET punched = ? WHERE id = ?", (punched, source))

    def forget_source(self, source: int) -> None:
        """Its file is gone (retention deleted it); its stored lines stay queryable."""
        self.db.execute(
            "UPDATE sources SET file = file || '#' || id, inode = NULL WHERE id = ?", (source,)
        )

    # -- lines -------------------------------------------------------------
    def commit(self, rows: Sequence[Row], offsets: Mapping[int, int]) -> None:
        """Store ``rows`` and move the sources' offsets past them, atomically."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if rows:
                db.executemany(
                    "INSERT INTO lines (ts, source, level, message, fields) VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
            if offsets:
                db.executemany(
                    "UPDATE sources SET offset = ? WHERE id = ?",
                    [(offset, source) for source, offset in offsets.items()],
                )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def last_id(self) -> int:
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'lines'").fetchone()
        return int(row[0]) if row else 0

    # -- retention ---------------------------------------------------------
    def used_bytes(self) -> int:
        """Bytes the database's live pages take (freed pages are reused, not counted)."""
        page_size = self.db.execute("PRAGMA page_size").fetchone()[0]
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def expire(self, max_age: float, max_bytes: int, now: float | None = None) -> int:
        """Delete lines older than ``max_age`` seconds, then the oldest until the
        database fits in ``max_bytes``. Returns how many lines went."""
        cutoff = (time.time() if now is None else now) - max_age
        deleted = 0
        while True:
            n = self._delete(
                "DELETE FROM lines WHERE id IN (SELECT id FROM lines WHERE ts < ? ORDER BY ts LIMIT ?)",
                (cutoff, DELETE_SLICE),
            )
            deleted += n
            if n < DELETE_SLICE:
                break
        # Size: shed the oldest tenth of the remaining span until under 90% of
        # the cap, so a store at its limit is not trimmed at every pass.
        for _ in range(50):
            used = self.used_bytes()
            if used <= max_bytes:
                break
            lo, hi = self.db.execute("SELECT MIN(id), MAX(id) FROM lines").fetchone()
            if lo is None:
                break
            share = min(max(1.0 - (max_bytes * 0.9) / used, 0.02), 1.0)
            upto = lo + max(int((hi - lo + 1) * share), 1)
            while lo < upto:
                step = min(upto, lo + DELETE_SLICE)
                deleted += self._delete("DELETE FROM lines WHERE id < ?", (step,))
                lo = step
        return deleted

    def _delete(self, sql: str, args: Iterable[object]) -> int:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            n = self.db.execute(sql, tuple(args)).rowcount
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return int(n)
