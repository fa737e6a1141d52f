"""The Ceph rig itself (tests/ceph.py): the pieces other tests rely on do what they say."""

from __future__ import annotations

import subprocess

import pytest

from tests.ceph import CephCluster, CephMissing
from tests.conftest import tier_unavailable


def test_pool_writable_and_restricted_user(ceph_cluster: CephCluster) -> None:
    ceph_cluster.wait_writable(timeout=10)
    user = ceph_cluster.create_user("rig-check")
    caps = ceph_cluster.cli("ceph", "auth", "get", user.entity)
    assert f"profile rbd pool={ceph_cluster.pool}" in caps
    assert user.keyring.stat().st_mode & 0o077 == 0
    # the user reaches its pool with its own key ...
    subprocess.run(
        [
            "rbd",
            "--conf",
            str(ceph_cluster.conf),
            "--id",
            user.name,
            "--keyring",
            str(user.keyring),
            "-p",
            ceph_cluster.pool,
            "ls",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    # ... and not another pool's objects
    ceph_cluster.create_pool("rig-other")
    denied = subprocess.run(
        [
            "rados",
            "--conf",
            str(ceph_cluster.conf),
            "--id",
            user.name,
            "--keyring",
            str(user.keyring),
            "-p",
            "rig-other",
            "put",
            "x",
            str(ceph_cluster.conf),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert denied.returncode != 0, "a user limited to one pool wrote into another"


def test_mon_stop_and_start(ceph_cluster: CephCluster) -> None:
    ceph_cluster.stop_mon()
    try:
        with pytest.raises(CephMissing):
            ceph_cluster.cli("ceph", "mon", "dump", timeout=3)
    finally:
        ceph_cluster.start_mon()
    ceph_cluster.wait_writable(timeout=30)


def test_bluestore_keeps_data_across_an_osd_restart() -> None:
    """BlueStore on a sparse file (what the agent's OSD-restart test needs): an OSD killed with -9 and
    started again still has what was written."""
    try:
        cluster = CephCluster(osds=1, objectstore="bluestore").start()
    except CephMissing as exc:
        tier_unavailable("host", f"Ceph cluster: {exc}")
    try:
        probe = cluster.dir / "data"
        probe.write_bytes(b"survives")
        cluster.cli("rados", "-p", cluster.pool, "put", "kept", str(probe))
        pid = cluster.pids()["osd.0"]
        cluster.kill_osd(0)
        assert "osd.0" not in cluster.pids()
        cluster.start_osd(0)
        assert cluster.pids()["osd.0"] != pid
        cluster.wait_writable(timeout=60)
        assert cluster.cli("rados", "-p", cluster.pool, "get", "kept", "-") == "survives"
    finally:
        cluster.stop()
    assert not cluster.pids()
