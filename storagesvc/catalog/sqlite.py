"""SqliteCatalog: the embedded catalog (one file, WAL, schema versions in PRAGMA user_version).

The queries and the schema are `storagesvc.catalog.sql`'s; this is the SQLite dialect. One writer
connection, shared by the service's threads under a lock (SQLite serializes writers anyway); each
statement outside a `transaction` commits on its own, a `transaction` holds the lock from BEGIN IMMEDIATE
to COMMIT (one commit, one fsync, for all its writes). Reads run on read connections of their own, a
small pool (WAL: a reader sees the last commit and never waits for a writer's fsync), except inside a
`transaction` of the same thread, which reads on the writer (its own writes). ":memory:" has the writer
only. The file holds CHAP secrets (see ExportRecord): it is created mode 0600.

Durability: WAL with ``synchronous=FULL`` (the default here): every commit fsyncs the WAL before it
returns, so a row the service has acknowledged to a caller (an attachment an agent was told about, an
export it must rebuild) survives a power loss. ``normal`` fsyncs only at checkpoints: a crash of the
process loses nothing, a power loss can drop the last acknowledged commits. It is there to measure the
difference (bench/storage_bench.py, bench/results/), not to run with.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from storagesvc.catalog import Conflict
from storagesvc.catalog.sql import SqlCatalog, statements

__all__ = ["SYNCHRONOUS", "SqliteCatalog"]

#: ``[service] catalog_synchronous`` values -> SQLite's PRAGMA synchronous (FULL = 2, NORMAL = 1).
SYNCHRONOUS = {"full": 2, "normal": 1}

#: Idle read connections kept open (more are opened while more reads run at once, then closed).
READERS = 16


class SqliteCatalog(SqlCatalog):
    """The Catalog protocol on one SQLite file (or ":memory:")."""

    def __init__(self, path: str | Path, *, synchronous: str = "full") -> None:
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous: one of {', '.join(SYNCHRONOUS)}, not {synchronous!r}")
        self.path = self.where = str(path)
        if self.path != ":memory:":
            p = Path(self.path)
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.exists():
                fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={SYNCHRONOUS[synchronous]}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._local = threading.local()  # this thread's `transaction` nesting
        self._readers: list[sqlite3.Connection] = []  # idle read connections
        self._readers_lock = threading.Lock()
        self._closed = False
        with self._lock:
            self.migrate()

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _apply_migration(self, version: int, script: str) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in statements(script):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {int(version)}")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _write(self, sql: str, args: Sequence[Any]) -> int:
        with self._lock:
            try:
                return self._db.execute(sql, args).rowcount
            except sqlite3.IntegrityError as exc:
                raise Conflict(str(exc)) from exc

    def _rows(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        if self.path == ":memory:" or self._in_transaction():
            # ":memory:" is the writer's alone; a transaction reads its own writes
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        reader = self._take_reader()
        try:
            rows = reader.execute(sql, args).fetchall()
        except BaseException:
            reader.close()
            raise
        self._give_reader(reader)
        return rows

    def _take_reader(self) -> sqlite3.Connection:
        """An idle read connection, or a new one (as many as reads run at once; READERS kept idle)."""
        with self._readers_lock:
            if self._closed:
                raise RuntimeError(f"catalog {self.where} is closed")
            if self._readers:
                return self._readers.pop()
        reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        reader.execute("PRAGMA query_only=ON")
        return reader

    def _give_reader(self, reader: sqlite3.Connection) -> None:
        with self._readers_lock:
            if not self._closed and len(self._readers) < READERS:
                self._readers.append(reader)
                return
        reader.close()

    def _in_transaction(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT on the writer, under its lock: every write inside commits at once
        (one fsync with synchronous=FULL), or none when the block raises (ROLLBACK). Nested: joins."""
        with self._lock:
            if self._in_transaction():
                yield
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._local.depth = 1
            try:
                yield
            except BaseException:
                self._local.depth = 0
                self._db.execute("ROLLBACK")
                raise
            self._local.depth = 0
            try:
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _label_clause(self) -> str:
        return "json_extract(doc, '$.labels.' || json_quote(?)) = ?"

    def hold(self, key: str, timeout: float) -> contextlib.AbstractContextManager[None]:
        """No lock to take: one process uses the file, and its in-process locks serialize."""
        return contextlib.nullcontext()

    def close(self) -> None:
        with self._lock:
            with self._readers_lock:
                self._closed = True
                readers, self._readers = self._readers, []
            for reader in readers:
                reader.close()
            self._db.close()
