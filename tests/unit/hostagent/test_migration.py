"""The live-migration handoff on fakes: two agents (A, B: their own hypervisor, journal and secrets) and
one storage; libvirt's migration is played by moving the domain with the destination XML."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from blockwire.errors import FailedPrecondition, InvalidArgument, Unavailable
from blockwire.model import Connector, Encryption, Transport
from blockwire.runtime.failpoints import FailpointHit, Failpoints
from blockwire.secret import Secret
from hostagent.api import HostAgent
from hostagent.connectors.iscsi_qemu import QemuIscsiConnector
from hostagent.encryption import SECRET_TYPE, VolumeKeys
from hostagent.events import EventBus
from hostagent.journal import Journal
from hostagent.migration import (
    FP_FINISH_IN_AFTER_JOURNAL,
    FP_PREPARE_AFTER_CONNECT,
    MigrationVolume,
)
from hostagent.model import AttachmentState
from hostagent.tools.libiscsi import Libiscsi
from hostagent.virt.diskxml import NetworkSource, disk_xml, parse_domain_disks
from tests.fakes.clock import FakeClock
from tests.fakes.executor import FakeRunner, Reply
from tests.fakes.hypervisor import FakeHypervisor
from tests.fakes.storage_api import FakeStorage
from tests.unit.hostagent.conftest import iscsi_info, sample

UUID = "5a5a5a5a-0000-4000-8000-000000000001"


@dataclass
class Host:
    agent: HostAgent
    hv: FakeHypervisor
    journal: Journal


@dataclass
class Pair:
    a: Host
    b: Host
    storage: FakeStorage


def host(tmp: Path, name: str, storage: FakeStorage, *, keys: bool = False) -> Host:
    hv = FakeHypervisor()
    runner = (
        FakeRunner()
        .on(r"iscsi-inq -e 1 -c 131", Reply(stdout=sample("iscsi_inq_vpd83_tgt_scsi_id.txt")))
        .on(r"iscsi-inq -e 1 -c 128", Reply(stdout=sample("iscsi_inq_vpd80_tgt.txt")))
    )
    iqn = f"iqn.2026-01.io.blockwire:{name}"
    journal = Journal(tmp / name)
    agent = HostAgent(
        hypervisor=hv,
        connectors={Transport.ISCSI: QemuIscsiConnector(hv, Libiscsi(runner), initiator_iqn=iqn)},
        journal=journal,
        connector=Connector(host=name, initiator_iqn=iqn, transports=(Transport.ISCSI,)),
        clock=FakeClock(),
        storage=storage,
        events=EventBus(),
        failpoints=Failpoints(),
        volume_keys=VolumeKeys(hv) if keys else None,
    )
    return Host(agent, hv, journal)


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    infos = {v: replace(iscsi_info(v), serial=f"SERIAL-{v}") for v in ("vol-1", "vol-2")}
    storage = FakeStorage(infos=infos)
    a, b = host(tmp_path, "host-a", storage), host(tmp_path, "host-b", storage)
    dom = a.hv.add_domain("vm1")
    a.hv.domains["vm1"] = replace(dom, uuid=UUID)
    for v in ("vol-1", "vol-2"):
        a.agent.attach("vm1", volume_id=v)
    return Pair(a, b, storage)


def source_xml(h: Host, name: str = "vm1") -> str:
    disks = "".join(disk_xml(s) for s in h.hv.disks_by_domain[name])
    uuid = h.hv.domains[name].uuid
    return f"<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid><devices>{disks}</devices></domain>"


def volumes(h: Host) -> list[MigrationVolume]:
    return [
        MigrationVolume(r.volume_id, r.attachment_id, r.target_dev) for r in h.agent.list_attachments("vm1")
    ]


def libvirt_migrates(src: Host, dst: Host, xml: str) -> None:
    """What migrateToURI3 with the destination XML does to the two hosts' domains."""
    info = src.hv.domains.pop("vm1")
    dst.hv.domains["vm1"] = info
    dst.hv.disks_by_domain["vm1"] = [d.spec for d in parse_domain_disks(xml)]
    del src.hv.disks_by_domain["vm1"]


