"""Inside the guest (BLOCKWIRE_IN_GUEST=1, root, a real kernel): the `blockwire-storage` daemon with the
`lvm-thin` backend (a loop-backed VG with a thin pool made here) and the `lio` exporter (configfs), reached
by the kernel initiator (iscsiadm) on two portals with CHAP, multipath over both paths.

Checks: the WWN the service announces is what the kernel reads (/sys/block/sdX/device/wwid = "naa." + wwn,
multipath WWID "3" + wwn); data written through the map reads back; a wrong CHAP secret and an initiator
outside the ACL are refused; deleting the attachment removes the LIO target and the storage object; a
snapshot and a volume from it are thin LVs; after LIO loses its configuration, a restarted service rebuilds
the export. Everything it makes (sessions, node records, target, LVs, VG, loop device) is removed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import storage_pb2_grpc
from blockwire.v1 import types_pb2 as pb
from tests.guest.inside import kernel
from tests.guest.inside.conftest import GUEST_DAEMON
from tests.guest.inside.kernel import run, settle
from tests.host import libiscsi
from tests.rig import Daemon, wait_until

pytestmark = pytest.mark.skipif(
    os.environ.get("BLOCKWIRE_IN_GUEST") != "1", reason="runs inside the guest only"
)

MIB = 1 << 20
# Not 3260: the tgtd fixture of other guest tests may hold that port.
PORTALS = ("127.0.0.1:3262", "127.0.0.2:3262")
CONFIGFS = Path("/sys/kernel/config")
LIO_ISCSI = CONFIGFS / "target" / "iscsi"


def initiator_name() -> str:
    for line in Path("/etc/iscsi/initiatorname.iscsi").read_text().splitlines():
        if line.startswith("InitiatorName="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("no InitiatorName in /etc/iscsi/initiatorname.iscsi")


@pytest.fixture(scope="module")
def lio() -> None:
    if not CONFIGFS.is_dir() or not any(CONFIGFS.iterdir()):
        run(["mount", "-t", "configfs", "configfs", str(CONFIGFS)], ok=(0, 32))
    run(["modprobe", "-a", "target_core_mod", "iscsi_target_mod", "target_core_iblock", "target_core_file"])
    wait_until("LIO in configfs", (CONFIGFS / "target").is_dir, 10)
    try:
        import rtslib_fb  # noqa: F401, PLC0415
    except ImportError:
        pytest.fail("rtslib-fb is missing in the guest: pip install 'blockwire[lio]' (or python3-rtslib-fb)")


@dataclass
class ThinPool:
    vg: str
    pool: str
    loop: str
    image: Path

    def lvs(self) -> list[str]:
        out = run(["lvs", "--noheadings", "-o", "lv_name", self.vg]).stdout
        return sorted(line.strip() for line in out.splitlines() if line.strip())


@pytest.fixture(scope="module")
def thin_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThinPool]:
    image = tmp_path_factory.mktemp("lvm") / "pv.img"
    with image.open("wb") as f:
        f.truncate(512 * MIB)
    loop = run(["losetup", "--find", "--show", str(image)]).stdout.strip()
    vg = f"bwtest{uuid.uuid4().hex[:8]}"
    try:
        run(["pvcreate", "-q", "-y", loop])
        run(["vgcreate", "-q", vg, loop])
        run(["lvcreate", "-q", "-y", "-L", "384m", "-T", f"{vg}/pool"])
        yield ThinPool(vg, "pool", loop, image)
    finally:
        run(["vgremove", "-q", "-y", "-f", vg], ok=(0, 5))
        run(["pvremove", "-q", "-y", loop], ok=(0, 5))
        run(["losetup", "-d", loop], ok=(0, 1))


def storage_stub(daemon: Daemon) -> storage_pb2_grpc.StorageServiceStub:
    return storage_pb2_grpc.StorageServiceStub(daemon.channel)


@pytest.fixture
def prefix() -> str:
    """The IQN prefix of the daemon's targets."""
    return f"iqn.2026-01.io.blockwire.g{uuid.uuid4().hex[:8]}"


