"""The daemon's state: SQLite in WAL mode under ``KILN_HOME``.

Releases, instances, environment locks and the append-only event trail live
here. Every step of a release is written before the next one starts, so a
daemon killed at any point restarts from what is recorded. WAL with
``synchronous=NORMAL`` survives the death of the process (not of the
machine) without losing a committed row.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import ReleaseLocked

SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY,
    env TEXT NOT NULL,
    number INTEGER NOT NULL,
    app TEXT NOT NULL,
    image TEXT NOT NULL,
    strategy TEXT NOT NULL,
    state TEXT NOT NULL,
    weight INTEGER NOT NULL DEFAULT 0,
    replicas INTEGER NOT NULL,
    spec TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    finished REAL,
    serving_since REAL,
    warm_until REAL,
    reason TEXT,
    rollback_of INTEGER,
    actor TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    trail TEXT NOT NULL DEFAULT '[]',
    UNIQUE (env, number)
);
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    release_id INTEGER NOT NULL REFERENCES releases(id),
    env TEXT NOT NULL,
    state TEXT NOT NULL,
    port INTEGER NOT NULL,
    pid INTEGER,
    started INTEGER,
    in_rotation INTEGER NOT NULL DEFAULT 0,
    health_failures INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    ready_at REAL,
    drain_since REAL,
    stopped_at REAL,
    exit_reason TEXT
);
CREATE INDEX IF NOT EXISTS instances_by_release ON instances (release_id, state);
CREATE TABLE IF NOT EXISTS locks (
    env TEXT PRIMARY KEY,
    release_id INTEGER NOT NULL,
    holder TEXT NOT NULL,
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    env TEXT,
    release TEXT,
    instance TEXT,
    image TEXT,
    actor TEXT,
    message TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (ts);
"""

_ADDED_COLUMNS = {
    "progress": "TEXT NOT NULL DEFAULT '{}'",
    "trail": "TEXT NOT NULL DEFAULT '[]'",
}

# A release moves along: starting → serving → warm → retired, or ends aborted.
ACTIVE_RELEASE = ("starting", "switching")
LIVE_RELEASE = ("starting", "switching", "serving", "warm")
TERMINAL_RELEASE = ("retired", "aborted", "failed", "stopped")
LIVE_INSTANCE = ("starting", "ready", "draining")


def actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class Release:
    id: int
    env: str
    number: int
    app: str
    image: str
    strategy: str
    state: str
    weight: int
    replicas: int
    spec: dict[str, Any]
    created: float
    updated: float
    finished: float | None
    serving_since: float | None
    warm_until: float | None
    reason: str | None
    rollback_of: int | None
    actor: str
    progress: dict[str, Any]  # strategy bookkeeping, e.g. the canary's current step
    trail: list[dict[str, Any]]  # the canary's decisions: numbers, thresholds, verdicts

    @property
    def name(self) -> str:
        return f"r{self.number}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "env": self.env,
            "release": self.name,
            "number": self.number,
            "app": self.app,
            "image": self.image,
            "strategy": self.strategy,
            "state": self.state,
            "weight": self.weight,
            "replicas": self.replicas,
            "created": self.created,
            "finished": self.finished,
            "serving_since": self.serving_since,
            "warm_until": self.warm_until,
            "reason": self.reason,
            "rollback_of": self.rollback_of,
            "actor": self.actor,
            "listen": self.spec.get("listen"),
            "progress": self.progress,
            "trail": self.trail,
        }


@dataclass(frozen=True)
class Instance:
    id: str
    release_id: int
    env: str
    state: str
    port: int
    pid: int | None
    started: int | None
    in_rotation: bool
    health_failures: int
    created: float
    ready_at: float | None
    drain_since: float | None
    stopped_at: float | None
    exit_reason: str | None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "release_id": self.release_id,
            "env": self.env,
            "state": self.state,
            "addr": self.addr,
            "pid": self.pid,
            "in_rotation": self.in_rotation,
            "health_failures": self.health_failures,
            "created": self.created,
            "ready_at": self.ready_at,
            "stopped_at": self.stopped_at,
            "exit_reason": self.exit_reason,
        }


