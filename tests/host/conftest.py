"""Host tier: real tgtd, libvirtd + QEMU, udevd, a throwaway Ceph cluster and a throwaway PostgreSQL
server on this machine (root)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ceph import CephCluster, CephMissing
from tests.conftest import tier_unavailable
from tests.host.daemons import (
    Missing,
    Started,
    Tgtd,
    ensure_libvirtd,
    ensure_udevd,
    free_port,
    free_tgt_control_port,
    need_root,
)
from tests.postgres import PostgresMissing, PostgresServer

# Two portals on two loopback addresses: two paths to every LUN. The port and the tgtd control port are
# chosen free per test session, so parallel runs never share a tgtd: use `tgtd.portals` and
# `tgtd.control_port`, never literals.
PORTAL_HOSTS = ("127.0.0.1", "127.0.0.2")


@pytest.fixture(scope="session")
def host_daemons() -> Iterator[Started]:
    started = Started()
    try:
        need_root()
        ensure_udevd(started)
        ensure_libvirtd(started)
    except Missing as exc:
        started.stop()
        tier_unavailable("host", str(exc))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def tgtd() -> Iterator[Tgtd]:
    try:
        need_root()
        port = free_port(PORTAL_HOSTS)
        daemon = Tgtd(
            portals=tuple(f"{h}:{port}" for h in PORTAL_HOSTS), control_port=free_tgt_control_port()
        )
        daemon.start()
    except Missing as exc:
        tier_unavailable("host", str(exc))
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    """One throwaway Ceph cluster for the session: mon + 1 MemStore OSD, pool `rbd` writable (~2 s).
    Tests that kill an OSD and need the data back start their own BlueStore CephCluster."""
    try:
        need_root()
        cluster = CephCluster(osds=1, objectstore="memstore").start()
    except (Missing, CephMissing) as exc:
        tier_unavailable("host", f"Ceph cluster: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the session (~2 s): `.dsn()` (no password in it),
    `.password_file`, `.create_database()` -> the DSN of a fresh database, `.restart()`."""
    try:
        server = PostgresServer().start()
    except PostgresMissing as exc:
        tier_unavailable("host", f"PostgreSQL: {exc}")
    yield server
    server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A fresh, empty database per test (its DSN; the password is in postgres_server.password_file)."""
    return postgres_server.create_database()
