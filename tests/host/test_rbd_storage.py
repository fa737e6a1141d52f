"""Host tier: the real `blockwire-storage` daemon (subprocess, gRPC on a unix socket) with an rbd backend
on a real throwaway Ceph cluster (tests/ceph.py: mon + MemStore OSD), checked with librbd/librados.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import storage_pb2_grpc
from blockwire.v1 import types_pb2 as pb
from storagesvc.backends.rbd import mon_host
from tests.ceph import CephCluster, CephUser
from tests.conftest import tier_unavailable
from tests.rig import Daemon

MIB = 1024 * 1024
CONNECT_TIMEOUT = 3.0  # the backend's connect_timeout: the bound of UNAVAILABLE when the monitor is down

try:
    import rados
    import rbd
except ImportError:  # pragma: no cover
    rados = rbd = None


@pytest.fixture(scope="module")
def bindings() -> None:
    if rados is None:
        tier_unavailable(
            "host",
            "python rados/rbd bindings not importable: apt-get install python3-rbd "
            "python3-rados, and link them into the venv (scripts/setup)",
        )


def write_config(
    tmp: Path, cluster: CephCluster, user: CephUser, *, pool: str, key_file: Path | None = None, **extra: Any
) -> Path:
    config = tmp / "storage.toml"
    lines = "".join(
        f"{k} = {v!r}\n".replace("'", '"') if not isinstance(v, (int, float)) else f"{k} = {v}\n"
        for k, v in extra.items()
    )
    keyline = f'key_file = "{key_file}"' if key_file else f'keyring = "{user.keyring}"'
    config.write_text(
        f"""
[server]
unix_socket = "{tmp}/storage.sock"
log_format = "kv"
log_level = "DEBUG"

[service]
catalog_path = "{tmp}/catalog.db"
iqn_prefix = "iqn.2026-01.io.blockwire.t{uuid.uuid4().hex[:12]}"

[[backends]]
name = "ceph"
kind = "rbd"
monitors = ["{cluster.monitors[0]}"]
pool = "{pool}"
user = "{user.name}"
{keyline}
connect_timeout = {CONNECT_TIMEOUT}
op_timeout = 10.0
capacity_bytes = {4 << 30}
{lines}"""
    )
    return config


@contextlib.contextmanager
def running(config: Path) -> Iterator[Daemon]:
    daemon = Daemon.storage(
        config, config.parent / "storage.sock", start_timeout=30, health_service="blockwire.v1.StorageService"
    )
    daemon.start()
    try:
        yield daemon
    finally:
        code = daemon.stop()
        assert code == 0, daemon.tail(2000)


@pytest.fixture(scope="module")
def pool(ceph_cluster: CephCluster, bindings: None) -> str:
    """A pool of this module's own: what it leaves behind never meets another test."""
    name = f"bw-{uuid.uuid4().hex[:8]}"
    ceph_cluster.create_pool(name)
    return name


@pytest.fixture(scope="module")
def user(ceph_cluster: CephCluster, pool: str) -> CephUser:
    return ceph_cluster.create_user(f"storage-{pool}", pool)