def test_migrate_a_to_b_and_back(pair: Pair) -> None:
    a, b, storage = pair.a, pair.b, pair.storage
    sources = {r.volume_id: r.attachment_id for r in a.agent.list_attachments("vm1")}
    xml = source_xml(a)
    prepared = b.agent.prepare_migration("vm1", xml, volumes(a))
    assert [d.volume_id for d in prepared.disks] == ["vol-1", "vol-2"]
    # B made its own attachments (linked to A's), its own secrets; A's are untouched
    assert {storage.migrations[d.attachment_id] for d in prepared.disks} == set(sources.values())
    assert len(b.hv.secrets) == 2
    assert len(a.hv.secrets) == 2
    assert all(r.state is AttachmentState.MIGRATING for r in b.journal.all())
    # the destination XML keeps targets, addresses and serials; only the sources change
    moved = {d.spec.target_dev: d.spec for d in parse_domain_disks(prepared.domain_xml)}
    before = {s.target_dev: s for s in a.hv.disks_by_domain["vm1"]}
    assert moved.keys() == before.keys()
    for target, spec in moved.items():
        assert replace(spec, source=before[target].source) == before[target]
        assert isinstance(spec.source, NetworkSource)
        assert spec.source.initiator_iqn == "iqn.2026-01.io.blockwire:host-b"
        assert spec.source.auth is not None
        assert (spec.source.auth.usage, "iscsi") in b.hv.secrets
    # a repeat returns the same
    assert b.agent.prepare_migration("vm1", xml, volumes(a)) == prepared

    libvirt_migrates(a, b, prepared.domain_xml)
    done = b.agent.finish_incoming_migration("vm1")
    assert [(r.state, r.migration_source_id) for r in done] == [(AttachmentState.ATTACHED, "")] * 2
    assert a.agent.finish_outgoing_migration("vm1") == ["vol-1", "vol-2"]
    assert a.journal.all() == []
    assert a.hv.secrets == {}
    assert set(storage.exports) == {d.attachment_id for d in prepared.disks}
    # repeats
    assert a.agent.finish_outgoing_migration("vm1") == []
    assert [r.state for r in b.agent.finish_incoming_migration("vm1")] == [AttachmentState.ATTACHED] * 2
    assert [x.action for x in b.agent.reconcile()] == ["kept", "kept"]

    # and back
    back = a.agent.prepare_migration("vm1", source_xml(b), volumes(b))
    libvirt_migrates(b, a, back.domain_xml)
    a.agent.finish_incoming_migration("vm1")
    b.agent.finish_outgoing_migration("vm1")
    assert b.journal.all() == []
    assert b.hv.secrets == {}
    assert len(a.hv.secrets) == 2
    assert set(storage.exports) == {d.attachment_id for d in back.disks}
    for v in ("vol-1", "vol-2"):
        a.agent.detach("vm1", v)
    assert storage.exports == {}


def test_failed_prepare_undoes_every_volume_of_the_call(pair: Pair) -> None:
    a, b, storage = pair.a, pair.b, pair.storage
    before = dict(storage.exports)
    storage.infos["vol-2"] = replace(storage.infos["vol-2"], wwn="6001405000000000000000000000ffff")
    with pytest.raises(FailedPrecondition):  # vol-2's LUN does not carry the announced identity
        b.agent.prepare_migration("vm1", source_xml(a), volumes(a))
    assert b.journal.all() == []
    assert b.hv.secrets == {}
    assert storage.exports == before
    assert storage.migrations == {}
    assert len(a.hv.disks_by_domain["vm1"]) == 2  # the VM on A never noticed


def test_abort_on_the_destination_leaves_the_source_as_it_was(pair: Pair) -> None:
    a, b, storage = pair.a, pair.b, pair.storage
    before = dict(storage.exports)
    b.agent.prepare_migration("vm1", source_xml(a), volumes(a))
    # libvirt's migration failed: the domain never arrived
    assert sorted(b.agent.abort_migration("vm1")) == ["vol-1", "vol-2"]
    assert b.agent.abort_migration("vm1") == []  # a repeat
    assert a.agent.abort_migration("vm1") == []  # the source made nothing
    assert b.journal.all() == []
    assert b.hv.secrets == {}
    assert storage.exports == before
    assert [r.state for r in a.agent.list_attachments("vm1")] == [AttachmentState.ATTACHED] * 2


def test_finishing_too_early_is_refused(pair: Pair) -> None:
    a, b = pair.a, pair.b
    b.agent.prepare_migration("vm1", source_xml(a), volumes(a))
    with pytest.raises(FailedPrecondition, match="not on this host"):
        b.agent.finish_incoming_migration("vm1")
    with pytest.raises(FailedPrecondition, match="still runs on this host"):
        a.agent.finish_outgoing_migration("vm1")
    assert len(a.hv.secrets) == 2


def test_abort_after_the_domain_arrived_is_refused(pair: Pair) -> None:
    a, b = pair.a, pair.b
    prepared = b.agent.prepare_migration("vm1", source_xml(a), volumes(a))
    libvirt_migrates(a, b, prepared.domain_xml)
    with pytest.raises(FailedPrecondition, match="FinishIncomingMigration"):
        b.agent.abort_migration("vm1")


