"""A throwaway PostgreSQL server for tests and benchmarks (the catalog on PostgreSQL).

PostgreSQL refuses to run as root: the data directory lives under a temp dir owned by `postgres`, and
initdb and pg_ctl run as that user (runuser). The server listens on a free port on 127.0.0.1 only, with
its Unix socket inside the temp dir, and password (SCRAM) authentication: the role `bw`'s generated
password is in `password_file`, never in a DSN. `stop()` is pg_ctl's fast shutdown, then a kill of the
postmaster by its pid; the temp dir goes with it.

    server = PostgresServer().start()
    catalog = PostgresCatalog(server.create_database(), password_file=server.password_file)
    ...
    server.stop()
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

USER = "bw"  # the superuser role initdb makes (the catalog's role in the tests)
OS_USER = "postgres"  # the Unix user the server runs as


class PostgresMissing(Exception):
    """PostgreSQL cannot be started here; the message says why and how to get it."""


def find_bindir() -> Path:
    """The newest /usr/lib/postgresql/N/bin with initdb and pg_ctl (Debian's layout)."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    raise PostgresMissing("PostgreSQL not found (/usr/lib/postgresql/*/bin): apt-get install postgresql")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    """One PostgreSQL server of our own: `start()`, `dsn`, `password_file`, `restart()`, `stop()`."""

    host: str = "127.0.0.1"
    port: int = 0
    root: Path = field(default_factory=Path)
    bindir: Path = field(default_factory=Path)
    password_file: str = ""
    fsync: bool = False  # tests: off (a throwaway server); benchmarks: on, as in production
    parent: str | None = None  # where the temp dir goes (None: the system's temp dir)
    _password: str = ""
    _databases: int = 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq connection string without the password (that is in `password_file`)."""
        return f"host={self.host} port={self.port} user={USER} dbname={dbname}"

    def start(self) -> PostgresServer:
        if os.geteuid() != 0:
            raise PostgresMissing("needs root (to run PostgreSQL as the postgres user)")
        self.bindir = find_bindir()
        try:
            owner = pwd.getpwnam(OS_USER)
        except KeyError:
            raise PostgresMissing(f"no {OS_USER} user: apt-get install postgresql") from None
        self.root = Path(tempfile.mkdtemp(prefix="bw-pg-", dir=self.parent))
        os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.root.chmod(0o700)
        self._password = secrets.token_urlsafe(18)
        pwfile = self.root / "initdb.pw"
        pwfile.write_text(self._password + "\n")
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        # what the clients read (root-only: outside the server's directory)
        fd, client_pw = tempfile.mkstemp(prefix="bw-pg-pw-")
        os.write(fd, (self._password + "\n").encode())
        os.close(fd)
        self.password_file = client_pw
        try:
            self._as_postgres(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                "-A",
                "scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--no-sync",
                timeout=120,
            )
        except PostgresMissing:
            self._remove()
            raise
        pwfile.unlink()
        self.port = self.port or free_port(self.host)
        self._start_server()
        return self

    def _as_postgres(self, *argv: str, timeout: float) -> None:
        if shutil.which("runuser") is None:
            raise PostgresMissing("runuser not found (util-linux)")
        r = subprocess.run(
            ["runuser", "-u", OS_USER, "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.root,
        )
        if r.returncode != 0:
            raise PostgresMissing(f"{Path(argv[0]).name} exited {r.returncode}: {r.stderr.strip()[-400:]}")

    def _start_server(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses={self.host}"
        opts += "" if self.fsync else " -c fsync=off"
        self._as_postgres(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
            timeout=90,
        )

    def _pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _stop_server(self) -> None:
        """pg_ctl stop -m fast; when that fails, SIGKILL the postmaster by its pid (bounded wait)."""
        try:
            self._as_postgres(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "fast",
                "-w",
                "-t",
                "30",
                "stop",
                timeout=45,
            )
            return
        except (PostgresMissing, subprocess.TimeoutExpired):
            pass
        pid = self._pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def restart(self, down_for: float = 0.0) -> None:
        """Stop (fast) and start again on the same port; `down_for` seconds in between."""
        self._stop_server()
        if down_for:
            time.sleep(down_for)
        self._start_server()

    def stop_server(self) -> None:
        """Stop only the server (it can be started again with `start_server`)."""
        self._stop_server()

    def start_server(self) -> None:
        self._start_server()

    def stop(self) -> None:
        if self.root == Path():
            return
        self._stop_server()
        self._remove()

    def _remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self.password_file:
            Path(self.password_file).unlink(missing_ok=True)
        self.root = Path()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def create_database(self, name: str = "") -> str:
        """A new empty database (a fresh one per test); its DSN."""
        import psycopg  # noqa: PLC0415 - only the tests that start a server need it

        self._databases += 1
        name = name or f"bw_{os.getpid()}_{self._databases}_{secrets.token_hex(3)}"
        with psycopg.connect(self.dsn(), password=self._password, autocommit=True, connect_timeout=10) as c:
            c.execute(f'CREATE DATABASE "{name}"')  # type: ignore[call-overload] # our own name
        return self.dsn(name)

    def connect(self, dsn: str = "") -> psycopg.Connection[Any]:
        """A psycopg connection (autocommit) for a test's own look at the database."""
        import psycopg  # noqa: PLC0415

        return psycopg.connect(
            dsn or self.dsn(), password=self._password, autocommit=True, connect_timeout=10
        )