@pytest.fixture(scope="module")
def storaged(
    ceph_cluster: CephCluster, pool: str, user: CephUser, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("rbd")
    with running(write_config(tmp, ceph_cluster, user, pool=pool)) as daemon:
        yield daemon


@pytest.fixture
def ioctx(ceph_cluster: CephCluster, pool: str) -> Iterator[Any]:
    """librados on the pool as client.admin: what the test checks the daemon's work with."""
    cluster = rados.Rados(conffile=str(ceph_cluster.conf), name="client.admin")
    cluster.connect(timeout=10)
    io = cluster.open_ioctx(pool)
    try:
        yield io
    finally:
        io.close()
        cluster.shutdown()


def stub(daemon: Daemon) -> storage_pb2_grpc.StorageServiceStub:
    return storage_pb2_grpc.StorageServiceStub(daemon.channel)


def settled(daemon: Daemon, volume_id: str, timeout: float = 60) -> pb.Volume:
    for r in stub(daemon).WatchVolume(spb.WatchVolumeRequest(volume_id=volume_id), timeout=timeout):
        v = r.volume
        if v.state in (pb.VOLUME_STATE_AVAILABLE, pb.VOLUME_STATE_ERROR):
            assert v.state == pb.VOLUME_STATE_AVAILABLE, v.error_message
            return v
    raise AssertionError(f"volume {volume_id} never settled")


def create(daemon: Daemon, name: str, size: int = 0, **source: Any) -> pb.Volume:
    v = (
        stub(daemon)
        .CreateVolume(spb.CreateVolumeRequest(name=name, size_bytes=size, **source), timeout=60)
        .volume
    )
    return settled(daemon, v.id) if source else v


def image(volume_id: str) -> str:
    return f"volume-{volume_id}"


def read(io: Any, name: str, offset: int, length: int) -> bytes:
    with rbd.Image(io, name, read_only=True) as im:
        return bytes(im.read(offset, length))


def write(io: Any, name: str, offset: int, data: bytes) -> None:
    with rbd.Image(io, name) as im:
        im.write(data, offset)


def parent(io: Any, name: str) -> tuple[str, str] | None:
    with rbd.Image(io, name, read_only=True) as im:
        try:
            spec = im.get_parent_image_spec()
        except rbd.ImageNotFound:
            return None
        return spec["image_name"], spec["snap_name"]


def connector(host: str = "host-a", *transports: int) -> pb.Connector:
    return pb.Connector(host=host, transports=list(transports or (pb.TRANSPORT_RBD,)))


# -- volumes, snapshots, clones


def test_create_snapshot_clone_extend_delete(storaged: Daemon, ioctx: Any) -> None:
    s = stub(storaged)
    vol = create(storaged, "base-vol", 8 * MIB)
    assert vol.state == pb.VOLUME_STATE_AVAILABLE
    with rbd.Image(ioctx, image(vol.id), read_only=True) as im:
        assert im.size() == 8 * MIB
    write(ioctx, image(vol.id), 0, b"first")
    snap = s.CreateSnapshot(spb.CreateSnapshotRequest(volume_id=vol.id, name="snap-1"), timeout=30).snapshot
    with rbd.Image(ioctx, image(vol.id), read_only=True) as im:
        assert f"snapshot-{snap.id}" in [x["name"] for x in im.list_snaps()]
    write(ioctx, image(vol.id), 0, b"after")

    # a volume from the snapshot: a copy-on-write clone with the snapshot's content
    from_snap = create(storaged, "from-snap", 16 * MIB, source_snapshot_id=snap.id)
    assert parent(ioctx, image(from_snap.id)) == (image(vol.id), f"snapshot-{snap.id}")
    assert read(ioctx, image(from_snap.id), 0, 5) == b"first"
    assert from_snap.size_bytes == 16 * MIB

    # a clone of the volume: CoW through a hidden snapshot, with the volume's content now
    clone = create(storaged, "clone-of-vol", 0, source_volume_id=vol.id)
    assert parent(ioctx, image(clone.id)) == (image(vol.id), f"clone-{clone.id}")
    assert read(ioctx, image(clone.id), 0, 5) == b"after"

    # extend
    grown = s.ExtendVolume(
        spb.ExtendVolumeRequest(volume_id=vol.id, new_size_bytes=32 * MIB), timeout=30
    ).volume
    assert grown.size_bytes == 32 * MIB
    with rbd.Image(ioctx, image(vol.id), read_only=True) as im:
        assert im.size() == 32 * MIB

    # the volume has a snapshot: deleting it is refused; the snapshot with a clone: the clone is flattened
    with pytest.raises(grpc.RpcError) as refused:
        s.DeleteVolume(spb.DeleteVolumeRequest(volume_id=vol.id), timeout=30)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    s.DeleteSnapshot(spb.DeleteSnapshotRequest(snapshot_id=snap.id), timeout=60)
    s.DeleteSnapshot(spb.DeleteSnapshotRequest(snapshot_id=snap.id), timeout=60)  # a repeat: OK
    assert parent(ioctx, image(from_snap.id)) is None
    assert read(ioctx, image(from_snap.id), 0, 5) == b"first"

    # the source volume goes: its clone is flattened first and keeps its content
    s.DeleteVolume(spb.DeleteVolumeRequest(volume_id=vol.id), timeout=60)
    assert parent(ioctx, image(clone.id)) is None
    assert read(ioctx, image(clone.id), 0, 5) == b"after"
    for v in (clone, from_snap):
        s.DeleteVolume(spb.DeleteVolumeRequest(volume_id=v.id), timeout=60)
        s.DeleteVolume(spb.DeleteVolumeRequest(volume_id=v.id), timeout=60)  # a repeat: OK
    left = [n for n in rbd.RBD().list(ioctx) if n.startswith("volume-")]
    assert not left, left


def test_deleting_a_clone_removes_its_hidden_snapshot(storaged: Daemon, ioctx: Any) -> None:
    s = stub(storaged)
    src = create(storaged, "hidden-src", 4 * MIB)
    clone = create(storaged, "hidden-clone", 0, source_volume_id=src.id)
    with rbd.Image(ioctx, image(src.id), read_only=True) as im:
        assert [x["name"] for x in im.list_snaps()] == [f"clone-{clone.id}"]
    s.DeleteVolume(spb.DeleteVolumeRequest(volume_id=clone.id), timeout=60)
    with rbd.Image(ioctx, image(src.id), read_only=True) as im:
        assert list(im.list_snaps()) == []
    s.DeleteVolume(spb.DeleteVolumeRequest(volume_id=src.id), timeout=60)


def test_create_from_an_image_clones_one_golden_image(storaged: Daemon, ioctx: Any, tmp_path: Path) -> None:
    src = tmp_path / "golden.raw"
    with src.open("wb") as f:
        f.truncate(12 * MIB)
        f.seek(5 * MIB)
        f.write(b"golden-data")
    os.chmod(tmp_path, 0o755)
    source = pb.ImageSource(path=str(src), format=pb.IMAGE_FORMAT_RAW)
    a = create(storaged, "from-image-a", 0, source_image=source)
    bases = [n for n in rbd.RBD().list(ioctx) if n.startswith("image-")]
    assert len(bases) == 1, bases
    assert parent(ioctx, image(a.id)) == (bases[0], "base")
    assert read(ioctx, image(a.id), 5 * MIB, 11) == b"golden-data"
    assert a.size_bytes == 12 * MIB

    # the second create does not import again: the same base (its id unchanged), one more child
    with rbd.Image(ioctx, bases[0], read_only=True) as im:
        base_id = im.id()
    b = create(storaged, "from-image-b", 16 * MIB, source_image=source)
    assert [n for n in rbd.RBD().list(ioctx) if n.startswith("image-")] == bases
    with rbd.Image(ioctx, bases[0], snapshot="base", read_only=True) as im:
        assert im.id() == base_id
        assert sorted(c["image"] for c in im.list_children2()) == sorted([image(a.id), image(b.id)])
    assert read(ioctx, image(b.id), 5 * MIB, 11) == b"golden-data"
    for v in (a, b):
        stub(storaged).DeleteVolume(spb.DeleteVolumeRequest(volume_id=v.id), timeout=60)


def test_a_qcow2_image_and_two_creates_at_once_make_one_base(
    storaged: Daemon, ioctx: Any, tmp_path: Path
) -> None:
    """A qcow2 image is converted to raw before its import; two volumes asked for at once (two copy
    workers) share one import."""
    raw = tmp_path / "src.raw"
    with raw.open("wb") as f:
        f.truncate(6 * MIB)
        f.seek(MIB)
        f.write(b"qcow2-data")
    qcow2 = tmp_path / "golden.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True, timeout=60
    )
    os.chmod(tmp_path, 0o755)
    before = {n for n in rbd.RBD().list(ioctx) if n.startswith("image-")}
    source = pb.ImageSource(path=str(qcow2), format=pb.IMAGE_FORMAT_QCOW2)
    s = stub(storaged)
    ids = [
        s.CreateVolume(spb.CreateVolumeRequest(name=f"qcow2-{i}", source_image=source), timeout=60).volume.id
        for i in range(2)
    ]
    vols = [settled(storaged, v) for v in ids]
    bases = {n for n in rbd.RBD().list(ioctx) if n.startswith("image-")} - before
    assert len(bases) == 1, bases
    assert not [n for n in rbd.RBD().list(ioctx) if ".tmp-" in n]
    for v in vols:
        assert v.size_bytes == 6 * MIB
        assert read(ioctx, image(v.id), MIB, 10) == b"qcow2-data"
        s.DeleteVolume(spb.DeleteVolumeRequest(volume_id=v.id), timeout=60)


