"""The collector: a thread in the daemon that tails every instance's log files
into the log store.

Apps write straight into files under ``KILN_HOME/logs/instances/`` (never
through a pipe the daemon must drain), so a slow or dead daemon never blocks
an app; the collector catches up from its committed offsets when it can.

One round: look for new or grown files (every ``scan_every``), read each open
file from where it stopped (at most ``READ_MAX`` bytes, so one chatty app
cannot starve the others), cut at the last newline, parse the lines and
commit them together with every file's new offset in one transaction. A
round that read nothing sleeps ``poll`` seconds, so a new line is stored
within about that. A file whose instance is gone is read to its end, its
unterminated last line (if any) stored too, and then closed.

Retention runs every ``retention_every`` seconds: lines older than
``max_age`` go, then the oldest until the store fits in ``max_bytes``; the
stored head of every big file is given back to the disk (see
:mod:`kiln.logs.holes`), and files of instances gone longer than ``max_age``
are deleted (their lines stay in the store until they expire).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from kiln.logs import holes
from kiln.logs.catalog import Catalog, tags_from_name
from kiln.logs.files import split_name
from kiln.logs.lines import Row, parse_lines
from kiln.logs.query import LogBatch, LogQuery, LogReader, follow_query
from kiln.logs.store import LogStore, Source

log = logging.getLogger("kiln.logs")

READ_MAX = 1 << 20  # bytes per file per round
MAX_LINE = 64 << 10  # a longer "line" is stored in pieces of this size
PUNCH_STEP = 8 << 20  # give disk back once this much more of a file is stored
KEEP_TAIL = 1 << 20  # never punch the last MiB: Engine.log_tail() reads it
FULL_SCAN_EVERY = 30.0  # files of gone instances are checked for growth this rarely


@dataclass
class Tail:
    """An open log file and how far it has been read."""

    source: Source
    path: Path
    fd: int
    pos: int  # bytes read from the file so far
    pending: bytes = b""  # read, but not yet a whole line
    changed: float = field(default_factory=time.monotonic)

    @property
    def offset(self) -> int:
        """Where the stored lines end: what is committed, and where a restart reads on."""
        return self.pos - len(self.pending)


@dataclass
class Counters:
    lines: int = 0
    bytes: int = 0
    commits: int = 0
    expired: int = 0
    by_tag: dict[tuple[str, str], int] = field(default_factory=dict)  # (env, stream) → lines


class Collector:
    def __init__(
        self,
        directory: Path,
        store_path: Path,
        catalog: Catalog,
        *,
        max_age: float = 7 * 86400,
        max_bytes: int = 1 << 30,
        poll: float = 0.1,
        scan_every: float = 0.5,
        retention_every: float = 60.0,
        idle_close: float = 2.0,
    ) -> None:
        self.directory = directory
        self.store_path = store_path
        self.catalog = catalog
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.poll = poll
        self.scan_every = scan_every
        self.retention_every = retention_every
        self.idle_close = idle_close
        directory.mkdir(parents=True, exist_ok=True)
        self.store = LogStore(store_path)
        self.reader = LogReader(store_path)
        self.sources: dict[str, Source] = self.store.sources()
        self.tails: dict[str, Tail] = {}
        self.finished: set[str] = set()  # drained files of gone instances
        self.counters = Counters()
        self._counter_lock = threading.Lock()
        self._committed = threading.Condition()
        self._last_id = self.store.last_id()
        last_ts = self.store.db.execute("SELECT MAX(ts) FROM lines").fetchone()[0]
        self._last_ts: float = float(last_ts or 0.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scanned = 0.0
        self._full_scanned = 0.0
        self._retained = 0.0
        self._lag = 0

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="kiln-logs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self.close()

    def close(self) -> None:
        for tail in self.tails.values():
            os.close(tail.fd)
        self.tails.clear()
        self.store.close()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                _, busy = self.run_once()
            except Exception:  # the collector must outlive any one bad round
                log.exception("log collection round failed")
                self._stop.wait(1.0)
                continue
            if not busy:
                self._stop.wait(self.poll)
        try:
            self.run_once()  # what the last instances wrote while we stopped
        except Exception:
            log.exception("last log collection round failed")

    # -- one round ---------------------------------------------------------
    def run_once(self) -> tuple[int, bool]:
        """Read what is new everywhere and store it. Returns (lines stored,
        whether some file had more than one round's worth)."""
        now = time.monotonic()
        if now - self._scanned >= self.scan_every:
            self._scan(full=now - self._full_scanned >= FULL_SCAN_EVERY)
            self._measure_lag()
        ts = max(time.time(), self._last_ts)  # ingest times never go backwards
        self._last_ts = ts
        rows: list[Row] = []
        offsets: dict[int, int] = {}
        counts: dict[tuple[str, str], int] = {}
        busy = False
        nbytes = 0
        for name, tail in list(self.tails.items()):
            before = tail.offset
            start = len(rows)
            got = self._read(tail, ts, rows, now)
            nbytes += got
            busy = busy or got >= READ_MAX
            if tail.offset != before:
                offsets[tail.source.id] = tail.offset
                tail.source.offset = tail.offset
                key = (tail.source.tags.env or "", tail.source.stream)
                counts[key] = counts.get(key, 0) + len(rows) - start
            elif not got and now - tail.changed >= self.idle_close:
                self._maybe_close(name, tail, ts, rows, offsets, counts)
        if rows or offsets:
            self.store.commit(rows, offsets)
            self._committed_lines(len(rows), nbytes, counts)
        if now - self._retained >= self.retention_every:
            self._retained = now
            self.retain()
        return len(rows), busy

    def _read(self, tail: Tail, ts: float, rows: list[Row], now: float) -> int:
        try:
            data = os.pread(tail.fd, READ_MAX, tail.pos)
        except OSError as exc:
            log.warning("cannot read %s: %s", tail.path, exc)
            return 0
        if not data:
            with suppress(OSError):
                if os.fstat(tail.fd).st_size < tail.offset:
                    # Truncated under us (by hand; apps only append): start over.
                    self.store.reset_source(tail.source.id, tail.source.inode)
                    tail.source.offset = tail.source.punched = tail.pos = 0
                    tail.pending = b""
            return 0
        tail.pos += len(data)
        tail.changed = now
        buf = tail.pending + data if tail.pending else data
        cut = buf.rfind(b"\n")
        if cut < 0:
            complete, tail.pending = b"", buf
        else:
            complete, tail.pending = buf[: cut + 1], buf[cut + 1 :]
        if complete:
            rows += parse_lines(complete.decode("utf-8", "replace"), ts, tail.source.id)
        while len(tail.pending) >= MAX_LINE:
            piece, tail.pending = tail.pending[:MAX_LINE], tail.pending[MAX_LINE:]
            rows += parse_lines(piece.decode("utf-8", "replace"), ts, tail.source.id)
        return len(data)

    def _maybe_close(
        self,
        name: str,
        tail: Tail,
        ts: float,
        rows: list[Row],
        offsets: dict[int, int],
        counts: dict[tuple[str, str], int],
    ) -> None:
        """An idle file: if its instance is gone, store its last unterminated
        line and close it; a live instance's file stays open."""
        if not self.catalog.gone(tail.source.instance):
            return
        if tail.pending:
            start = len(rows)
            rows += parse_lines(tail.pending.decode("utf-8", "replace"), ts, tail.source.id)
            tail.pending = b""
            offsets[tail.source.id] = tail.source.offset = tail.offset
            key = (tail.source.tags.env or "", tail.source.stream)
            counts[key] = counts.get(key, 0) + len(rows) - start
        os.close(tail.fd)
        del self.tails[name]
        self.finished.add(name)

    def _committed_lines(self, n: int, nbytes: int, counts: dict[tuple[str, str], int]) -> None:
        last = self.store.last_id()
        with self._counter_lock:
            c = self.counters
            c.lines += n
            c.bytes += nbytes
            c.commits += 1
            for key, value in counts.items():
                c.by_tag[key] = c.by_tag.get(key, 0) + value
        with self._committed:
            self._last_id = last
            self._committed.notify_all()

    # -- finding files -----------------------------------------------------
    def _scan(self, full: bool) -> None:
        self._scanned = time.monotonic()
        if full:
            self._full_scanned = self._scanned
        try:
            entries = list(os.scandir(self.directory))
        except OSError as exc:
            log.warning("cannot list %s: %s", self.directory, exc)
            return
        for entry in entries:
            name = entry.name
            tail = self.tails.get(name)
            if tail is not None:
                if entry.inode() == tail.source.inode:
                    continue
                # Deleted and created again under the same name: follow the new one.
                os.close(tail.fd)
                del self.tails[name]
            elif name in self.finished and not full:
                continue
            parts = split_name(name)
            if parts is None:
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            source = self.sources.get(name)
            if source is None:
                instance, stream = parts
                tags = self.catalog.tags(instance) or tags_from_name(instance)
                source = self.store.add_source(name, instance, stream, tags, st.st_ino)
                self.sources[name] = source
            elif source.inode != st.st_ino or st.st_size < source.offset:
                # Another file under the same name, or truncated by hand: it is
                # all new to us.
                self.store.reset_source(source.id, st.st_ino)
                source.inode, source.offset, source.punched = st.st_ino, 0, 0
            elif st.st_size == source.offset and self.catalog.gone(source.instance):
                self.finished.add(name)
                continue
            if source.tags.app is None:
                known = self.catalog.tags(source.instance)
                if known is not None:
                    self.store.set_tags(source.id, known)
                    source.tags = known
            self._open(name, source, Path(entry.path))

    def _measure_lag(self) -> None:
        lag = 0
        for tail in self.tails.values():
            with suppress(OSError):
                lag += max(os.fstat(tail.fd).st_size - tail.offset, 0)
        self._lag = lag

    def _open(self, name: str, source: Source, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("cannot open %s: %s", path, exc)
            return
        self.finished.discard(name)
        tail = Tail(source, path, fd, source.offset)
        if source.offset == 0:
            self._skip_holes(tail)
        self.tails[name] = tail

    def _skip_holes(self, tail: Tail) -> None:
        """A file read from its start whose head was punched (the store that
        had it is gone): skip the zeros and the line cut by the hole's end."""
        try:
            start = os.lseek(tail.fd, 0, os.SEEK_DATA)
        except OSError:
            return  # no data at all yet, or no SEEK_DATA here
        if start == 0:
            return
        head = os.pread(tail.fd, MAX_LINE, start)
        cut = head.find(b"\n")
        tail.pos = start + (cut + 1 if cut >= 0 else len(head))

    # -- retention ---------------------------------------------------------
    def retain(self) -> None:
        """Expire old lines, keep the store within its size, give disk back."""
        expired = self.store.expire(self.max_age, self.max_bytes)
        with self._counter_lock:
            self.counters.expired += expired
        now = time.time()
        for name, source in list(self.sources.items()):
            path = self.directory / name
            if source.offset - source.punched >= PUNCH_STEP + KEEP_TAIL:
                upto = source.offset - KEEP_TAIL
                if holes.punch(path, upto):
                    upto -= upto % holes.BLOCK
                    self.store.set_punched(source.id, upto)
                    source.punched = upto
            if name in self.finished and name not in self.tails:
                try:
                    old = now - path.stat().st_mtime > self.max_age
                except OSError:
                    old = False
                if old and self.catalog.gone(source.instance):
                    path.unlink(missing_ok=True)
                    self.store.forget_source(source.id)
                    del self.sources[name]
                    self.finished.discard(name)

    # -- for the API and metrics -------------------------------------------
    def read(self, query: LogQuery, wait: float = 0.0) -> LogBatch:
        """A batch of lines; with ``wait``, block up to that long for new ones
        if there are none yet (how ``kiln logs -f`` follows)."""
        batch = self.reader.query(query)
        deadline = time.monotonic() + wait
        while not batch.lines and not batch.more and wait > 0:
            left = deadline - time.monotonic()
            if left <= 0 or not self.wait_beyond(batch.cursor, left):
                break
            batch = self.reader.query(follow_query(query, batch.cursor))
        return batch

    def wait_beyond(self, cursor: int, timeout: float) -> bool:
        """Block until a line with an id above ``cursor`` is stored, up to ``timeout``."""
        with self._committed:
            return self._committed.wait_for(lambda: self._last_id > cursor, timeout)

    def lag_bytes(self) -> int:
        """Bytes written to open files and not yet stored (as of the last scan)."""
        return self._lag

    @contextmanager
    def snapshot(self) -> Iterator[Counters]:
        with self._counter_lock:
            yield self.counters