_RELEASE_COLS = [f for f in Release.__dataclass_fields__]
_INSTANCE_COLS = [f for f in Instance.__dataclass_fields__]


class State:
    """One connection, serialised by a lock: the daemon is the only writer."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            self._migrate()

    def _migrate(self) -> None:
        """Add columns that later versions introduced to a database made earlier."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(releases)")}
        for column, ddl in _ADDED_COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE releases ADD COLUMN {column} {ddl}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args))

    # -- releases ---------------------------------------------------------
    @staticmethod
    def _release(row: sqlite3.Row) -> Release:
        values = {k: row[k] for k in _RELEASE_COLS}
        for key in ("spec", "progress", "trail"):
            values[key] = json.loads(values[key])
        return Release(**values)

    def create_release(
        self,
        *,
        env: str,
        app: str,
        image: str,
        strategy: str,
        replicas: int,
        spec: dict[str, Any],
        who: str,
        rollback_of: int | None = None,
        state: str = "starting",
    ) -> Release:
        """Insert a release and take the environment's lock, atomically."""
        now = time.time()
        with self.tx() as db:
            held = db.execute(
                "SELECT l.holder, l.since, r.number FROM locks l JOIN releases r ON r.id = l.release_id "
                "WHERE l.env = ?",
                (env,),
            ).fetchone()
            if held:
                raise ReleaseLocked(
                    f"environment {env!r} is busy: release r{held['number']} by {held['holder']} "
                    f"has held it for {now - held['since']:.0f}s",
                    hint=f"wait for it, or steer it with 'kiln abort --env {env}'",
                )
            number = db.execute(
                "SELECT COALESCE(MAX(number), 0) + 1 FROM releases WHERE env = ?", (env,)
            ).fetchone()[0]
            cur = db.execute(
                "INSERT INTO releases (env, number, app, image, strategy, state, weight, replicas, spec, "
                "created, updated, rollback_of, actor) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?)",
                (
                    env,
                    number,
                    app,
                    image,
                    strategy,
                    state,
                    replicas,
                    json.dumps(spec),
                    now,
                    now,
                    rollback_of,
                    who,
                ),
            )
            release_id = int(cur.lastrowid or 0)
            db.execute(
                "INSERT INTO locks (env, release_id, holder, since) VALUES (?, ?, ?, ?)",
                (env, release_id, who, now),
            )
        return self.release(release_id)

    def release(self, release_id: int) -> Release:
        rows = self._all("SELECT * FROM releases WHERE id = ?", (release_id,))
        if not rows:
            raise KeyError(release_id)
        return self._release(rows[0])

    def release_by_number(self, env: str, number: int) -> Release | None:
        rows = self._all("SELECT * FROM releases WHERE env = ? AND number = ?", (env, number))
        return self._release(rows[0]) if rows else None

    def releases(
        self, env: str | None = None, states: tuple[str, ...] | None = None
    ) -> list[Release]:
        sql = "SELECT * FROM releases WHERE 1=1"
        args: list[Any] = []
        if env is not None:
            sql += " AND env = ?"
            args.append(env)
        if states is not None:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += list(states)
        return [self._release(r) for r in self._all(sql + " ORDER BY env, number", tuple(args))]

    def envs(self) -> list[str]:
        return [r[0] for r in self._all("SELECT DISTINCT env FROM releases ORDER BY env")]

    def update_release(self, release_id: int, **fields: Any) -> None:
        fields["updated"] = time.time()
        for key in ("spec", "progress", "trail"):
            if key in fields:
                fields[key] = json.dumps(fields[key])
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.tx() as db:
            db.execute(f"UPDATE releases SET {cols} WHERE id = ?", (*fields.values(), release_id))
            if fields.get("state") in ("serving", *TERMINAL_RELEASE):
                db.execute("DELETE FROM locks WHERE release_id = ?", (release_id,))

    def lock_holder(self, env: str) -> int | None:
        rows = self._all("SELECT release_id FROM locks WHERE env = ?", (env,))
        return int(rows[0][0]) if rows else None

    def take_lock(self, env: str, release_id: int, who: str) -> None:
        with self.tx() as db:
            held = db.execute("SELECT release_id FROM locks WHERE env = ?", (env,)).fetchone()
            if held and held[0] != release_id:
                number = db.execute(
                    "SELECT number FROM releases WHERE id = ?", (held[0],)
                ).fetchone()[0]
                raise ReleaseLocked(
                    f"environment {env!r} is busy with release r{number}",
                    hint=f"wait for it, or 'kiln abort --env {env}'",
                )
            db.execute(
                "INSERT OR REPLACE INTO locks (env, release_id, holder, since) VALUES (?, ?, ?, ?)",
                (env, release_id, who, time.time()),
            )

    def release_lock(self, env: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM locks WHERE env = ?", (env,))

    # -- instances --------------------------------------------------------
    @staticmethod
    def _instance(row: sqlite3.Row) -> Instance:
        values = {k: row[k] for k in _INSTANCE_COLS}
        values["in_rotation"] = bool(values["in_rotation"])
        return Instance(**values)

    def create_instance(self, instance_id: str, release: Release, port: int) -> Instance:
        with self.tx() as db:
            db.execute(
                "INSERT INTO instances (id, release_id, env, state, port, created) VALUES (?, ?, ?, 'starting', ?, ?)",
                (instance_id, release.id, release.env, port, time.time()),
            )
        return self.instance(instance_id)

    def instance(self, instance_id: str) -> Instance:
        rows = self._all("SELECT * FROM instances WHERE id = ?", (instance_id,))
        if not rows:
            raise KeyError(instance_id)
        return self._instance(rows[0])

    def instances(
        self,
        release_id: int | None = None,
        states: tuple[str, ...] | None = None,
        env: str | None = None,
    ) -> list[Instance]:
        sql = "SELECT * FROM instances WHERE 1=1"
        args: list[Any] = []
        if release_id is not None:
            sql += " AND release_id = ?"
            args.append(release_id)
        if env is not None:
            sql += " AND env = ?"
            args.append(env)
        if states is not None:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += list(states)
        return [self._instance(r) for r in self._all(sql + " ORDER BY created, id", tuple(args))]

    def update_instance(self, instance_id: str, **fields: Any) -> None:
        if "in_rotation" in fields:
            fields["in_rotation"] = int(bool(fields["in_rotation"]))
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.tx() as db:
            db.execute(f"UPDATE instances SET {cols} WHERE id = ?", (*fields.values(), instance_id))

    # -- events -----------------------------------------------------------
    def event(
        self,
        kind: str,
        message: str,
        *,
        env: str | None = None,
        release: str | None = None,
        instance: str | None = None,
        image: str | None = None,
        who: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO events (ts, kind, env, release, instance, image, actor, message, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    time.time(),
                    kind,
                    env,
                    release,
                    instance,
                    image,
                    who or actor(),
                    message,
                    json.dumps(data) if data else None,
                ),
            )

    def events(
        self,
        env: str | None = None,
        since: float | None = None,
        after_id: int = 0,
        limit: int = 10_000,
    ) -> list[dict[str, Any]]:
        sql = "SELECT * FROM events WHERE id > ?"
        args: list[Any] = [after_id]
        if env is not None:
            sql += " AND env = ?"
            args.append(env)
        if since is not None:
            sql += " AND ts >= ?"
            args.append(since)
        rows = self._all(sql + " ORDER BY id LIMIT ?", (*args, limit))
        out = []
        for r in rows:
            item = dict(r)
            item["data"] = json.loads(item["data"]) if item["data"] else None
            out.append(item)
        return out