# -- attachments


def test_create_attachment_returns_the_images_rbd_connection(
    storaged: Daemon, ioctx: Any, ceph_cluster: CephCluster, pool: str, user: CephUser
) -> None:
    s = stub(storaged)
    vol = create(storaged, "attach-me", 4 * MIB)
    req = spb.CreateAttachmentRequest(volume_id=vol.id, connector=connector(), domain="dom-a")
    att = s.CreateAttachment(req, timeout=30).attachment
    rbdc = att.connection_info.rbd
    with rbd.Image(ioctx, image(vol.id), read_only=True) as im:
        real_id = im.id()
    assert rbdc.image_id == real_id
    assert rbdc.image == image(vol.id)
    assert rbdc.pool == pool
    assert list(rbdc.monitors) == list(ceph_cluster.monitors)
    assert rbdc.cluster_fsid == ceph_cluster.fsid
    assert rbdc.user == user.name
    assert rbdc.key == user.key
    assert att.connection_info.volume_id == vol.id
    assert att.connection_info.attachment_id == att.id
    # the key it hands out opens the image
    conf = {"mon_host": mon_host(tuple(rbdc.monitors)), "key": rbdc.key}
    host = rados.Rados(name=f"client.{rbdc.user}", conf=conf)
    host.connect(timeout=10)
    try:
        with host.open_ioctx(rbdc.pool) as hio, rbd.Image(hio, rbdc.image, read_only=True) as im:
            assert im.id() == rbdc.image_id
    finally:
        host.shutdown()

    # a repeat returns the same attachment; another domain on a non-multiattach volume is refused
    assert s.CreateAttachment(req, timeout=30).attachment.id == att.id
    other = spb.CreateAttachmentRequest(volume_id=vol.id, connector=connector("host-b"), domain="dom-b")
    with pytest.raises(grpc.RpcError) as refused:
        s.CreateAttachment(other, timeout=30)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # a host that lists only iSCSI cannot reach an RBD volume
    iscsi_only = spb.CreateAttachmentRequest(
        volume_id=vol.id, connector=connector("host-c", pb.TRANSPORT_ISCSI), domain="dom-c"
    )
    with pytest.raises(grpc.RpcError) as wrong:
        s.CreateAttachment(iscsi_only, timeout=30)
    assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # extend while attached resizes the image; the attachment stays
    s.ExtendVolume(spb.ExtendVolumeRequest(volume_id=vol.id, new_size_bytes=8 * MIB), timeout=30)
    with rbd.Image(ioctx, image(vol.id), read_only=True) as im:
        assert im.size() == 8 * MIB
    s.CompleteAttachment(spb.CompleteAttachmentRequest(attachment_id=att.id), timeout=30)
    assert (
        s.GetVolume(spb.GetVolumeRequest(volume_id=vol.id), timeout=30).volume.state == pb.VOLUME_STATE_IN_USE
    )

    s.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=att.id), timeout=30)
    s.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=att.id), timeout=30)  # gone: OK
    assert (
        s.GetVolume(spb.GetVolumeRequest(volume_id=vol.id), timeout=30).volume.state
        == pb.VOLUME_STATE_AVAILABLE
    )

    # a re-created image of the same name has another id, and a new attachment announces that one
    s.DeleteVolume(spb.DeleteVolumeRequest(volume_id=vol.id), timeout=30)
    vol2 = create(storaged, "attach-me-again", 4 * MIB)
    att2 = s.CreateAttachment(
        spb.CreateAttachmentRequest(volume_id=vol2.id, connector=connector()), timeout=30
    )
    assert att2.attachment.connection_info.rbd.image_id != real_id
    s.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=att2.attachment.id), timeout=30)
    s.DeleteVolume(spb.DeleteVolumeRequest(volume_id=vol2.id), timeout=30)
    # the key went to the caller only: not into the daemon's (DEBUG) log
    assert user.key not in storaged.log.read_text(errors="replace")


