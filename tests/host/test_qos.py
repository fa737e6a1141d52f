"""Host tier, all real: a volume type's QoS specs reach the disk. blockwire-storage and blockwire-agent
daemons (tests/fakes/daemon_rig.py), tgtd, libvirtd + QEMU (a no-OS kvm domain).

A volume of a type with QoS specs (a per-GB total bytes limit and read/write iops limits) is attached
through the agent to a running domain: `virsh dumpxml` shows the <iotune> with the per-GB limit
multiplied by the volume's size, and `virsh blkdeviotune` shows QEMU applied it. Detach leaves nothing.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator

import libvirt
import pytest
from lxml import etree

from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import types_pb2 as pb
from tests.fakes.daemon_rig import Rig, define_domain, force_cleanup, remove_domain
from tests.host.daemons import Started, Tgtd

MIB = 1 << 20
GIB = 1 << 30


@pytest.fixture(scope="module")
def virt(host_daemons: Started) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open("qemu:///system")
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def rig(
    host_daemons: Started, tgtd: Tgtd, tmp_path_factory: pytest.TempPathFactory, virt: libvirt.virConnect
) -> Iterator[Rig]:
    with Rig(work=tmp_path_factory.mktemp("qos"), tgtd=tgtd, virt=virt).running() as r:
        yield r


@pytest.fixture
def domain(rig: Rig, virt: libvirt.virConnect) -> Iterator[str]:
    name = define_domain(virt, "bw-qos")
    try:
        yield name
    finally:
        force_cleanup(rig, name)
        remove_domain(virt, name)


def virsh(*args: str) -> str:
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout


def test_a_types_qos_specs_reach_the_disk_xml_and_qemu(rig: Rig, domain: str) -> None:
    storage = rig.storage
    tag = uuid.uuid4().hex[:6]
    qos = storage.CreateQosSpecs(
        spb.CreateQosSpecsRequest(
            name=f"qos-{tag}",
            specs={"total_bytes_sec_per_gb": str(10 * MIB), "read_iops_sec": "400", "write_iops_sec": "300"},
        ),
        timeout=10,
    ).qos_specs
    vtype = storage.CreateVolumeType(
        spb.CreateVolumeTypeRequest(
            name=f"limited-{tag}", extra_specs={"thin_provisioning": "<is> True"}, qos_specs=qos.name
        ),
        timeout=10,
    ).volume_type
    size = 1536 * MIB  # 1.5 GiB: the per-GB limit counts 2 GiB (sparse file: no space used)
    v = storage.CreateVolume(
        spb.CreateVolumeRequest(name=f"qos-vol-{tag}", size_bytes=size, volume_type=vtype.name), timeout=60
    ).volume
    rig.volume_ids.add(v.id)
    assert v.volume_type == vtype.name
    assert v.backend == "file"  # the scheduler's only candidate

    a = rig.attach(domain, v.id)
    assert a.state == pb.ATTACHMENT_STATE_ATTACHED
    want = {"total_bytes_sec": 20 * MIB, "read_iops_sec": 400, "write_iops_sec": 300}

    # the connection info storage issued
    issued = storage.GetAttachment(spb.GetAttachmentRequest(attachment_id=a.id), timeout=10)
    got_qos = issued.attachment.connection_info.qos
    assert {k: getattr(got_qos, k) for k in want} == want

    # the live disk XML
    root = etree.fromstring(virsh("dumpxml", domain).encode())
    (disk,) = root.findall("devices/disk")
    assert disk.find(f"target[@dev='{a.target_dev}']") is not None
    iotune = disk.find("iotune")
    assert iotune is not None, etree.tostring(disk).decode()
    assert {el.tag: int(el.text or "0") for el in iotune} == want

    # what QEMU applies (libvirt asks QEMU: query-block's throttle values)
    out = virsh("blkdeviotune", domain, a.target_dev)
    applied = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s*:\s*(\d+)\s*$", out, re.M)}
    assert {k: applied[k] for k in want} == want, out
    assert applied["read_bytes_sec"] == 0
    assert applied["total_iops_sec"] == 0

    rig.detach(domain, v.id)
    assert rig.nothing_left(domain, v.id) == {}
    rig.delete_volume(v.id)
    storage.DeleteVolumeType(spb.DeleteVolumeTypeRequest(volume_type=vtype.id), timeout=10)
    storage.DeleteQosSpecs(spb.DeleteQosSpecsRequest(qos_specs=qos.id), timeout=10)


def test_a_volume_without_a_type_gets_no_iotune(rig: Rig, domain: str) -> None:
    v = rig.create_volume()
    a = rig.attach(domain, v.id)
    (disk,) = rig.live_disks(domain)
    assert disk.find("iotune") is None
    out = virsh("blkdeviotune", domain, a.target_dev)
    assert re.search(r"^total_bytes_sec\s*:\s*0\s*$", out, re.M), out
    rig.detach(domain, v.id)
    rig.delete_volume(v.id)
