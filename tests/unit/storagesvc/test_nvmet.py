"""The nvmet exporter on a temporary directory that behaves like /sys/kernel/config/nvmet
(tests/fakes/nvmet.py; the real kernel target runs in the guest tier, tests/guest/inside/
test_storage_nvmet.py), alone and behind the storage service: what it makes for an export, that it
admits host NQNs only, DH-HMAC-CHAP per host, resize, the listing the export checks read, that removal
leaves nothing, and the connection info storage announces for an NVMe exporter."""

from __future__ import annotations

import base64
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockwire import validate
from blockwire.errors import FailedPrecondition, InvalidArgument, Unavailable
from blockwire.model import AccessMode, Connector, NvmeofConnection, Transport
from blockwire.runtime.executor import Executor
from storagesvc import identity
from storagesvc.backends.file import FileBackend
from storagesvc.catalog.sqlite import SqliteCatalog
from storagesvc.config import ConfigError, parse
from storagesvc.model import MIB, CreateVolumeSpec
from storagesvc.service import Pool, StorageService
from storagesvc.targets.base import TargetSpec, transport_of
from storagesvc.targets.nvmet import NvmetExporter, dhchap_secret
from tests.fakes.clock import FakeClock
from tests.fakes.jobs import InlineJobs
from tests.fakes.nvmet import FakeNvmetConfigfs

NQN_PREFIX = "nqn.2026-01.io.blockwire.unit"
PORTALS = ("127.0.0.1:4420", "127.0.0.2:4420")
HOST_A = "nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427"
HOST_B = "nqn.2014-08.org.nvmexpress:uuid:6f1c0a4e-9d2b-4c1e-8a77-3e5d2c1b0a99"
VID = "25e941a845244c3b8dcb3c072a9d5c94"


def nvme_connector(host: str, nqn: str = HOST_A) -> Connector:
    return Connector(host=host, nvme_host_nqn=nqn, nvme_host_id=nqn.rsplit(":", 1)[1])


class Rig:
    def __init__(self, root: Path, *, auth: bool = True, dhchap: bool = True) -> None:
        self.fs = FakeNvmetConfigfs(root / "nvmet", auth=auth)
        self.exporter = NvmetExporter(
            PORTALS,
            nqn_prefix=NQN_PREFIX,
            dhchap=dhchap,
            dhchap_key_file=root / "dhchap.key",
            root=root / "nvmet",
            configfs=self.fs,
        )
        self.root = root / "nvmet"
        self.backend = FileBackend("file", root / "file", Executor())
        self.catalog = SqliteCatalog(root / "c.db")
        self.service = StorageService(
            self.catalog,
            {"file": Pool(self.backend, self.exporter, "nvmet")},
            FakeClock(),
            InlineJobs(),
            iqn_prefix="iqn.2026-01.io.blockwire.unit",
            lock_timeout=0.2,
        )

    def spec(self, device: Path, vid: str = VID) -> TargetSpec:
        device.write_bytes(b"\0" * 4096)
        return TargetSpec(
            volume_id=vid,
            target_iqn=identity.subsystem_nqn(NQN_PREFIX, vid),
            device_path=str(device),
            wwn=identity.wwn_for(vid, "001405"),
            serial=identity.serial_for(vid),
            readonly=False,
            nguid=identity.namespace_nguid(vid, "001405"),
            uuid=identity.namespace_uuid(vid),
        )

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text().strip()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    r.service.reconcile()
    yield r
    r.catalog.close()


# -- identity


def test_the_namespace_identity_is_derived_from_the_volume_id() -> None:
    assert identity.namespace_uuid(VID) == "25e941a8-4524-4c3b-8dcb-3c072a9d5c94"
    assert identity.namespace_nguid(VID, "001405") == "25e941a845244c3b" + "001405" + "8dcb3c072a"
    assert identity.namespace_nguid(VID, "abcdef")[16:22] == "abcdef"
    assert identity.subsystem_nqn(NQN_PREFIX, VID) == f"{NQN_PREFIX}:{VID}"
    with pytest.raises(ValueError, match="not 32 hex digits"):
        identity.namespace_uuid("v1")


