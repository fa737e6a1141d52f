"""The RBD connectors (hostagent.connectors.rbd) on fakes: the CephProbe seam, the hypervisor's secrets,
a sysfs tree and a runner. The real cluster is tests/host/test_rbd_attach.py's."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from blockwire.errors import (
    FailedPrecondition,
    IdentityMismatch,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from blockwire.model import ConnectionInfo, Connector, RbdConnection, Transport
from blockwire.runtime.failpoints import Failpoints
from blockwire.secret import Secret
from hostagent.api import HostAgent
from hostagent.config import config_from_mapping
from hostagent.connectors.rbd import KernelRbdConnector, QemuRbdConnector, secret_usage
from hostagent.events import EventBus
from hostagent.host.ceph import CephAccess, mon_host
from hostagent.host.sysfs import Sysfs
from hostagent.host.udev import UdevDevice
from hostagent.hostinfo import HostFiles, build_connector, rbd_available
from hostagent.journal import Journal
from hostagent.model import AttachmentState, ConnectorKind, JournalRecord
from hostagent.virt.diskxml import DiskSpec, NetworkSource, disk_xml, parse_disk
from hostagent.virt.sources import disk_source
from tests.fakes.ceph import FSID, FakeCeph
from tests.fakes.clock import FakeClock
from tests.fakes.executor import FakeRunner, Reply
from tests.fakes.hypervisor import FakeHypervisor
from tests.fakes.storage_api import FakeStorage
from tests.fakes.udev import FakeUdev

KEY = "AQBUDCtnAAAAABAAd2GrbV3R1lXo7h9SWzr3iA=="
OTHER_KEY = "AQBUDCtnAAAAABAAbbbbbbbbbbbbbbbbbbbbbb=="
IMAGE_ID = "10a2b3c4d5e6"
MONS = ("127.0.0.1:6789", "127.0.0.2:6789")
GOLDEN = Path(__file__).resolve().parents[2] / "data" / "diskxml"


def rbd_info(
    volume_id: str = "vol-1", *, image_id: str = IMAGE_ID, key: str = KEY, fsid: str = ""
) -> ConnectionInfo:
    return ConnectionInfo(
        transport=RbdConnection(
            pool="rbd",
            image=f"volume-{volume_id}",
            monitors=MONS,
            user="blockwire",
            key=Secret(key),
            image_id=image_id,
            cluster_fsid=fsid,
        ),
        volume_id=volume_id,
        attachment_id="att-1",
        size_bytes=1 << 30,
    )


@pytest.fixture
def ceph() -> FakeCeph:
    c = FakeCeph(keys={"blockwire": KEY})
    c.add("rbd", "volume-vol-1", IMAGE_ID)
    return c


@pytest.fixture
def hv() -> FakeHypervisor:
    h = FakeHypervisor()
    h.add_domain("vm1")
    return h


def test_validate_needs_the_image_id_and_monitors(hv: FakeHypervisor, ceph: FakeCeph) -> None:
    conn = QemuRbdConnector(hv, ceph)
    conn.validate(rbd_info())
    with pytest.raises(InvalidArgument, match="image_id"):
        conn.validate(rbd_info(image_id=""))
    info = rbd_info()
    with pytest.raises(InvalidArgument, match="monitors"):
        conn.validate(replace(info, transport=replace(info.transport, monitors=())))  # type: ignore[type-var]
    with pytest.raises(InvalidArgument, match="image_id"):
        conn.validate(rbd_info(image_id="not-hex!"))
    assert ceph.calls == []  # no I/O


def test_connect_verifies_then_defines_a_private_secret(hv: FakeHypervisor, ceph: FakeCeph) -> None:
    conn = QemuRbdConnector(hv, ceph, timeout=7)
    dev = conn.connect(rbd_info(fsid=FSID))
    assert ceph.calls == [("rbd", "volume-vol-1", 7)]
    assert dev.network is not None
    assert dev.network.protocol == "rbd"
    assert dev.network.name == "rbd/volume-vol-1"
    assert dev.network.hosts == (("127.0.0.1", 6789), ("127.0.0.2", 6789))
    assert dev.network.auth is not None
    assert dev.network.auth.username == "blockwire"
    assert dev.network.auth.secret_type == "ceph"
    assert dev.size_bytes == 1 << 30
    assert dev.path == ""
    assert hv.secrets[(secret_usage(rbd_info()), "ceph")].reveal() == KEY
    # a repeat returns the same device and keeps one secret
    assert conn.connect(rbd_info()) == dev
    assert len(hv.secrets) == 1
    conn.disconnect(rbd_info())
    assert hv.secrets == {}
    conn.disconnect(rbd_info())  # a repeat is quiet


@pytest.mark.parametrize(
    ("info", "error", "message"),
    [
        (rbd_info(image_id="99ff"), IdentityMismatch, "re-created"),
        (rbd_info(fsid="00000000-0000-4000-8000-000000000000"), IdentityMismatch, "cluster"),
        (rbd_info("vol-2"), IdentityMismatch, "does not exist"),
        (rbd_info(key=OTHER_KEY), PermissionDenied, "refused"),
    ],
)
def test_wrong_identity_or_key_attaches_nothing(
    hv: FakeHypervisor, ceph: FakeCeph, info: ConnectionInfo, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        QemuRbdConnector(hv, ceph).connect(info)
    assert hv.secrets == {}


def test_a_cluster_that_does_not_answer_is_unavailable(hv: FakeHypervisor, ceph: FakeCeph) -> None:
    ceph.down = True
    with pytest.raises(Unavailable):
        QemuRbdConnector(hv, ceph).connect(rbd_info())
    assert hv.secrets == {}


def test_extend_reads_the_size_and_rechecks_the_identity(hv: FakeHypervisor, ceph: FakeCeph) -> None:
    conn = QemuRbdConnector(hv, ceph)
    ceph.add("rbd", "volume-vol-1", IMAGE_ID, 2 << 30)
    assert conn.extend(rbd_info()) == 2 << 30
    ceph.add("rbd", "volume-vol-1", "77aa", 4 << 30)  # re-created: its size is not ours to report
    with pytest.raises(IdentityMismatch):
        conn.extend(rbd_info())


def test_sweep_removes_only_orphaned_ceph_secrets(hv: FakeHypervisor, ceph: FakeCeph) -> None:
    conn = QemuRbdConnector(hv, ceph)
    conn.connect(rbd_info())
    orphan = replace(rbd_info("vol-2"), attachment_id="att-9")
    hv.define_secret(secret_usage(orphan), "ceph", Secret(KEY))
    hv.define_secret("blockwire/vol-3/att-3", "iscsi", Secret("chap-password"))  # not a ceph secret
    hv.define_secret("someone-else/x", "ceph", Secret(KEY))  # not ours
    assert conn.sweep([rbd_info()]) == [f"libvirt secret {secret_usage(orphan)}"]
    assert set(hv.secrets) == {
        (secret_usage(rbd_info()), "ceph"),
        ("blockwire/vol-3/att-3", "iscsi"),
        ("someone-else/x", "ceph"),
    }


def test_disk_xml_of_an_rbd_device_is_the_golden_file_and_round_trips(
    hv: FakeHypervisor, ceph: FakeCeph
) -> None:
    dev = QemuRbdConnector(hv, ceph).connect(rbd_info())
    spec = DiskSpec(source=disk_source(dev), target_dev="sdb", serial="vol-1")
    text = disk_xml(spec)
    path = GOLDEN / "network_rbd_cephx_usage.xml"
    if os.environ.get("BLOCKWIRE_REGEN_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()
    assert parse_disk(text) == spec
    assert isinstance(spec.source, NetworkSource)
    assert spec.source.auth is not None
    assert KEY not in text  # the key is in the secret, never in the XML


# -- through the api ------------------------------------------------------------------------------
def agent(tmp_path: Path, hv: FakeHypervisor, ceph: FakeCeph, storage: FakeStorage) -> HostAgent:
    return HostAgent(
        hypervisor=hv,
        connectors={Transport.RBD: QemuRbdConnector(hv, ceph)},
        journal=Journal(tmp_path / "state"),
        connector=Connector(host="host-a", transports=(Transport.RBD,)),
        clock=FakeClock(),
        storage=storage,
        events=EventBus(),
        failpoints=Failpoints(),
    )


def test_attach_extend_detach_through_the_api(tmp_path: Path, hv: FakeHypervisor, ceph: FakeCeph) -> None:
    storage = FakeStorage(infos={"vol-1": rbd_info()})
    ag = agent(tmp_path, hv, ceph, storage)
    a = ag.attach("vm1", volume_id="vol-1")  # no wwn: the image id is the identity
    assert a.state is AttachmentState.ATTACHED
    assert a.connector_kind is ConnectorKind.RBD_QEMU
    (spec,) = hv.disks_by_domain["vm1"]
    assert isinstance(spec.source, NetworkSource)
    assert spec.source.protocol == "rbd"
    ceph.add("rbd", "volume-vol-1", IMAGE_ID, 2 << 30)
    assert ag.extend("vol-1", 2 << 30) == 2 << 30
    assert hv.resized == [("vm1", a.target_dev, 2 << 30)]
    assert ag.detach("vm1", "vol-1") is True
    assert hv.secrets == {}
    assert storage.exports == {}
    assert ag.journal.all() == []


def test_a_recreated_image_is_refused_and_nothing_is_left(
    tmp_path: Path, hv: FakeHypervisor, ceph: FakeCeph
) -> None:
    storage = FakeStorage(infos={"vol-1": rbd_info(image_id="abcdef")})
    ag = agent(tmp_path, hv, ceph, storage)
    with pytest.raises(IdentityMismatch):
        ag.attach("vm1", volume_id="vol-1")
    assert hv.secrets == {}
    assert storage.exports == {}
    assert ag.journal.all() == []
    assert hv.disks_by_domain["vm1"] == []


def test_reconcile_rolls_back_a_connect_and_sweeps_the_secret(
    tmp_path: Path, hv: FakeHypervisor, ceph: FakeCeph
) -> None:
    storage = FakeStorage(infos={"vol-1": rbd_info()})
    ag = agent(tmp_path, hv, ceph, storage)
    # crash after connect, before the hot-plug: the secret exists, the record says ATTACHING
    sa = storage.create_attachment("vol-1", ag.connector, JournalRecord.access_mode, "vm1")
    info = sa.connection_info
    QemuRbdConnector(hv, ceph).connect(info)
    ag.journal.put(
        JournalRecord(
            volume_id="vol-1",
            domain="vm1",
            domain_uuid=hv.lookup("vm1").uuid,
            state=AttachmentState.ATTACHING,
            connection_info=info,
            attachment_id=sa.id,
            connector_kind=ConnectorKind.RBD_QEMU,
            owns_export=True,
            serial="vol-1",
        )
    )
    # and a secret of an attachment nobody recorded
    hv.define_secret("blockwire/vol-7/att-7", "ceph", Secret(KEY))
    actions = ag.reconcile()
    assert [(x.volume_id, x.action) for x in actions] == [
        ("vol-1", "rolled back"),
        ("", "swept"),
    ]
    assert hv.secrets == {}
    assert storage.exports == {}
    assert ag.journal.all() == []


def test_config_rbd_mode() -> None:
    assert config_from_mapping({}).rbd_mode == "qemu"
    assert config_from_mapping({"rbd_mode": "kernel"}).rbd_mode == "kernel"
    with pytest.raises(InvalidArgument, match="rbd_mode"):
        config_from_mapping({"rbd_mode": "krbd"})
    with pytest.raises(InvalidArgument, match="rbd_timeout"):
        config_from_mapping({"rbd_timeout": 0.0})


# -- kernel -----------------------------------------------------------------------------------------
class FakeOpeners:
    def __init__(self) -> None:
        self.held: dict[str, list[str]] = {}

    def users(self, devs: object) -> dict[str, list[str]]:
        return {d: v for d, v in self.held.items() if d in devs}  # type: ignore[operator]


class KernelRig:
    """A sysfs tree the fake `rbd device map` adds mappings to, and udev's view of /dev/rbdN."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "sys"
        (self.root / "bus/rbd/devices").mkdir(parents=True)
        self.udev = FakeUdev()
        self.openers = FakeOpeners()
        self.keys = tmp_path / "keys"
        self.keyfiles: list[tuple[str, int, str]] = []
        self.next_image_id = IMAGE_ID
        self.runner = FakeRunner().on(r"^rbd device map", self._map).on(r"^rbd device unmap", self._unmap)
        self.conn = KernelRbdConnector(
            self.runner,
            Sysfs(self.root),
            self.udev,
            FakeClock(),
            openers=self.openers,
            keyfile_dir=str(self.keys),
            device_timeout=5,
        )

    def _map(self, argv: tuple[str, ...]) -> Reply:
        keyfile = argv[argv.index("--keyfile") + 1]
        self.keyfiles.append((keyfile, stat.S_IMODE(os.stat(keyfile).st_mode), Path(keyfile).read_text()))
        dev_id = len(list((self.root / "bus/rbd/devices").iterdir()))
        _pool, _, image = argv[3].partition("/")
        self.map_device(dev_id, image, self.next_image_id)
        return Reply(stdout=f"/dev/rbd{dev_id}\n")

    def _unmap(self, argv: tuple[str, ...]) -> Reply:
        dev_id = argv[-1].removeprefix("/dev/rbd")
        for f in (self.root / "bus/rbd/devices" / dev_id).iterdir():
            f.unlink()
        (self.root / "bus/rbd/devices" / dev_id).rmdir()
        self.udev.remove(f"rbd{dev_id}")
        return Reply()

    def map_device(self, dev_id: int, image: str, image_id: str, size: int = 1 << 30) -> None:
        d = self.root / "bus/rbd/devices" / str(dev_id)
        d.mkdir()
        for name, value in (
            ("pool", "rbd"),
            ("name", image),
            ("image_id", image_id),
            ("current_snap", "-"),
            ("cluster_fsid", FSID),
        ):
            (d / name).write_text(value + "\n")
        b = self.root / "block" / f"rbd{dev_id}"
        b.mkdir(parents=True, exist_ok=True)
        (b / "size").write_text(str(size // 512) + "\n")
        (b / "dev").write_text(f"252:{dev_id * 16}\n")
        self.udev.add(UdevDevice(f"rbd{dev_id}", device_node=f"/dev/rbd{dev_id}", size_bytes=size))


def test_kernel_map_verifies_sysfs_identity_and_keeps_the_key_off_argv(tmp_path: Path) -> None:
    k = KernelRig(tmp_path)
    dev = k.conn.connect(rbd_info())
    assert dev.path == "/dev/rbd0"
    assert dev.network is None
    assert dev.size_bytes == 1 << 30
    ((keyfile, mode, content),) = k.keyfiles
    assert mode == 0o600
    assert content == KEY
    assert not Path(keyfile).exists()  # removed right after the map
    assert all(KEY not in " ".join(c) for c in k.runner.revealed)
    # a repeat finds the mapping and maps nothing again
    assert k.conn.connect(rbd_info()) == dev
    assert len(k.runner.ran("device map")) == 1
    assert k.conn.paths(rbd_info()) == ["rbd0"]
    k.conn.disconnect(rbd_info())
    assert k.runner.ran("device unmap") == [("rbd", "device", "unmap", "/dev/rbd0")]
    assert k.conn.paths(rbd_info()) == []
    k.conn.disconnect(rbd_info())  # a repeat is quiet
    assert len(k.runner.ran("device unmap")) == 1


def test_kernel_map_of_a_recreated_image_is_unmapped_and_refused(tmp_path: Path) -> None:
    k = KernelRig(tmp_path)
    k.next_image_id = "feedbeef"
    with pytest.raises(IdentityMismatch, match="re-created"):
        k.conn.connect(rbd_info())
    assert list((k.root / "bus/rbd/devices").iterdir()) == []


def test_kernel_unmap_leaves_another_images_mapping_and_a_held_device(tmp_path: Path) -> None:
    k = KernelRig(tmp_path)
    k.map_device(0, "volume-vol-1", "0ld1d")  # the same name, another image (not ours)
    k.conn.disconnect(rbd_info())
    assert k.runner.ran("device unmap") == []
    k.conn.connect(rbd_info())  # maps ours as rbd1
    k.openers.held["/dev/rbd1"] = ["process 42 (qemu) holds it open"]
    with pytest.raises(FailedPrecondition, match="held open"):
        k.conn.disconnect(rbd_info())
    assert k.runner.ran("device unmap") == []


def test_kernel_wrong_key_is_permission_denied(tmp_path: Path) -> None:
    k = KernelRig(tmp_path)
    k.runner.on(r"^rbd device map", Reply(returncode=13, stderr="rbd: map failed: (13) Permission denied"))
    with pytest.raises(PermissionDenied):
        k.conn.connect(rbd_info())
    assert list(k.keys.iterdir()) == []


def test_the_connector_announces_rbd_only_when_the_host_can(tmp_path: Path) -> None:
    sysfs = Sysfs(tmp_path / "sys")
    files = HostFiles(
        str(tmp_path / "state"), str(tmp_path / "none"), str(tmp_path / "none"), str(tmp_path / "n")
    )
    assert Transport.RBD in build_connector(sysfs, files, kernel_iscsi=False, rbd=True).transports
    assert Transport.RBD not in build_connector(sysfs, files, kernel_iscsi=False, rbd=False).transports
    assert not rbd_available(sysfs, "kernel")  # no /sys/bus/rbd: no rbd module loaded


def test_monitors_are_named_with_their_messenger() -> None:
    assert mon_host(("127.0.0.1:6789", "10.0.0.2:3300", "v2:10.0.0.3:3301")) == (
        "v1:127.0.0.1:6789,v2:10.0.0.2:3300,v2:10.0.0.3:3301"
    )


def test_the_probes_access_never_shows_the_key() -> None:
    assert KEY not in repr(CephAccess(MONS, "blockwire", Secret(KEY)))


def test_the_doctor_lists_unused_ceph_secrets_and_fixes_them(hv: FakeHypervisor, ceph: FakeCeph) -> None:
    conn = QemuRbdConnector(hv, ceph)
    conn.connect(rbd_info("vol-1"))
    hv.define_secret("blockwire/vol-9/att-9", "ceph", Secret(KEY))
    (finding,) = conn.audit([rbd_info("vol-1")])
    assert (finding.kind, finding.name, finding.fixable, finding.volume_id) == (
        "libvirt_secret",
        "blockwire/vol-9/att-9",
        True,
        "vol-9",
    )
    assert conn.fix(finding)
    assert ("blockwire/vol-9/att-9", "ceph") not in hv.secrets
    assert (secret_usage(rbd_info("vol-1")), "ceph") in hv.secrets
    assert not conn.fix(finding)  # gone already


def test_the_doctor_lists_kernel_mappings_no_record_announces_and_never_unmaps(tmp_path: Path) -> None:
    rig = KernelRig(tmp_path)
    rig.conn.connect(rbd_info("vol-1"))
    (mapped,) = rig.conn.paths(rbd_info("vol-1"))
    assert rig.conn.audit([rbd_info("vol-1")]) == []
    (finding,) = rig.conn.audit([])
    assert (finding.kind, finding.name, finding.fixable) == ("rbd_mapping", f"/dev/{mapped}", False)
    assert "rbd/volume-vol-1" in finding.detail
    assert not rig.conn.fix(finding)
    assert rig.conn.paths(rbd_info("vol-1")) == [mapped]