def test_per_host_users_have_caps_limited_to_the_pool(
    ceph_cluster: CephCluster, pool: str, ioctx: Any, tmp_path: Path
) -> None:
    """host_users = "per-host": each host gets client.<prefix>.<host>, made on its first attach with
    caps on the backend's pool only; the service's user needs `auth get-or-create` for it."""
    admin = ceph_cluster.create_user(
        f"storage-ph-{pool}",
        caps=("mon", 'profile rbd, allow command "auth get-or-create"', "osd", f"profile rbd pool={pool}"),
    )
    config = write_config(
        tmp_path, ceph_cluster, admin, pool=pool, host_users="per-host", host_user_prefix="bwt"
    )
    with running(config) as daemon:
        s = stub(daemon)
        vol = create(daemon, "per-host", 4 * MIB)
        att = s.CreateAttachment(
            spb.CreateAttachmentRequest(volume_id=vol.id, connector=connector("host-x")), timeout=30
        ).attachment
        rbdc = att.connection_info.rbd
        assert rbdc.user == "bwt.host-x"
        assert rbdc.key != admin.key
        caps = ceph_cluster.cli("ceph", "auth", "get", "client.bwt.host-x")
        assert f"profile rbd pool={pool}" in caps
        assert "auth" not in caps
        conf = {"mon_host": mon_host(tuple(rbdc.monitors)), "key": rbdc.key}
        host = rados.Rados(name=f"client.{rbdc.user}", conf=conf)
        host.connect(timeout=10)
        try:
            with host.open_ioctx(rbdc.pool) as hio, rbd.Image(hio, rbdc.image) as im:
                assert im.id() == rbdc.image_id
                im.write(b"host-data", 0)
        finally:
            host.shutdown()
        assert read(ioctx, image(vol.id), 0, 9) == b"host-data"
        s.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=att.id), timeout=30)
        s.DeleteVolume(spb.DeleteVolumeRequest(volume_id=vol.id), timeout=30)


