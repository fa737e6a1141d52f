"""Host tier, real daemons: a VM never loses its disk and never gets another's.

blockwire-storage (file + tgt) and blockwire-agent (QEMU-native iSCSI with CHAP) as subprocesses,
libvirtd + QEMU with no-OS domains:

* a volume that is not multiattach never reaches a second domain of the host, whatever the caller's
  `shareable` says; a multiattach one does, and detaching one domain keeps the export of the other;
* domain names that differ only in characters a file name cannot hold ("hv 1", "hv_1") are two
  attachments, never one;
* an attach that fails after the hot-plug, whose unplug the domain refuses (virtio disk, no guest OS),
  keeps the disk's export, CHAP account and libvirt secret: the record stays ERROR;
* a detach from a shut-off persistent domain removes the disk from its definition;
* a repeat with other options is FAILED_PRECONDITION naming the difference;
* connection info without an identity is refused unless the caller opts out.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import libvirt
import pytest
from lxml import etree

from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import types_pb2 as pb
from hostagent.api import FP_ATTACH_AFTER_HOTPLUG, FP_ATTACH_BEFORE_COMPLETE
from tests.fakes.daemon_rig import MIB, Rig, force_cleanup, remove_domain, rpc_code
from tests.host.daemons import Started, Tgtd
from tests.rig import KILLED, domain_xml

# Free PCIe root ports (q35), so that a virtio (PCI) disk can be hot-plugged; with no guest OS nothing
# ever acknowledges its unplug.
PCI_ROOT_PORTS = 8


@pytest.fixture(scope="module")
def virt(host_daemons: Started) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open("qemu:///system")
    yield conn
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, tgtd: Tgtd, virt: libvirt.virConnect) -> Iterator[Rig]:
    r = Rig(work=tmp_path_factory.mktemp("datapath"), tgtd=tgtd, virt=virt, detach_timeout=3.0)
    with r.running():
        yield r


@pytest.fixture
def domains(rig: Rig) -> Iterator[list[str]]:
    """Domains a test defines (and starts) with `start`; removed with whatever they hold afterwards."""
    made: list[str] = []
    yield made
    for name in made:
        with contextlib.suppress(libvirt.libvirtError):
            force_cleanup(rig, name)
        remove_domain(rig.lv(), name)
    force_cleanup(rig, "")
    for p in (rig.state / "attachments").glob("*.json"):
        p.unlink()
    for vid in list(rig.volume_ids):
        with contextlib.suppress(grpc.RpcError):
            rig.delete_volume(vid)
        rig.volume_ids.discard(vid)


def start(rig: Rig, domains: list[str], name: str, pci_root_ports: int = 0) -> str:
    dom = rig.lv().defineXML(domain_xml(name, pci_root_ports=pci_root_ports))
    domains.append(name)
    dom.create()
    return name


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def create_volume(rig: Rig, *, multiattach: bool = False) -> pb.Volume:
    v = rig.storage.CreateVolume(
        spb.CreateVolumeRequest(
            name=unique("dp"), size_bytes=8 * MIB, backend="file", multiattach=multiattach
        ),
        timeout=60,
    ).volume
    rig.volume_ids.add(v.id)
    return v


def attach(rig: Rig, domain: str, volume_id: str, **kw: object) -> pb.Attachment:
    return rig.agent.AttachVolume(  # type: ignore[no-any-return]
        hpb.AttachVolumeRequest(domain=domain, volume_id=volume_id, **kw),
        timeout=60,  # type: ignore[arg-type]
    ).attachment


def refused(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()  # type: ignore[operator]
    return err.value


def inactive_disks(rig: Rig, domain: str) -> list[etree._Element]:
    xml = rig.lv().lookupByName(domain).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    return etree.fromstring(xml.encode()).findall("devices/disk")


def test_volume_without_multiattach_never_reaches_a_second_domain(rig: Rig, domains: list[str]) -> None:
    a = start(rig, domains, unique("bw-dp-a"))
    b = start(rig, domains, unique("bw-dp-b"))
    v = create_volume(rig)
    attach(rig, a, v.id)
    err = refused(lambda: attach(rig, b, v.id, disk=pb.DiskOptions(shareable=True)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "multiattach" in (err.details() or "")
    assert rig.live_disks(b) == []
    assert len(rig.live_disks(a)) == 1
    assert rig.complete(a, v.id) == {}
    rig.detach(a, v.id)
    assert rig.nothing_left(a, v.id) == {}


def test_multiattach_volume_on_two_domains_keeps_the_export_until_the_last(
    rig: Rig, domains: list[str]
) -> None:
    a = start(rig, domains, unique("bw-dp-a"))
    b = start(rig, domains, unique("bw-dp-b"))
    v = create_volume(rig, multiattach=True)
    first = attach(rig, a, v.id)
    second = attach(rig, b, v.id)
    assert first.id != second.id
    for d in (a, b):
        (disk,) = rig.live_disks(d)
        assert disk.find("shareable") is not None
    rig.detach(a, v.id)
    assert rig.live_disks(a) == []
    assert [x.id for x in rig.attachments(v.id)] == [second.id]
    assert list(rig.targets().values()) == [[rig.agent_iqn()]]  # the target and b's ACL entry stay
    assert rig.volume(v.id).state == pb.VOLUME_STATE_IN_USE
    assert len(rig.live_disks(b)) == 1
    assert len(rig.secrets()) == 1  # b's QEMU keeps its credentials
    rig.detach(b, v.id)
    assert rig.nothing_left(b, v.id) == {}


def test_domain_names_that_differ_in_unsafe_characters_never_share_an_attachment(
    rig: Rig, domains: list[str]
) -> None:
    tag = uuid.uuid4().hex[:6]
    spaced = start(rig, domains, f"bw hv 1 {tag}")
    underscored = start(rig, domains, f"bw_hv_1_{tag}")
    v = create_volume(rig)
    attach(rig, spaced, v.id)
    err = refused(lambda: attach(rig, underscored, v.id))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert len(rig.live_disks(spaced)) == 1
    assert rig.live_disks(underscored) == []
    assert rig.complete(spaced, v.id) == {}
    rig.detach(underscored, v.id)  # not attached there: OK, and the other keeps its disk
    assert len(rig.live_disks(spaced)) == 1
    rig.detach(spaced, v.id)
    assert rig.nothing_left(spaced, v.id) == {}


def test_failed_attach_never_unexports_a_disk_the_domain_still_holds(rig: Rig, domains: list[str]) -> None:
    name = start(rig, domains, unique("bw-dp-pci"), PCI_ROOT_PORTS)
    v = create_volume(rig)
    rig.agent_proc.stop()  # type: ignore[union-attr]
    rig.start_agent(failpoints=f"{FP_ATTACH_BEFORE_COMPLETE}=raise")
    try:
        err = refused(lambda: attach(rig, name, v.id, disk=pb.DiskOptions(bus=pb.DISK_BUS_VIRTIO)))
        assert err.code() == grpc.StatusCode.INTERNAL, err.details()  # the failpoint's exception
        # QEMU still has the disk (no guest OS acknowledges a PCI unplug) ...
        (disk,) = rig.live_disks(name)
        assert disk.find("target").get("bus") == "virtio"
        # ... so its export, CHAP account, libvirt secret and the record are all still there
        (row,) = rig.attachments(v.id)
        assert row.state == pb.ATTACHMENT_STATE_ATTACHING
        assert list(rig.targets().values()) == [[rig.agent_iqn()]]
        assert len(rig.secrets()) == 1
        (record,) = rig.agent.ListAttachments(
            hpb.HostAgentServiceListAttachmentsRequest(), timeout=10
        ).attachments
        assert record.state == pb.ATTACHMENT_STATE_ERROR
        assert "still holds the disk" in record.error_message
    finally:
        rig.agent_proc.stop()  # type: ignore[union-attr]
        rig.start_agent()
    # the domain goes away: now the detach can take everything
    rig.lv().lookupByName(name).destroy()
    rig.detach(name, v.id)
    assert rig.nothing_left(name, v.id) == {}


def test_detach_from_a_shut_off_domain_removes_the_disk_from_its_definition(
    rig: Rig, domains: list[str]
) -> None:
    name = start(rig, domains, unique("bw-dp-off"))
    v = create_volume(rig)
    attach(rig, name, v.id, persistent=True)
    assert len(inactive_disks(rig, name)) == 1
    rig.lv().lookupByName(name).destroy()
    rig.detach(name, v.id)
    assert inactive_disks(rig, name) == []
    assert rig.nothing_left(name, v.id) == {}


def test_repeat_with_other_options_is_refused_naming_what_differs(rig: Rig, domains: list[str]) -> None:
    name = start(rig, domains, unique("bw-dp-rep"))
    v = create_volume(rig)
    first = attach(rig, name, v.id)
    err = refused(lambda: attach(rig, name, v.id, access_mode=pb.ACCESS_MODE_READ_ONLY))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "access_mode is rw, asked ro" in (err.details() or "")
    err = refused(lambda: attach(rig, name, v.id, disk=pb.DiskOptions(bus=pb.DISK_BUS_SATA)))
    assert "bus is scsi, asked sata" in (err.details() or "")
    again = attach(rig, name, v.id)
    assert again.target_dev == first.target_dev
    (disk,) = rig.live_disks(name)
    assert disk.find("readonly") is None
    rig.detach(name, v.id)
    assert rig.nothing_left(name, v.id) == {}


def test_connection_info_without_identity_needs_an_explicit_opt_out(rig: Rig, domains: list[str]) -> None:
    name = start(rig, domains, unique("bw-dp-id"))
    v = create_volume(rig)
    connector = rig.agent.GetConnector(hpb.GetConnectorRequest(), timeout=10).connector
    att = rig.storage.CreateAttachment(
        spb.CreateAttachmentRequest(volume_id=v.id, connector=connector, domain=name), timeout=30
    ).attachment
    info = pb.ConnectionInfo()
    info.CopyFrom(att.connection_info)
    info.wwn = ""
    info.serial = ""
    request = hpb.AttachVolumeRequest(domain=name, connection_info=info)
    err = refused(lambda: rig.agent.AttachVolume(request, timeout=60))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "announces no identity" in (err.details() or "")
    assert rig.live_disks(name) == []
    assert rig.journal() == []
    request.allow_unverified_identity = True
    rig.agent.AttachVolume(request, timeout=60)
    assert len(rig.live_disks(name)) == 1
    rig.detach(name, v.id)
    assert (
        rpc_code(
            lambda: rig.storage.DeleteAttachment(
                spb.DeleteAttachmentRequest(attachment_id=att.id), timeout=30
            )
        )
        == grpc.StatusCode.OK
    )
    assert rig.nothing_left(name, v.id) == {}


def test_a_volume_path_is_never_left_in_a_stopped_domain(
    rig: Rig, domains: list[str], tmp_path: Path
) -> None:
    """The shut-off detach also holds when the domain was stopped with the disk never made persistent:
    nothing to remove from the definition, and the host side and export still go."""
    name = start(rig, domains, unique("bw-dp-live"))
    v = create_volume(rig)
    attach(rig, name, v.id)
    rig.lv().lookupByName(name).destroy()
    rig.detach(name, v.id)
    assert inactive_disks(rig, name) == []
    assert rig.nothing_left(name, v.id) == {}


def test_cold_attach_boots_from_the_volume_and_leaves_nothing(rig: Rig, domains: list[str]) -> None:
    """Boot from volume: a defined, shut-off domain without disks gets the volume in its definition with
    a boot order; the host side (QEMU's CHAP secret, the export) stays while it is there, survives an
    agent restart (reconcile keeps it), and the domain's start opens it."""
    name = unique("bw-dp-cold")
    rig.lv().defineXML(domain_xml(name))
    domains.append(name)
    v = create_volume(rig)
    a = attach(rig, name, v.id, disk=pb.DiskOptions(boot_order=1))
    assert a.state == pb.ATTACHMENT_STATE_ATTACHED
    (disk,) = inactive_disks(rig, name)
    assert disk.find("boot").get("order") == "1"
    definition = etree.fromstring(
        rig.lv().lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode()
    )
    assert definition.findall("os/boot") == []  # libvirt allows no <boot dev> beside a boot order
    assert len(rig.secrets()) == 1
    assert list(rig.targets().values()) == [[rig.agent_iqn()]]
    # a repeat returns the attachment
    assert attach(rig, name, v.id, disk=pb.DiskOptions(boot_order=1)).id == a.id
    # the agent restarts while the domain is shut off: reconcile keeps the attachment
    rig.agent_proc.stop()  # type: ignore[union-attr]
    rig.start_agent()
    assert len(rig.secrets()) == 1
    assert [x.state for x in rig.attachments(v.id)] == [pb.ATTACHMENT_STATE_ATTACHED]
    # virsh start: QEMU logs in with the secret and opens the LUN
    dom = rig.lv().lookupByName(name)
    dom.create()
    (live,) = rig.live_disks(name)
    assert live.find("boot").get("order") == "1"
    capacity, _allocation, _physical = dom.blockInfo(live.find("target").get("dev"))
    assert capacity == 8 * MIB
    assert rig.complete(name, v.id) == {}
    dom.destroy()
    rig.detach(name, v.id)
    assert inactive_disks(rig, name) == []
    assert rig.nothing_left(name, v.id) == {}


def test_cold_attach_killed_after_writing_the_definition_is_rolled_forward(
    rig: Rig, domains: list[str]
) -> None:
    """The agent killed after the disk went into a shut-off domain's definition: its restart finishes
    the attach (the definition is "what the guest sees" for a shut-off domain)."""
    name = unique("bw-dp-coldkill")
    rig.lv().defineXML(domain_xml(name))
    domains.append(name)
    v = create_volume(rig)
    rig.agent_proc.stop()  # type: ignore[union-attr]
    agent = rig.start_agent(failpoints=f"{FP_ATTACH_AFTER_HOTPLUG}=kill")
    try:
        err = refused(lambda: attach(rig, name, v.id, disk=pb.DiskOptions(boot_order=1)))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert agent.died() == KILLED
    finally:
        rig.start_agent()
    (record,) = rig.agent.ListAttachments(
        hpb.HostAgentServiceListAttachmentsRequest(), timeout=10
    ).attachments
    assert record.state == pb.ATTACHMENT_STATE_ATTACHED
    assert [a.state for a in rig.attachments(v.id)] == [pb.ATTACHMENT_STATE_ATTACHED]
    (disk,) = inactive_disks(rig, name)
    assert disk.find("boot").get("order") == "1"
    rig.detach(name, v.id)
    assert rig.nothing_left(name, v.id) == {}


def test_undefined_domain_is_cleaned_only_when_no_domain_has_the_disk(rig: Rig, domains: list[str]) -> None:
    """A cold attachment's domain undefined behind the agent's back, while another defined domain has
    the disk in its definition: the agent's restart keeps the attachment (host side, export, secret);
    once no domain has the disk, the next restart removes everything."""
    first, second = unique("bw-dp-undef"), unique("bw-dp-other")
    rig.lv().defineXML(domain_xml(first))
    domains.extend([first, second])
    v = create_volume(rig)
    attach(rig, first, v.id)
    (disk,) = inactive_disks(rig, first)
    other = etree.fromstring(domain_xml(second).encode())
    other.find("devices").append(disk)  # type: ignore[union-attr]
    rig.lv().defineXML(etree.tostring(other, encoding="unicode"))
    rig.lv().lookupByName(first).undefine()
    rig.agent_proc.stop()  # type: ignore[union-attr]
    rig.start_agent()
    assert len(rig.journal()) == 1
    assert len(rig.secrets()) == 1
    assert [a.state for a in rig.attachments(v.id)] == [pb.ATTACHMENT_STATE_ATTACHED]
    rig.lv().lookupByName(second).undefine()
    rig.agent_proc.stop()  # type: ignore[union-attr]
    rig.start_agent()
    assert rig.journal() == []
    assert rig.secrets() == []
    assert rig.attachments(v.id) == []
    assert rig.targets() == {}
    assert rig.volume(v.id).state == pb.VOLUME_STATE_AVAILABLE


def test_cinder_connection_info_attaches_and_detaches_like_our_own(rig: Rig, domains: list[str]) -> None:
    """Connection info in the shape Cinder's iSCSI drivers return reaches the LUN storage exported (CHAP
    included) through the real agent; unknown keys are refused before anything happens; detach and the
    attachment's deletion leave nothing."""
    name = start(rig, domains, unique("bw-dp-cinder"))
    v = create_volume(rig)
    connector = rig.agent.GetConnector(hpb.GetConnectorRequest(), timeout=10).connector
    att = rig.storage.CreateAttachment(
        spb.CreateAttachmentRequest(volume_id=v.id, connector=connector, domain=name), timeout=30
    ).attachment
    iscsi = att.connection_info.iscsi
    path = iscsi.paths[0]
    data = {  # the multipath shape (LIO with secondary addresses): lists beside the first path
        "target_discovered": False,
        "target_iqn": path.target_iqn,
        "target_portal": path.portal,
        "target_lun": path.lun,
        "target_iqns": [p.target_iqn for p in iscsi.paths],
        "target_portals": [p.portal for p in iscsi.paths],
        "target_luns": [p.lun for p in iscsi.paths],
        "volume_id": v.id,
        "auth_method": "CHAP",
        "auth_username": iscsi.chap.username,
        "auth_password": iscsi.chap.password,
        "encrypted": False,
        "qos_specs": None,
        "access_mode": "rw",
        "cacheable": False,
        "discard": False,
    }

    def request(**extra: object) -> hpb.AttachVolumeRequest:
        doc = {"driver_volume_type": "iscsi", "data": {**data, **extra}}
        return hpb.AttachVolumeRequest(
            domain=name, cinder_connection_info=json.dumps(doc), allow_unverified_identity=True
        )

    err = refused(lambda: rig.agent.AttachVolume(request(target_lunz=1), timeout=60))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown key target_lunz" in (err.details() or "")
    assert iscsi.chap.password not in (err.details() or "")
    assert rig.live_disks(name) == []
    assert rig.journal() == []

    rig.agent.AttachVolume(request(), timeout=60)
    (disk,) = rig.live_disks(name)
    source = disk.find("source")
    assert source is not None
    assert (source.get("protocol"), source.get("name")) == ("iscsi", f"{path.target_iqn}/{path.lun}")
    assert len(rig.journal()) == 1
    rig.detach(name, v.id)
    rig.storage.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=att.id), timeout=30)
    assert rig.nothing_left(name, v.id) == {}