def test_dhchap_secrets_are_what_nvme_cli_and_the_kernel_take() -> None:
    key = bytes(range(32))
    secret = dhchap_secret(key).reveal()
    assert validate.DHCHAP_SECRET_RE.fullmatch(secret)
    body = base64.b64decode(secret.split(":")[2])
    assert body[:32] == key
    assert int.from_bytes(body[32:], "little") == zlib.crc32(key)
    assert repr(dhchap_secret(key)) == "Secret(********)"


# -- the exporter alone


def test_an_export_is_a_subsystem_with_namespace_1_on_every_port(rig: Rig, tmp_path: Path) -> None:
    spec = rig.spec(tmp_path / "dev")
    rig.exporter.ensure_target(spec)
    sub = f"subsystems/{spec.target_iqn}"
    assert rig.read(f"{sub}/attr_allow_any_host") == "0"
    assert rig.read(f"{sub}/attr_serial") == spec.serial
    assert rig.read(f"{sub}/namespaces/1/device_path") == spec.device_path
    assert rig.read(f"{sub}/namespaces/1/device_nguid").replace("-", "") == spec.nguid
    assert rig.read(f"{sub}/namespaces/1/device_uuid") == spec.uuid
    assert rig.read(f"{sub}/namespaces/1/enable") == "1"
    assert list((rig.root / sub / "allowed_hosts").iterdir()) == []  # nobody admitted yet
    ports = {rig.read(f"ports/{p.name}/addr_traddr"): p for p in (rig.root / "ports").iterdir()}
    assert sorted(ports) == ["127.0.0.1", "127.0.0.2"]
    for port in ports.values():
        assert (port / "subsystems" / spec.target_iqn).is_symlink()
        assert (port / "addr_trtype").read_text().strip() == "tcp"
        assert (port / "addr_trsvcid").read_text().strip() == "4420"
        assert (port / "ana_groups/1/ana_state").read_text().strip() == "optimized"
    writes = len(rig.fs.writes)
    rig.exporter.ensure_target(spec)  # repeat: nothing to change, nothing written
    assert len(rig.fs.writes) == writes


