"""Live migration of NVMe/TCP volumes on fakes: two hosts (A, B), each with its own NVMe kernel
(tests/fakes/nvme.py), hypervisor, journal and host NQN, reaching one nvmet target, and a storage that
admits the host NQNs of the live attachments to the target's subsystem, as the nvmet exporter's
allowed hosts (the storage side on the real exporter: tests/unit/storagesvc/test_nvmet.py). libvirt's
migration is played by moving the domain with the destination XML (tests/unit/hostagent/test_migration.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from blockwire.errors import IdentityMismatch
from blockwire.model import AccessMode, Connector, NvmeofConnection, Transport
from blockwire.runtime.failpoints import Failpoints
from hostagent.api import HostAgent
from hostagent.connectors.nvme import NvmeConnector
from hostagent.events import EventBus
from hostagent.host.nvme import NvmeHost
from hostagent.host.sysfs import Sysfs
from hostagent.journal import Journal
from hostagent.model import AttachmentState
from hostagent.storage import StorageAttachment
from hostagent.virt.diskxml import BlockSource, parse_domain_disks
from tests.fakes.clock import FakeClock
from tests.fakes.hypervisor import FakeHypervisor
from tests.fakes.nvme import FakeNs, FakeNvmeKernel, FakeSubsystem
from tests.fakes.openers import FakeOpeners
from tests.fakes.storage_api import FakeStorage
from tests.fakes.udev import FakeUdev
from tests.unit.hostagent.test_migration import libvirt_migrates, source_xml, volumes
from tests.unit.hostagent.test_nvme import NGUID, NQN, P1, P2, UUID, info

NQN_A = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-1b7e-4c55-9e52-0a7e3b2d9c11"
NQN_B = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-1b7e-4c55-9e52-0a7e3b2d9c11"
DOMAIN_UUID = "5a5a5a5a-0000-4000-8000-0000000000aa"
NGUID_2 = "0f3c2a9e5d7b4c61a2b3c4d5e6f70822"
UUID_2 = "3b9e2f4a-6c1d-4e8f-9a0b-1c2d3e4f5a22"


@dataclass
class NvmetStorage(FakeStorage):
    """FakeStorage whose target subsystem admits exactly the host NQNs of its live attachments."""

    target: FakeSubsystem | None = None
    nqn_of: dict[str, str] = field(default_factory=dict)  # attachment id -> host NQN

    def _admit(self) -> None:
        assert self.target is not None
        self.target.hosts = {self.nqn_of[a] for a in self.exports if a in self.nqn_of}

    def create_attachment(
        self, volume_id: str, connector: Connector, access_mode: AccessMode, domain: str
    ) -> StorageAttachment:
        sa = super().create_attachment(volume_id, connector, access_mode, domain)
        t = sa.connection_info.transport
        assert isinstance(t, NvmeofConnection)
        sa = replace(
            sa,
            connection_info=replace(
                sa.connection_info, transport=replace(t, host_nqn=connector.nvme_host_nqn)
            ),
        )
        self.nqn_of[sa.id] = connector.nvme_host_nqn
        self._admit()
        return sa

    def create_migration_attachment(
        self, source_attachment_id: str, connector: Connector, domain: str
    ) -> StorageAttachment:
        sa = super().create_migration_attachment(source_attachment_id, connector, domain)
        self.nqn_of[sa.id] = connector.nvme_host_nqn
        self._admit()
        return sa

    def complete_migration(self, attachment_id: str, target_dev: str, host_device: str) -> None:
        super().complete_migration(attachment_id, target_dev, host_device)
        self._admit()

    def rollback_migration(self, attachment_id: str) -> None:
        super().rollback_migration(attachment_id)
        self._admit()

    def delete_attachment(self, attachment_id: str) -> None:
        super().delete_attachment(attachment_id)
        self._admit()


@dataclass
class Host:
    agent: HostAgent
    hv: FakeHypervisor
    journal: Journal
    kernel: FakeNvmeKernel
    openers: FakeOpeners


def nvme_host(
    tmp: Path, name: str, nqn: str, storage: FakeStorage, targets: dict[str, FakeSubsystem]
) -> Host:
    udev = FakeUdev()
    kernel = FakeNvmeKernel(tmp / name / "sys", udev)
    kernel.targets = targets  # one target, reached by both hosts
    openers = FakeOpeners()
    hostid = nqn.rpartition(":uuid:")[2]
    conn = NvmeConnector(
        NvmeHost(Sysfs(tmp / name / "sys"), kernel.identify), kernel, udev, FakeClock(),
        openers=openers, host_nqn=nqn, host_id=hostid, device_timeout=5,
    )  # fmt: skip
    hv = FakeHypervisor()
    journal = Journal(tmp / name / "state")
    agent = HostAgent(
        hypervisor=hv,
        connectors={Transport.NVME_TCP: conn},
        journal=journal,
        connector=Connector(
            host=name, nvme_host_nqn=nqn, nvme_host_id=hostid, transports=(Transport.NVME_TCP,)
        ),
        clock=FakeClock(),
        storage=storage,
        events=EventBus(),
        failpoints=Failpoints(),
    )
    return Host(agent, hv, journal, kernel, openers)


@dataclass
class Pair:
    a: Host
    b: Host
    storage: NvmetStorage
    target: FakeSubsystem


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    target = FakeSubsystem(NQN, {P1, P2}, set(), [FakeNs(1, NGUID, UUID, 16 << 20)])
    storage = NvmetStorage(infos={"vol-1": replace(info("vol-1"), serial="SERIAL-vol-1")}, target=target)
    targets = {NQN: target}
    a = nvme_host(tmp_path, "host-a", NQN_A, storage, targets)
    b = nvme_host(tmp_path, "host-b", NQN_B, storage, targets)
    b.kernel.next_instance = 5  # B's devices are named apart from A's: nvme5n1
    a.hv.domains["vm1"] = replace(a.hv.add_domain("vm1"), uuid=DOMAIN_UUID)
    a.agent.attach("vm1", volume_id="vol-1")
    assert target.hosts == {NQN_A}
    return Pair(a, b, storage, target)


def ctrls(h: Host) -> list[tuple[str, str]]:
    return sorted((c["name"], c["hostnqn"]) for c in h.kernel.controllers())


def test_an_nvme_volume_migrates_a_to_b_and_the_source_lets_go(pair: Pair) -> None:
    a, b, storage, target = pair.a, pair.b, pair.storage, pair.target
    a_ctrls = ctrls(a)
    assert [n for _, n in a_ctrls] == [NQN_A, NQN_A]
    prepared = b.agent.prepare_migration("vm1", source_xml(a), volumes(a))
    assert [d.volume_id for d in prepared.disks] == ["vol-1"]
    # B connected its own controllers with its own host NQN; storage admits both hosts
    assert ctrls(b) == [("nvme5", NQN_B), ("nvme6", NQN_B)]
    assert target.hosts == {NQN_A, NQN_B}
    (record,) = b.journal.all()
    assert record.state is AttachmentState.MIGRATING
    t = record.connection_info.transport
    assert isinstance(t, NvmeofConnection)
    assert t.host_nqn == NQN_B
    # the destination XML opens B's head; everything else of the disk is the source's
    (moved,) = parse_domain_disks(prepared.domain_xml)
    (before,) = a.hv.disks_by_domain["vm1"]
    assert moved.spec.source == BlockSource("/dev/nvme5n1")
    assert before.source == BlockSource("/dev/nvme0n1")
    assert replace(moved.spec, source=before.source) == before
    assert b.agent.prepare_migration("vm1", source_xml(a), volumes(a)) == prepared  # a repeat
    assert ctrls(a) == a_ctrls  # the source untouched

    libvirt_migrates(a, b, prepared.domain_xml)
    b.agent.finish_incoming_migration("vm1")
    assert target.hosts == {NQN_B}  # CompleteMigration: the source host's entry went
    assert a.agent.finish_outgoing_migration("vm1") == ["vol-1"]
    assert ctrls(a) == []
    assert a.kernel.heads() == []
    assert a.journal.all() == []
    assert ctrls(b) == [("nvme5", NQN_B), ("nvme6", NQN_B)]
    assert a.agent.finish_outgoing_migration("vm1") == []  # a repeat
    b.agent.detach("vm1", "vol-1")
    assert ctrls(b) == []
    assert storage.exports == {}


def test_a_namespace_reused_under_the_destination_is_refused_and_the_source_untouched(pair: Pair) -> None:
    a, b, storage, target = pair.a, pair.b, pair.storage, pair.target
    a_ctrls, a_heads, a_disks = ctrls(a), a.kernel.heads(), list(a.hv.disks_by_domain["vm1"])
    before = dict(storage.exports)
    target.namespaces = [FakeNs(1, NGUID_2, UUID_2, 16 << 20)]  # another volume's namespace now
    with pytest.raises(IdentityMismatch, match="refused"):
        b.agent.prepare_migration("vm1", source_xml(a), volumes(a))
    # B: nothing; storage: the destination's attachment and admission rolled back
    assert ctrls(b) == []
    assert b.kernel.heads() == []
    assert b.journal.all() == []
    assert storage.migrations == {}
    assert storage.exports == before
    assert target.hosts == {NQN_A}
    # A: as it was
    assert ctrls(a) == a_ctrls
    assert a.kernel.heads() == a_heads
    assert a.hv.disks_by_domain["vm1"] == a_disks
    assert [r.state for r in a.journal.all()] == [AttachmentState.ATTACHED]


def test_abort_on_the_destination_undoes_only_the_destination(pair: Pair) -> None:
    a, b, storage, target = pair.a, pair.b, pair.storage, pair.target
    a_ctrls = ctrls(a)
    before = dict(storage.exports)
    b.agent.prepare_migration("vm1", source_xml(a), volumes(a))
    assert b.agent.abort_migration("vm1") == ["vol-1"]
    assert b.agent.abort_migration("vm1") == []  # a repeat
    assert ctrls(b) == []
    assert b.journal.all() == []
    assert storage.exports == before
    assert target.hosts == {NQN_A}
    assert ctrls(a) == a_ctrls
    assert [r.state for r in a.journal.all()] == [AttachmentState.ATTACHED]


def test_finish_outgoing_keeps_controllers_another_attached_namespace_uses(tmp_path: Path) -> None:
    """Two volumes in one subsystem (a per-host subsystem) on A, in two domains; vm1 migrates: A keeps
    the controllers vol-2 of vm2 needs, as a detach would."""
    target = FakeSubsystem(
        NQN, {P1, P2}, set(), [FakeNs(1, NGUID, UUID, 16 << 20), FakeNs(2, NGUID_2, UUID_2, 16 << 20)]
    )
    infos = {
        "vol-1": replace(info("vol-1"), serial="SERIAL-vol-1"),
        "vol-2": replace(info("vol-2", nguid=NGUID_2, uuid=UUID_2, nsid=2), serial="SERIAL-vol-2"),
    }
    storage = NvmetStorage(infos=infos, target=target)
    a = nvme_host(tmp_path, "host-a", NQN_A, storage, {NQN: target})
    b = nvme_host(tmp_path, "host-b", NQN_B, storage, {NQN: target})
    a.hv.domains["vm1"] = replace(a.hv.add_domain("vm1"), uuid=DOMAIN_UUID)
    a.hv.add_domain("vm2")
    a.agent.attach("vm1", volume_id="vol-1")
    a.agent.attach("vm2", volume_id="vol-2")
    a_ctrls = ctrls(a)
    prepared = b.agent.prepare_migration("vm1", source_xml(a), volumes(a))
    libvirt_migrates(a, b, prepared.domain_xml)
    b.agent.finish_incoming_migration("vm1")
    assert a.agent.finish_outgoing_migration("vm1") == ["vol-1"]
    assert ctrls(a) == a_ctrls  # vol-2's namespace hangs on them
    assert a.kernel.heads() == ["nvme0n1", "nvme0n2"]
    b.agent.detach("vm1", "vol-1")
    a.kernel.remove_namespace(NQN, 1)  # vol-1 unexported from the shared subsystem
    a.agent.detach("vm2", "vol-2")
    assert ctrls(a) == []


def test_one_kernel_two_host_nqns_the_head_stays_for_the_other_identitys_controllers(tmp_path: Path) -> None:
    """Two host NQNs of one machine connected to one subsystem (a migration between two identities of one
    kernel, as the guest tier runs it): the kernel puts all four controllers under one subsystem and
    head. Disconnecting one identity deletes its controllers only, also while the head is held (its I/O
    goes on over the others), and does not wait for a head that stays; the last identity's disconnect
    removes the head."""
    udev = FakeUdev()
    kernel = FakeNvmeKernel(tmp_path / "sys", udev)
    kernel.export(NQN, (P1, P2), NQN_A, FakeNs(1, NGUID, UUID, 16 << 20)).hosts.add(NQN_B)
    openers = FakeOpeners()

    def connector(nqn: str) -> NvmeConnector:
        return NvmeConnector(
            NvmeHost(Sysfs(tmp_path / "sys"), kernel.identify), kernel, udev, FakeClock(),
            openers=openers, host_nqn=nqn, host_id=nqn.rpartition(":uuid:")[2], device_timeout=5,
        )  # fmt: skip

    a, b = connector(NQN_A), connector(NQN_B)
    ia = replace(info(), transport=replace(info().transport, host_nqn=NQN_A))
    ib = replace(info(), transport=replace(info().transport, host_nqn=NQN_B))
    assert a.connect(ia).path == b.connect(ib).path == "/dev/nvme0n1"
    assert sorted(c["hostnqn"] for c in kernel.controllers()) == [NQN_A, NQN_A, NQN_B, NQN_B]
    openers.hold("nvme0n1", comm="qemu-system-x86")
    a.disconnect(ia, force=False)
    assert sorted(c["hostnqn"] for c in kernel.controllers()) == [NQN_B, NQN_B]
    assert kernel.heads() == ["nvme0n1"]
    assert b.paths(ib) == ["/dev/nvme2", "/dev/nvme3"]
    a.disconnect(ia)  # a repeat
    with pytest.raises(Exception, match="in use"):  # the last identity: the head would go
        b.disconnect(ib, force=False)
    openers.release("nvme0n1")
    b.disconnect(ib)
    assert kernel.controllers() == []
    assert kernel.heads() == []
