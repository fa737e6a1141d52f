"""PostgresCatalog: the catalog on a PostgreSQL server, shared by every storage process that points at it.

The queries and the schema are `storagesvc.catalog.sql`'s; this is the PostgreSQL dialect (psycopg 3 and
a psycopg_pool ConnectionPool). Every statement runs in its own transaction on a pooled connection
(autocommit), like the SQLite dialect's, except inside `transaction`: there the calls of that thread
(a context variable) share one pooled connection in one transaction, committed when the block ends.
The schema version is the one row of ``schema_version``; migrations run in one transaction under a
transaction-level advisory lock, so storage processes starting together apply each migration once.

Cross-process locks (`hold`): a session advisory lock on a connection of a second, dedicated pool, held
for the whole operation; the server releases it when that connection ends (the holder died or lost the
network), so a crashed node never keeps a volume locked. Waiting is the server's own (``lock_timeout``),
not a poll.

The password: never in the DSN (refused), read from `password_file` and handed to libpq as a separate
keyword, so it is in no log line, error message or argv. Errors name the server as ``host:port/dbname``.

Unreachable server: every call raises `blockwire.errors.Unavailable` naming host:port, within
`connect_timeout` seconds; pooled connections are checked before use (`check_connection`), so once the
server is back the pool reconnects and calls succeed again.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import logging
import select
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict

from blockwire.errors import Aborted, ResourceExhausted, Unavailable
from storagesvc.catalog import Conflict
from storagesvc.catalog.sql import MIGRATIONS, SqlCatalog, statements

__all__ = ["PostgresCatalog", "dsn_has_password", "lock_key"]

log = logging.getLogger(__name__)

#: The advisory lock (transaction level) migrations run under.
MIGRATION_LOCK = "blockwire catalog migrations"


def lock_key(key: str) -> int:
    """The 64-bit advisory lock number of a lock name (the first 8 bytes of its SHA-256, signed)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


@functools.lru_cache(maxsize=512)
def to_pyformat(sql: str) -> str:
    """A ``?`` statement in psycopg's ``%s`` style (no statement of ours has a ``?`` inside a literal)."""
    return sql.replace("%", "%%").replace("?", "%s")


def check_connection(conn: psycopg.Connection[Any]) -> None:
    """The pool's check before it hands out a connection, without a round trip when it can: an idle
    connection has nothing to read unless the server has closed it (a restart, a terminated backend:
    the server says so and closes the socket), so only then is it asked (and found broken)."""
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("connection closed")
    poller = select.poll()  # not select(): a daemon may hold more than FD_SETSIZE descriptors
    poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    if poller.poll(0):
        psycopg_pool.ConnectionPool.check_connection(conn)


def dsn_has_password(dsn: str) -> bool:
    """Whether a libpq connection string or URI carries a password (refused: it would reach logs)."""
    return bool(conninfo_to_dict(dsn).get("password"))


