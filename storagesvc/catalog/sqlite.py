"""SqliteCatalog: the embedded catalog (one file, WAL, schema versions in PRAGMA user_version).

The queries and the schema are `storagesvc.catalog.sql`'s; this is the SQLite dialect. One connection,
shared by the service's threads under a lock: every statement is short, and SQLite serializes writers
anyway. The file holds CHAP secrets (see ExportRecord): it is created mode 0600.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from storagesvc.catalog import Conflict
from storagesvc.catalog.sql import SqlCatalog, statements

__all__ = ["SYNCHRONOUS", "SqliteCatalog"]

#: ``[service] catalog_synchronous`` values -> SQLite's PRAGMA synchronous (FULL = 2, NORMAL = 1).
SYNCHRONOUS = {"full": 2, "normal": 1}


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
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _label_clause(self) -> str:
        return "json_extract(doc, '$.labels.' || json_quote(?)) = ?"

    def hold(self, key: str, timeout: float) -> contextlib.AbstractContextManager[None]:
        """No lock to take: one process uses the file, and its in-process locks serialize."""
        return contextlib.nullcontext()

    def close(self) -> None:
        with self._lock:
            self._db.close()