@pytest.fixture
def storaged(lio: None, thin_pool: ThinPool, tmp_path: Path, prefix: str) -> Iterator[Daemon]:
    config = tmp_path / "storage.toml"
    portals = ", ".join(f'"{p}"' for p in PORTALS)
    config.write_text(
        f'[server]\nunix_socket = "{tmp_path}/storage.sock"\nlog_format = "kv"\nlog_level = "DEBUG"\n'
        f'[service]\ncatalog_path = "{tmp_path}/catalog.db"\niqn_prefix = "{prefix}"\n'
        f'[[backends]]\nname = "thin"\nkind = "lvm-thin"\nvg = "{thin_pool.vg}"\npool = "{thin_pool.pool}"\n'
        f'exporter = "lio"\noversubscription_ratio = 2.0\n'
        f"[exporters.lio]\nportals = [{portals}]\n"
    )
    daemon = Daemon.storage(config, tmp_path / "storage.sock", **GUEST_DAEMON)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        kernel.keep_log(daemon.log, f"{tmp_path.name}-storage.log")
        kernel.force_cleanup()
        for target in LIO_ISCSI.glob(f"{prefix}*") if LIO_ISCSI.is_dir() else []:
            _delete_lio_target(target.name)


def _delete_lio_target(iqn: str) -> None:
    import rtslib_fb  # noqa: PLC0415

    for t in rtslib_fb.FabricModule("iscsi").targets:
        if t.wwn == iqn:
            t.delete()


def _connector() -> pb.Connector:
    return pb.Connector(
        host="guest",
        initiator_iqn=initiator_name(),
        multipath=True,
        kernel_iscsi=True,
        transports=[pb.TRANSPORT_ISCSI],
    )


def _node_chap(iqn: str, portal: str, user: str, password: str) -> None:
    run(["iscsiadm", "-m", "node", "-o", "new", "-T", iqn, "-p", portal])
    for name, value in (
        ("node.session.auth.authmethod", "CHAP"),
        ("node.session.auth.username", user),
        ("node.session.auth.password", password),
    ):
        run(["iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "-o", "update", "-n", name, "-v", value])


def _forget(iqn: str) -> None:
    run(["iscsiadm", "-m", "node", "-T", iqn, "--logout"], ok=(0, 21), timeout=120)
    run(["iscsiadm", "-m", "node", "-T", iqn, "-o", "delete"], ok=(0, 21))
    settle()


def test_lvm_thin_volume_over_lio_reaches_the_kernel_with_the_announced_identity(
    storaged: Daemon, thin_pool: ThinPool, tmp_path: Path
) -> None:
    stub = storage_stub(storaged)
    vol = stub.CreateVolume(spb.CreateVolumeRequest(name="g1", size_bytes=64 * MIB), timeout=120).volume
    assert f"vol-{vol.id}" in thin_pool.lvs()
    att = stub.CreateAttachment(
        spb.CreateAttachmentRequest(volume_id=vol.id, connector=_connector()), timeout=120
    )
    ci = att.attachment.connection_info
    iqn = ci.iscsi.paths[0].target_iqn
    assert (LIO_ISCSI / iqn).is_dir()
    chap = ci.iscsi.chap
    # wrong secret: refused (by a libiscsi login: tests/host/libiscsi.py says why not the kernel's)
    wrong = libiscsi.url(ci.iscsi.paths[0], chap.username, "wrong-secret-16c")
    assert "Authentication failure" in libiscsi.refused(initiator_name(), wrong)
    try:
        # right secret on both portals: two disks with the announced identity, one multipath map
        disks = []
        for path in ci.iscsi.paths:
            _node_chap(iqn, path.portal, chap.username, chap.password)
            kernel.login(iqn, path.portal)
            disks.append(kernel.disk_for(path.portal, iqn, path.lun))
        settle()
        for disk in disks:
            assert kernel.sysfs_wwid(disk) == f"naa.{ci.wwn}"
        mpath = wait_until("multipath map", lambda: kernel.map_for(f"3{ci.wwn}"), 60)
        device = Path("/dev/mapper") / mpath
        pattern = os.urandom(MIB)
        (tmp_path / "p").write_bytes(pattern)
        run(
            [
                "dd",
                f"if={tmp_path / 'p'}",
                f"of={device}",
                "bs=1M",
                "seek=3",
                "oflag=direct",
                "conv=fsync,notrunc",
                "status=none",
            ]
        )
        run(
            [
                "dd",
                f"if={device}",
                f"of={tmp_path / 'b'}",
                "bs=1M",
                "skip=3",
                "count=1",
                "iflag=direct",
                "status=none",
            ]
        )
        assert (tmp_path / "b").read_bytes() == pattern
        kernel.flush_map(mpath)  # settles, then retries while udev's probe holds the map ("map in use")
    finally:
        _forget(iqn)
    stub.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=att.attachment.id), timeout=120)
    assert not (LIO_ISCSI / iqn).exists()
    assert not any(p.name == f"bw-{vol.id}" for p in (CONFIGFS / "target" / "core").glob("*/*"))
    stub.DeleteVolume(spb.DeleteVolumeRequest(volume_id=vol.id), timeout=120)
    assert f"vol-{vol.id}" not in thin_pool.lvs()