# -- failures


def test_more_than_the_capacity_is_resource_exhausted(storaged: Daemon) -> None:
    """capacity_bytes (4 GiB here; the cluster reports no pool size without a ceph-mgr) bounds what is
    provisioned: a bigger volume is refused before anything is made."""
    with pytest.raises(grpc.RpcError) as full:
        stub(storaged).CreateVolume(spb.CreateVolumeRequest(name="too-big", size_bytes=8 << 30), timeout=30)
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    names = [v.name for v in stub(storaged).ListVolumes(spb.ListVolumesRequest(), timeout=30).volumes]
    assert "too-big" not in names


def test_a_wrong_cephx_key_is_permission_denied(
    ceph_cluster: CephCluster, pool: str, user: CephUser, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_text("AQAgIQ1rCEg9BxAAxq5hRqC/G3gqXi2lcMjQUQ==\n")
    config = write_config(tmp_path, ceph_cluster, user, pool=pool, key_file=wrong)
    with running(config) as daemon, pytest.raises(grpc.RpcError) as denied:
        stub(daemon).CreateVolume(spb.CreateVolumeRequest(name="denied", size_bytes=4 * MIB), timeout=30)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"client.{user.name}" in (denied.value.details() or "")
    assert "AQAgIQ1rCEg9" not in (denied.value.details() or "")


def test_the_monitor_down_is_unavailable_within_the_bound_then_back(
    storaged: Daemon, ceph_cluster: CephCluster
) -> None:
    s = stub(storaged)
    vol = create(storaged, "mon-down", 4 * MIB)
    ceph_cluster.stop_mon()
    try:
        for call in (
            lambda: s.CreateVolume(
                spb.CreateVolumeRequest(name="mon-down-2", size_bytes=4 * MIB), timeout=60
            ),
            lambda: s.CreateAttachment(
                spb.CreateAttachmentRequest(volume_id=vol.id, connector=connector()), timeout=60
            ),
        ):
            began = time.monotonic()
            with pytest.raises(grpc.RpcError) as down:
                call()
            took = time.monotonic() - began
            print(f"UNAVAILABLE after {took:.2f}s (connect_timeout {CONNECT_TIMEOUT:g}s)")
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE, down.value.details()
            assert ceph_cluster.monitors[0] in (down.value.details() or "")
            assert took < CONNECT_TIMEOUT * 2 + 2, took
        # nothing was left behind: no attachment, no volume row
        assert not s.ListAttachments(spb.ListAttachmentsRequest(volume_id=vol.id), timeout=30).attachments
        names = [v.name for v in s.ListVolumes(spb.ListVolumesRequest(), timeout=30).volumes]
        assert "mon-down-2" not in names
    finally:
        ceph_cluster.start_mon()
    ceph_cluster.wait_writable(timeout=30)
    back = create(storaged, "mon-back", 4 * MIB)
    assert back.state == pb.VOLUME_STATE_AVAILABLE
    for v in (vol, back):
        s.DeleteVolume(spb.DeleteVolumeRequest(volume_id=v.id), timeout=30)