def test_bad_input(pair: Pair) -> None:
    a, b = pair.a, pair.b
    with pytest.raises(InvalidArgument, match="domain_xml"):
        b.agent.prepare_migration("vm1", "<domain", volumes(a))
    with pytest.raises(InvalidArgument, match="volumes"):
        b.agent.prepare_migration("vm1", source_xml(a), [])
    with pytest.raises(InvalidArgument, match="no disk at sdz"):
        b.agent.prepare_migration("vm1", source_xml(a), [MigrationVolume("vol-1", "att-1", "sdz")])
    assert b.journal.all() == []


def test_destination_killed_in_prepare_rolls_back_at_restart(pair: Pair) -> None:
    a, b, storage = pair.a, pair.b, pair.storage
    before = dict(storage.exports)
    with b.agent.failpoints.armed(f"{FP_PREPARE_AFTER_CONNECT}=raise"), pytest.raises(FailpointHit):
        b.agent.prepare_migration("vm1", source_xml(a), volumes(a)[:1])
    assert b.journal.all() == []  # a raise is undone at once
    b.agent.prepare_migration("vm1", source_xml(a), volumes(a))
    (first, second) = b.journal.all()
    b.journal.put(replace(second, attachment_id="", connector_kind=None))  # killed before its id was kept
    actions = {x.volume_id: x.action for x in b.agent.reconcile()}
    # vol-2's secret, which no record accounts for now, is swept
    assert actions == {"vol-1": "rolled back", "vol-2": "rolled back", "": "swept"}
    assert b.journal.all() == []
    assert b.hv.secrets == {}
    assert storage.exports == before  # vol-2's attachment id was learnt by a repeat, then rolled back
    assert storage.migrations == {}
    assert first.volume_id == "vol-1"


def test_destination_killed_in_finish_rolls_forward_at_restart(pair: Pair) -> None:
    a, b, storage = pair.a, pair.b, pair.storage
    prepared = b.agent.prepare_migration("vm1", source_xml(a), volumes(a))
    libvirt_migrates(a, b, prepared.domain_xml)
    with b.agent.failpoints.armed(f"{FP_FINISH_IN_AFTER_JOURNAL}=raise"), pytest.raises(FailpointHit):
        b.agent.finish_incoming_migration("vm1")
    assert {x.action for x in b.agent.reconcile()} == {"finished"}
    assert [(r.state, r.migration_source_id) for r in b.journal.all()] == [(AttachmentState.ATTACHED, "")] * 2
    assert storage.migrations == {}
    assert set(storage.exports) == {d.attachment_id for d in prepared.disks}
    # the source's restart finds its domain gone: it holds nothing afterwards
    assert {x.action for x in a.agent.reconcile() if x.volume_id} == {"rolled back"}
    assert a.journal.all() == []
    assert a.hv.secrets == {}


def test_storage_down_during_prepare_leaves_nothing_once_it_is_back(pair: Pair) -> None:
    a, b, storage = pair.a, pair.b, pair.storage
    storage.fail_migration = Unavailable("storage down")
    with pytest.raises(Unavailable):
        b.agent.prepare_migration("vm1", source_xml(a), volumes(a))
    # storage may have made the attachment and lost the answer: the record stays ERROR until it is back
    (record,) = b.journal.all()
    assert record.state is AttachmentState.ERROR
    storage.fail_migration = None
    assert b.agent.abort_migration("vm1") == ["vol-1"]
    assert b.journal.all() == []
    assert storage.migrations == {}


def test_moved_disk_keeps_everything_but_the_source() -> None:
    from hostagent.virt.diskxml import BlockSource, moved_disk_xml  # noqa: PLC0415

    xml = """<domain><devices><disk type='network' device='disk'><driver name='qemu' type='raw' cache='none'/>
<source protocol='iscsi' name='iqn.x:a/1'><host name='127.0.0.1' port='3260'/>
<initiator><iqn name='iqn.x:host-a'/></initiator>
<auth username='u'><secret type='iscsi' usage='old'/></auth></source>
<target dev='vdb' bus='virtio'/><serial>S1</serial><boot order='2'/><alias name='virtio-disk1'/>
<address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x0'/></disk></devices></domain>"""
    moved = moved_disk_xml(xml, "vdb", BlockSource("/dev/dm-3"))
    assert '<source dev="/dev/dm-3"/>' in moved
    assert 'type="block"' in moved
    for kept in ("<serial>S1</serial>", '<boot order="2"/>', 'bus="0x05"', "virtio-disk1", 'cache="none"'):
        assert kept in moved
    assert "old" not in moved
    assert "iqn.x:host-a" not in moved