def test_an_initiator_outside_the_acl_is_refused(storaged: Daemon) -> None:
    """Another initiator, even with the right CHAP secret, is refused on every portal; this host's is
    accepted. (libiscsi logins: tests/host/libiscsi.py says why refused ones stay out of the kernel.)"""
    stub = storage_stub(storaged)
    vol = stub.CreateVolume(spb.CreateVolumeRequest(name="g2", size_bytes=16 * MIB), timeout=120).volume
    connector = _connector()
    request = spb.CreateAttachmentRequest(volume_id=vol.id, connector=connector)
    att = stub.CreateAttachment(request, timeout=120)
    ci = att.attachment.connection_info
    chap = ci.iscsi.chap
    for path in ci.iscsi.paths:
        url = libiscsi.url(path, chap.username, chap.password)
        libiscsi.refused("iqn.2026-01.io.blockwire.test:stranger", url)
        libiscsi.accepted(connector.initiator_iqn, url)
    stub.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=att.attachment.id), timeout=120)
    stub.DeleteVolume(spb.DeleteVolumeRequest(volume_id=vol.id), timeout=120)


def test_thin_snapshot_and_a_volume_from_it(storaged: Daemon, thin_pool: ThinPool) -> None:
    stub = storage_stub(storaged)
    vol = stub.CreateVolume(spb.CreateVolumeRequest(name="g3", size_bytes=16 * MIB), timeout=120).volume
    snap = stub.CreateSnapshot(spb.CreateSnapshotRequest(volume_id=vol.id, name="g3s"), timeout=120).snapshot
    copy = stub.CreateVolume(
        spb.CreateVolumeRequest(name="g3c", size_bytes=32 * MIB, source_snapshot_id=snap.id), timeout=120
    ).volume
    states = [
        m.volume.state for m in stub.WatchVolume(spb.WatchVolumeRequest(volume_id=copy.id), timeout=120)
    ]
    assert states[-1] == pb.VOLUME_STATE_AVAILABLE
    assert {f"vol-{vol.id}", f"snap-{snap.id}", f"vol-{copy.id}"} <= set(thin_pool.lvs())
    stub.DeleteVolume(
        spb.DeleteVolumeRequest(volume_id=vol.id), timeout=120
    )  # thin snapshots do not depend on it
    stub.DeleteSnapshot(spb.DeleteSnapshotRequest(snapshot_id=snap.id), timeout=120)
    stub.DeleteVolume(spb.DeleteVolumeRequest(volume_id=copy.id), timeout=120)
    assert not {f"vol-{vol.id}", f"snap-{snap.id}", f"vol-{copy.id}"} & set(thin_pool.lvs())


def test_a_restarted_service_rebuilds_an_export_lio_lost(storaged: Daemon, prefix: str) -> None:
    stub = storage_stub(storaged)
    vol = stub.CreateVolume(spb.CreateVolumeRequest(name="g4", size_bytes=16 * MIB), timeout=120).volume
    att = stub.CreateAttachment(
        spb.CreateAttachmentRequest(volume_id=vol.id, connector=_connector()), timeout=120
    )
    iqn = att.attachment.connection_info.iscsi.paths[0].target_iqn
    storaged.stop()
    _delete_lio_target(iqn)  # what a reboot without saved LIO configuration does
    assert not (LIO_ISCSI / iqn).exists()
    stray = f"{prefix}:{'e' * 32}"
    import rtslib_fb  # noqa: PLC0415

    rtslib_fb.Target(rtslib_fb.FabricModule("iscsi"), stray)
    storaged.start()
    assert (LIO_ISCSI / iqn).is_dir()
    assert not (LIO_ISCSI / stray).exists()
    acls = [p.name for p in (LIO_ISCSI / iqn / "tpgt_1" / "acls").iterdir()]
    assert acls == [initiator_name()]
    stub = storage_stub(storaged)
    stub.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=att.attachment.id), timeout=120)
    stub.DeleteVolume(spb.DeleteVolumeRequest(volume_id=vol.id), timeout=120)