def test_ports_are_found_by_address_and_others_left_alone(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    other = r.root / "ports" / "7"
    r.fs.mkdir(other)
    for attr, value in (("addr_trtype", "tcp"), ("addr_traddr", "127.0.0.2"), ("addr_trsvcid", "4420")):
        r.fs.write(other / attr, value)
    foreign = r.root / "ports" / "1"
    r.fs.mkdir(foreign)
    for attr, value in (("addr_trtype", "tcp"), ("addr_traddr", "10.0.0.9"), ("addr_trsvcid", "4420")):
        r.fs.write(foreign / attr, value)
    r.exporter.start()
    assert sorted(p.name for p in (r.root / "ports").iterdir()) == ["1", "2", "7"]
    assert r.read("ports/2/addr_traddr") == "127.0.0.1"  # the lowest free id
    assert r.read("ports/1/addr_traddr") == "10.0.0.9"
    spec = r.spec(tmp_path / "dev")
    r.exporter.ensure_target(spec)
    assert not (foreign / "subsystems" / spec.target_iqn).exists()
    assert (other / "subsystems" / spec.target_iqn).is_symlink()


def test_hosts_are_admitted_by_host_nqn_with_their_own_secrets(rig: Rig, tmp_path: Path) -> None:
    spec = rig.spec(tmp_path / "dev")
    rig.exporter.ensure_target(spec)
    rig.exporter.allow(spec, HOST_A)
    rig.exporter.allow(spec, HOST_A)  # repeat
    rig.exporter.allow(spec, HOST_B)
    sub = rig.root / "subsystems" / spec.target_iqn
    assert sorted(p.name for p in (sub / "allowed_hosts").iterdir()) == sorted([HOST_A, HOST_B])
    host_a, ctrl_a = rig.exporter.host_secrets(HOST_A)
    host_b, _ = rig.exporter.host_secrets(HOST_B)
    assert host_a is not None
    assert ctrl_a is not None
    assert host_b is not None
    assert rig.read(f"hosts/{HOST_A}/dhchap_key") == host_a.reveal()
    assert rig.read(f"hosts/{HOST_A}/dhchap_ctrl_key") == ctrl_a.reveal()
    assert len({host_a.reveal(), ctrl_a.reveal(), host_b.reveal()}) == 3
    assert (tmp_path / "dhchap.key").stat().st_mode & 0o777 == 0o600
    # stable across exporter instances (a restart) that read the same seed
    again = NvmetExporter(PORTALS, nqn_prefix=NQN_PREFIX, dhchap_key_file=tmp_path / "dhchap.key")
    assert again.host_secrets(HOST_A)[0] == host_a
    rig.exporter.deny(spec.target_iqn, HOST_B)
    rig.exporter.deny(spec.target_iqn, HOST_B)  # repeat
    assert not (rig.root / "hosts" / HOST_B).exists()
    assert (rig.root / "hosts" / HOST_A).is_dir()


def test_a_host_entry_stays_while_another_subsystem_admits_it(rig: Rig, tmp_path: Path) -> None:
    one, two = rig.spec(tmp_path / "d1"), rig.spec(tmp_path / "d2", "b" * 32)
    for spec in (one, two):
        rig.exporter.ensure_target(spec)
        rig.exporter.allow(spec, HOST_A)
    rig.exporter.remove_target(one.target_iqn)
    assert (rig.root / "hosts" / HOST_A).is_dir()
    rig.exporter.remove_target(two.target_iqn)
    assert not (rig.root / "hosts" / HOST_A).exists()


def test_removal_leaves_nothing_but_the_ports(rig: Rig, tmp_path: Path) -> None:
    before = rig.fs.everything()
    spec = rig.spec(tmp_path / "dev")
    rig.exporter.ensure_target(spec)
    rig.exporter.allow(spec, HOST_A)
    rig.exporter.remove_target(spec.target_iqn)
    assert rig.fs.everything() == before
    rig.exporter.remove_target(spec.target_iqn)  # repeat: a missing subsystem is fine


def test_a_namespace_with_a_wrong_identity_or_backing_is_put_right(rig: Rig, tmp_path: Path) -> None:
    spec = rig.spec(tmp_path / "dev")
    rig.exporter.ensure_target(spec)
    ns = rig.root / "subsystems" / spec.target_iqn / "namespaces" / "1"
    rig.fs.write(ns / "enable", "0")
    rig.fs.write(ns / "device_nguid", "f" * 32)
    rig.fs.write(ns / "enable", "1")
    (state,) = rig.exporter.list_targets(NQN_PREFIX + ":")
    assert state.lun is not None
    assert "announces nguid ffffffff" in state.lun.differs(spec)
    rig.exporter.ensure_target(spec)
    (state,) = rig.exporter.list_targets(NQN_PREFIX + ":")
    assert state.lun is not None
    assert state.lun.differs(spec) == ""
    # unlinked from a port: the listing says so
    port = next(iter((rig.root / "ports").iterdir()))
    rig.fs.unlink(port / "subsystems" / spec.target_iqn)
    (state,) = rig.exporter.list_targets(NQN_PREFIX + ":")
    assert state.lun is not None
    assert state.lun.differs(spec) == "LUN 1 is offline"


def test_resize_asks_the_target_to_read_the_size_again(rig: Rig, tmp_path: Path) -> None:
    spec = rig.spec(tmp_path / "dev")
    rig.exporter.ensure_target(spec)
    rig.exporter.resize(spec)
    assert rig.fs.writes[-1] == (f"subsystems/{spec.target_iqn}/namespaces/1/revalidate_size", "1")
    rig.exporter.remove_target(spec.target_iqn)
    with pytest.raises(Unavailable, match="no enabled namespace"):
        rig.exporter.resize(spec)


def test_read_only_exports_are_refused(rig: Rig, tmp_path: Path) -> None:
    spec = rig.spec(tmp_path / "dev")
    with pytest.raises(FailedPrecondition, match="cannot export read-only"):
        rig.exporter.ensure_target(TargetSpec(**{**spec.__dict__, "readonly": True}))
    assert not (rig.root / "subsystems" / spec.target_iqn).exists()


def test_a_kernel_without_target_authentication_is_refused_with_dhchap_on(tmp_path: Path) -> None:
    r = Rig(tmp_path, auth=False)
    with pytest.raises(FailedPrecondition, match="set dhchap = false"):
        r.exporter.start()
    assert list((r.root / "hosts").iterdir()) == []  # the probe is gone
    off = Rig(tmp_path / "off", auth=False, dhchap=False)
    off.exporter.start()
    assert off.exporter.host_secrets(HOST_A) == (None, None)
    spec = off.spec(tmp_path / "dev")
    off.exporter.ensure_target(spec)
    off.exporter.allow(spec, HOST_A)
    assert (off.root / "subsystems" / spec.target_iqn / "allowed_hosts" / HOST_A).is_symlink()


def test_a_failed_export_undoes_itself(rig: Rig, tmp_path: Path) -> None:
    spec = rig.spec(tmp_path / "dev")
    missing = TargetSpec(**{**spec.__dict__, "device_path": str(tmp_path / "missing")})
    before = rig.fs.everything()
    with pytest.raises(Unavailable, match="exporting"):
        rig.exporter.ensure_target(missing)
    assert rig.fs.everything() == before


# -- behind the storage service


def test_an_nvme_attachment_announces_the_subsystem_namespace_and_host(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert transport_of(rig.exporter) is Transport.NVME_TCP
    vid = rig.service.create_volume(CreateVolumeSpec(name="v", size_bytes=4 * MIB)).id
    att = rig.service.create_attachment(vid, nvme_connector("a"), AccessMode.READ_WRITE)
    info = att.connection_info
    assert info is not None
    t = info.transport
    assert isinstance(t, NvmeofConnection)
    assert t.subsystem_nqn == identity.subsystem_nqn(NQN_PREFIX, vid)
    assert [p.address for p in t.portals] == list(PORTALS)
    assert (t.namespace_id, t.host_nqn) == (1, HOST_A)
    assert t.namespace_uuid == identity.namespace_uuid(vid)
    assert t.namespace_nguid == identity.namespace_nguid(vid, "001405")
    assert (t.dhchap_host_secret, t.dhchap_ctrl_secret) == rig.exporter.host_secrets(HOST_A)
    assert info.wwn == ""
    file_block = min(Path(rig.backend.device_path(vid)).stat().st_blksize, 4096)
    assert (info.logical_block_size, info.physical_block_size) == (file_block, file_block)
    assert info.serial == identity.serial_for(vid)
    assert rig.service.get_attachment(att.id).connection_info == info  # the catalog keeps it whole
    again = rig.service.create_attachment(vid, nvme_connector("a"), AccessMode.READ_WRITE)
    assert again.id == att.id  # repeat: the same attachment
    assert t.dhchap_host_secret is not None
    assert t.dhchap_host_secret.reveal() not in caplog.text
    rig.service.delete_attachment(att.id)
    assert list((rig.root / "subsystems").iterdir()) == []
    assert list((rig.root / "hosts").iterdir()) == []


def test_an_nvme_export_needs_a_host_nqn(rig: Rig) -> None:
    vid = rig.service.create_volume(CreateVolumeSpec(name="v", size_bytes=4 * MIB)).id
    iscsi_only = Connector(host="a", initiator_iqn="iqn.2026-01.io.example:a")
    with pytest.raises(InvalidArgument, match="nvme_host_nqn"):
        rig.service.create_attachment(vid, iscsi_only, AccessMode.READ_WRITE)
    bad_id = Connector(host="a", nvme_host_nqn=HOST_A, nvme_host_id="host-1")
    with pytest.raises(InvalidArgument, match="nvme_host_id"):
        rig.service.create_attachment(vid, bad_id, AccessMode.READ_WRITE)
    bad_nqn = Connector(host="a", nvme_host_nqn="host-1")
    with pytest.raises(InvalidArgument, match="not an NVMe name"):
        rig.service.create_attachment(vid, bad_nqn, AccessMode.READ_WRITE)
    wrong = Connector(host="a", nvme_host_nqn=HOST_A, transports=(Transport.ISCSI,))
    with pytest.raises(InvalidArgument, match="does not list nvme-tcp"):
        rig.service.create_attachment(vid, wrong, AccessMode.READ_WRITE)
    assert list((rig.root / "subsystems").iterdir()) == []
    assert rig.service.get_volume(vid).attachment_ids == ()


def test_a_multiattach_volume_admits_each_host_and_keeps_the_subsystem_for_the_last(rig: Rig) -> None:
    vid = rig.service.create_volume(CreateVolumeSpec(name="v", size_bytes=4 * MIB, multiattach=True)).id
    a = rig.service.create_attachment(vid, nvme_connector("a", HOST_A), AccessMode.READ_WRITE)
    b = rig.service.create_attachment(vid, nvme_connector("b", HOST_B), AccessMode.READ_WRITE)
    nqn = identity.subsystem_nqn(NQN_PREFIX, vid)
    allowed = rig.root / "subsystems" / nqn / "allowed_hosts"
    assert sorted(p.name for p in allowed.iterdir()) == sorted([HOST_A, HOST_B])
    rig.service.delete_attachment(a.id)
    assert [p.name for p in allowed.iterdir()] == [HOST_B]
    rig.service.delete_attachment(b.id)
    assert not (rig.root / "subsystems" / nqn).exists()


def test_the_export_checks_and_a_restart_rebuild_what_the_target_lost(rig: Rig, tmp_path: Path) -> None:
    vid = rig.service.create_volume(CreateVolumeSpec(name="v", size_bytes=4 * MIB)).id
    att = rig.service.create_attachment(vid, nvme_connector("a"), AccessMode.READ_WRITE)
    rig.service.complete_attachment(att.id)
    nqn = identity.subsystem_nqn(NQN_PREFIX, vid)
    whole = rig.fs.everything()
    rig.exporter.deny(nqn, HOST_A)  # the host lost from the subsystem
    assert rig.service.repair_exports() == [vid]
    assert rig.fs.everything() == whole
    rig.exporter.remove_target(nqn)  # everything lost (a reboot of the storage host)
    stray = identity.subsystem_nqn(NQN_PREFIX, "e" * 32)
    rig.fs.mkdir(rig.root / "subsystems" / stray)
    rig.service.reconcile()
    assert rig.fs.everything() == whole  # rebuilt, and the stray subsystem under our prefix removed
    assert rig.service.repair_exports() == []


def test_extend_of_an_attached_volume_reaches_the_namespace(rig: Rig) -> None:
    vid = rig.service.create_volume(CreateVolumeSpec(name="v", size_bytes=4 * MIB)).id
    rig.service.create_attachment(vid, nvme_connector("a"), AccessMode.READ_WRITE)
    rig.service.extend_volume(vid, 8 * MIB)
    nqn = identity.subsystem_nqn(NQN_PREFIX, vid)
    assert rig.fs.writes[-1] == (f"subsystems/{nqn}/namespaces/1/revalidate_size", "1")


# -- config


def _config(exporter: str) -> dict[str, object]:
    import tomllib  # noqa: PLC0415

    return tomllib.loads(
        '[[backends]]\nname = "f"\nkind = "file"\npath = "/tmp/x"\nexporter = "nv"\n' + exporter
    )


def test_the_nvmet_exporter_config() -> None:
    cfg = parse(
        _config(
            '[exporters.nv]\nkind = "nvmet"\nportals = ["127.0.0.1:4420"]\n'
            'nqn_prefix = "nqn.2026-01.com.example.storage"\ndhchap = false\n'
        )
    )
    nv = cfg.exporters["nv"]
    assert (nv.kind, nv.nqn_prefix, nv.dhchap, nv.dhchap_bidirectional) == (
        "nvmet",
        "nqn.2026-01.com.example.storage",
        False,
        True,
    )
    with pytest.raises(ConfigError, match="nqn_prefix"):
        parse(_config('[exporters.nv]\nkind = "nvmet"\nportals = ["127.0.0.1:4420"]\nnqn_prefix = "iqn.x"\n'))


# -- live migration


def test_a_migration_admits_the_destination_host_nqn_beside_the_source_then_only_one(rig: Rig) -> None:
    """CreateMigrationAttachment of an nvmet volume: the destination host (an NVMe-only connector: no
    initiator IQN) is admitted beside the source with its own DH-HMAC-CHAP secrets; CompleteMigration
    removes the source's allowed host (and its host entry), RollbackMigration only the destination's."""
    vid = rig.service.create_volume(CreateVolumeSpec(name="v", size_bytes=4 * MIB)).id
    nqn = identity.subsystem_nqn(NQN_PREFIX, vid)
    allowed = rig.root / "subsystems" / nqn / "allowed_hosts"
    a = nvme_connector("a", HOST_A)
    b = Connector(host="b", nvme_host_nqn=HOST_B, transports=(Transport.NVME_TCP,))
    src = rig.service.create_attachment(vid, a, AccessMode.READ_WRITE, "vm1")
    rig.service.complete_attachment(src.id)

    dest = rig.service.create_migration_attachment(src.id, b)
    t = dest.connection_info.transport if dest.connection_info else None
    assert isinstance(t, NvmeofConnection)
    assert (t.subsystem_nqn, t.namespace_id, t.host_nqn) == (nqn, 1, HOST_B)
    assert (t.dhchap_host_secret, t.dhchap_ctrl_secret) == rig.exporter.host_secrets(HOST_B)
    assert t.dhchap_host_secret != rig.exporter.host_secrets(HOST_A)[0]
    assert sorted(p.name for p in allowed.iterdir()) == sorted([HOST_A, HOST_B])
    assert rig.service.create_migration_attachment(src.id, b).id == dest.id  # a repeat
    # another host NQN on the same host name is no repeat: one migration a volume
    with pytest.raises(FailedPrecondition, match="already being migrated"):
        rig.service.create_migration_attachment(src.id, nvme_connector("b", HOST_A.replace("1b4e", "2b4e")))

    rig.service.rollback_migration(dest.id)
    assert [p.name for p in allowed.iterdir()] == [HOST_A]
    assert not (rig.root / "hosts" / HOST_B).exists()

    dest = rig.service.create_migration_attachment(src.id, b)
    done = rig.service.complete_migration(dest.id, "sda")
    assert done.migration_source_id == ""
    assert [p.name for p in allowed.iterdir()] == [HOST_B]
    assert not (rig.root / "hosts" / HOST_A).exists()
    assert (rig.root / "subsystems" / nqn / "namespaces" / "1").is_dir()  # the subsystem stays for B
    rig.service.delete_attachment(done.id)
    assert list((rig.root / "subsystems").iterdir()) == []


def test_a_migration_destination_without_a_host_nqn_is_refused(rig: Rig) -> None:
    vid = rig.service.create_volume(CreateVolumeSpec(name="v", size_bytes=4 * MIB)).id
    src = rig.service.create_attachment(vid, nvme_connector("a"), AccessMode.READ_WRITE, "vm1")
    rig.service.complete_attachment(src.id)
    iscsi_only = Connector(host="b", initiator_iqn="iqn.2026-01.io.example:b")
    with pytest.raises(InvalidArgument, match="nvme_host_nqn"):
        rig.service.create_migration_attachment(src.id, iscsi_only)
    allowed = rig.root / "subsystems" / identity.subsystem_nqn(NQN_PREFIX, vid) / "allowed_hosts"
    assert [p.name for p in allowed.iterdir()] == [HOST_A]
    assert len(rig.service.get_volume(vid).attachment_ids) == 1