def test_migrate_domain_runs_the_whole_flow_from_the_source(pair: Pair) -> None:
    a, b, storage = pair.a, pair.b, pair.storage
    a.hv.peers["qemu+tcp://host-b/system"] = b.hv
    result = a.agent.migrate_domain("vm1", b.agent, "qemu+tcp://host-b/system")
    assert sorted(result.volume_ids) == ["vol-1", "vol-2"]
    assert a.journal.all() == []
    assert a.hv.secrets == {}
    assert [r.state for r in b.journal.all()] == [AttachmentState.ATTACHED] * 2
    assert storage.migrations == {}


def test_migrate_domain_whose_libvirt_migration_fails_leaves_the_vm_on_the_source(pair: Pair) -> None:
    a, b, storage = pair.a, pair.b, pair.storage
    before = dict(storage.exports)
    a.hv.peers["qemu+tcp://host-b/system"] = b.hv
    a.hv.fail_migrate = Unavailable("the destination libvirtd does not answer")
    with pytest.raises(Unavailable):
        a.agent.migrate_domain("vm1", b.agent, "qemu+tcp://host-b/system")
    assert b.journal.all() == []
    assert b.hv.secrets == {}
    assert storage.exports == before
    assert [r.state for r in a.agent.list_attachments("vm1")] == [AttachmentState.ATTACHED] * 2
    assert len(a.hv.disks_by_domain["vm1"]) == 2


def test_an_encrypted_volume_gets_the_destinations_own_secret(tmp_path: Path) -> None:
    """B defines a volume secret of its own (from its migration attachment's key) and the destination
    XML's <encryption> names it, not A's; A's goes with FinishOutgoing; the key is in no journal."""
    key = "volume-key-passphrase-5678"
    enc = Encryption(key_ref="embedded:v1:x", passphrase=Secret(key), header_bytes=2 << 20)
    storage = FakeStorage(infos={"vol-e": replace(iscsi_info("vol-e"), serial="SERIAL-e", encryption=enc)})
    a = host(tmp_path, "host-a", storage, keys=True)
    b = host(tmp_path, "host-b", storage, keys=True)
    a.hv.domains["vm1"] = replace(a.hv.add_domain("vm1"), uuid=UUID)
    a.agent.attach("vm1", volume_id="vol-e")
    (a_usage,) = [u for (u, t) in a.hv.secrets if t == SECRET_TYPE]
    (a_spec,) = a.hv.disks_by_domain["vm1"]
    assert a_spec.encryption is not None

    prepared = b.agent.prepare_migration("vm1", source_xml(a), volumes(a))
    (disk,) = prepared.disks
    b_usage = f"blockwire-luks/vol-e/{disk.attachment_id}"
    assert b.hv.secrets[(b_usage, SECRET_TYPE)].reveal() == key
    (moved,) = parse_domain_disks(prepared.domain_xml)
    assert moved.spec.encryption is not None
    # (a repeat of the definition answers the secret's uuid, as libvirt does)
    assert moved.spec.encryption.secret_uuid == b.hv.define_secret(b_usage, SECRET_TYPE, Secret(key))
    assert moved.spec.encryption.secret_uuid != a_spec.encryption.secret_uuid
    assert disk.disk_xml.count("<encryption") == 1
    assert moved.spec.encryption.secret_uuid in disk.disk_xml

    libvirt_migrates(a, b, prepared.domain_xml)
    b.agent.finish_incoming_migration("vm1")
    assert (a_usage, SECRET_TYPE) in a.hv.secrets  # until the source finishes
    assert a.agent.finish_outgoing_migration("vm1") == ["vol-e"]
    assert a.hv.secrets == {}
    assert [u for (u, t) in b.hv.secrets if t == SECRET_TYPE] == [b_usage]
    for h in (a, b):
        for record in (tmp_path / h.agent.connector.host).rglob("*.json"):
            assert key not in record.read_text()


def test_an_encrypted_volume_without_its_key_is_not_prepared(tmp_path: Path) -> None:
    enc = Encryption(key_ref="embedded:v1:x", passphrase=Secret("k" * 20), header_bytes=2 << 20)
    storage = FakeStorage(infos={"vol-e": replace(iscsi_info("vol-e"), serial="SERIAL-e", encryption=enc)})
    a = host(tmp_path, "host-a", storage, keys=True)
    b = host(tmp_path, "host-b", storage, keys=False)  # no libvirt secrets to hand the key to QEMU
    a.hv.domains["vm1"] = replace(a.hv.add_domain("vm1"), uuid=UUID)
    a.agent.attach("vm1", volume_id="vol-e")
    with pytest.raises(FailedPrecondition, match="no libvirt secrets"):
        b.agent.prepare_migration("vm1", source_xml(a), volumes(a))
    assert b.journal.all() == []
    assert b.hv.secrets == {}