class PostgresCatalog(SqlCatalog):
    """The Catalog protocol on a PostgreSQL database (the role needs CONNECT, and CREATE on the schema
    for the migrations; see README "Catalog on PostgreSQL")."""

    def __init__(
        self,
        dsn: str,
        *,
        password_file: str = "",
        min_size: int = 1,
        max_size: int = 8,
        lock_connections: int = 16,
        connect_timeout: float = 5.0,
        application_name: str = "blockwire-storage",
    ) -> None:
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError:
            # psycopg's message quotes the string, which may hold a secret: not repeated
            raise ValueError("[catalog] dsn: not a libpq connection string or postgresql:// URI") from None
        if params.get("password"):
            raise ValueError("[catalog] dsn: holds a password; put the password in password_file")
        host = str(params.get("host") or params.get("hostaddr") or "localhost")
        port = str(params.get("port") or 5432)
        self.server = f"{host}:{port}"
        self.where = f"postgresql {self.server}/{params.get('dbname') or params.get('user') or ''}"
        self.connect_timeout = connect_timeout
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(2, round(connect_timeout)),
            "application_name": application_name,
        }
        if password_file:
            kwargs["password"] = Path(password_file).read_text().strip()
        common: dict[str, Any] = {
            "kwargs": kwargs,
            "check": check_connection,
            "timeout": connect_timeout,
            "reconnect_timeout": 365 * 86400.0,  # never give up a slot: the server comes back
            "open": False,
        }
        self._pool = psycopg_pool.ConnectionPool(
            dsn, min_size=min_size, max_size=max_size, name="catalog", **common
        )
        # the connection of this thread's (context's) open `transaction`, None outside one
        self._tx: contextvars.ContextVar[psycopg.Connection[Any] | None] = contextvars.ContextVar(
            f"catalog-tx-{id(self)}", default=None
        )
        self._locks = psycopg_pool.ConnectionPool(
            dsn, min_size=0, max_size=lock_connections, name="catalog-locks", **common
        )
        # one direct connection first: on start, the server's own reason (refused, a wrong password, no
        # such database) is worth more than the pool's "couldn't get a connection"
        try:
            psycopg.connect(dsn, **kwargs).close()
        except psycopg.OperationalError as exc:
            raise self._unreachable(exc) from None
        self._pool.open(wait=False)
        self._locks.open(wait=False)
        try:
            self.migrate()
        except BaseException:
            self.close()
            raise

    # connections
    def _unreachable(self, exc: BaseException) -> Unavailable:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return Unavailable(f"catalog database {self.server} is unreachable ({reason}); retry")

    @contextlib.contextmanager
    def _conn(self, pool: psycopg_pool.ConnectionPool | None = None) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; the server out of reach (now or mid-statement) -> Unavailable."""
        try:
            with (pool or self._pool).connection() as conn:
                yield conn
        except psycopg_pool.PoolTimeout as exc:
            if pool is self._locks and self._locks.get_stats().get("pool_size", 0) >= self._locks.max_size:
                raise ResourceExhausted(
                    f"all {self._locks.max_size} lock connections to the catalog database are held by "
                    f"other calls (waited {self.connect_timeout:g}s); retry, or raise [catalog] "
                    "lock_connections"
                ) from None
            raise self._unreachable(exc) from None
        except psycopg.OperationalError as exc:
            if isinstance(exc, pgerrors.LockNotAvailable | pgerrors.QueryCanceled):
                raise
            raise self._unreachable(exc) from None

    # the dialect
    @contextlib.contextmanager
    def _statement_conn(self) -> Iterator[psycopg.Connection[Any]]:
        """The open transaction's connection, else a pooled one (autocommit)."""
        tx = self._tx.get()
        if tx is None:
            with self._conn() as conn:
                yield conn
            return
        try:
            yield tx
        except psycopg.OperationalError as exc:
            if isinstance(exc, pgerrors.LockNotAvailable | pgerrors.QueryCanceled):
                raise
            raise self._unreachable(exc) from None

    def _write(self, sql: str, args: Sequence[Any]) -> int:
        with self._statement_conn() as conn:
            try:
                return conn.execute(to_pyformat(sql), args).rowcount
            except pgerrors.UniqueViolation as exc:
                raise Conflict(str(exc).splitlines()[0]) from None

    def _rows(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._statement_conn() as conn:
            return conn.execute(to_pyformat(sql), args).fetchall()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One pooled connection in one transaction for this thread's calls inside the block: COMMIT
        when it ends, ROLLBACK when it raises (the connection goes back to the pool either way).
        Nested: joins. The server out of reach, also at the COMMIT: Unavailable, nothing committed
        that the caller was told about."""
        if self._tx.get() is not None:
            yield
            return
        with self._conn() as conn:
            try:
                with conn.transaction():
                    token = self._tx.set(conn)
                    try:
                        yield
                    finally:
                        self._tx.reset(token)
            except psycopg.OperationalError as exc:
                if isinstance(exc, pgerrors.LockNotAvailable | pgerrors.QueryCanceled):
                    raise
                raise self._unreachable(exc) from None

    def _label_clause(self) -> str:
        return "((doc::jsonb) -> 'labels' ->> ?) = ?"

    @property
    def schema_version(self) -> int:
        with self._conn() as conn:
            return self._version(conn)

    @staticmethod
    def _version(conn: psycopg.Connection[Any]) -> int:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0]) if row is not None and row[0] is not None else 0

    def _apply_migration(self, version: int, script: str) -> None:
        with self._conn() as conn, conn.transaction():
            self._apply(conn, version, script)

    @staticmethod
    def _apply(conn: psycopg.Connection[Any], version: int, script: str) -> None:
        for statement in statements(script):
            conn.execute(statement)  # our own migration text
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", [version])

    def migrate(self) -> None:
        """Applies the migrations this database has not seen, in one transaction under an advisory
        lock: a second process starting at the same time waits, then finds them applied."""
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [lock_key(MIGRATION_LOCK)])
            current = self._version(conn)
            if current > len(MIGRATIONS):
                raise RuntimeError(
                    f"catalog {self.where} has schema version {current}, newer than this service's "
                    f"{len(MIGRATIONS)}: run a newer blockwire-storage"
                )
            for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                self._apply(conn, version, script)
                log.info("catalog %s: applied migration %d", self.where, version)

    # cross-process locks
    @contextlib.contextmanager
    def hold(self, key: str, timeout: float) -> Iterator[None]:
        """The lock named `key` across every process of this database: waits up to `timeout` seconds
        (then Aborted naming `key`), released on exit or when the holding connection ends."""
        number = lock_key(key)
        with self._conn(self._locks) as conn:
            try:
                # one round trip: the subquery (volatile, so never pulled up) sets the wait first
                conn.execute(
                    "SELECT pg_advisory_lock(%s) FROM (SELECT set_config('lock_timeout', %s, false)) AS t",
                    [number, f"{max(1, int(timeout * 1000))}ms"],
                )
            except pgerrors.LockNotAvailable:
                raise Aborted(
                    f"{key} is busy: a call on another storage node holds it (waited {timeout:g}s); retry"
                ) from None
            try:
                yield
            finally:
                try:
                    conn.execute("SELECT pg_advisory_unlock(%s)", [number])
                except psycopg.Error as exc:
                    # the connection is gone, and the server released the lock with it
                    log.warning("catalog %s: lock %s lost before its release: %s", self.where, key, exc)

    def close(self) -> None:
        self._locks.close()
        self._pool.close()
