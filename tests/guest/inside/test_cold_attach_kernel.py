"""Cold attach (boot from volume) on the kernel path, through blockwire's own daemons (iscsi_mode
"kernel", tgt on two portals): AttachVolume to a defined, shut-off domain logs in on both portals,
builds the multipath map (WWN checked) and writes the map into the domain's definition with a boot
order; the host side stays while the domain is shut off; `virsh start` opens the map (live XML); data
through the map is in the volume's file; after `virsh destroy` the host side is still there (the
definition has the disk); DetachVolume removes the disk from the definition and leaves nothing on the
host (no sd device, dm map, session, node record or by-path link).
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

from blockwire.v1 import types_pb2 as pb
from tests.guest.inside import kernel
from tests.guest.inside.conftest import Stack
from tests.rig import domain_xml


def definition_disks(domain: str) -> list[ET.Element]:
    return ET.fromstring(kernel.virsh("dumpxml", "--inactive", domain).stdout).findall("devices/disk")


def test_cold_attach_kernel_path_boots_from_the_map_and_leaves_nothing(
    clean_host: None, tgt_stack: Stack, libvirtd: None
) -> None:
    s = tgt_stack
    name = f"bw-cold-{uuid.uuid4().hex[:8]}"
    xml = Path(f"/tmp/{name}.xml")
    xml.write_text(
        domain_xml(name, virt_type="qemu", machine="pc", memory_mib=32, scsi_controllers=2, acpi=True)
    )
    kernel.virsh("define", str(xml))
    xml.unlink()
    vol = s.storage.create_volume(f"cold-{uuid.uuid4().hex[:6]}", 64 * kernel.MiB, backend="file")
    vol = s.storage.wait_volume(vol.id, timeout=120)
    attached = False
    try:
        att = s.agent.attach_volume(name, volume_id=vol.id, disk=pb.DiskOptions(boot_order=1))
        attached = True
        ci = att.connection_info
        iqn = ci.iscsi.paths[0].target_iqn
        wwid = f"3{ci.wwn}"
        # the host side, made while the domain is shut off: both sessions, the map, the WWN checked
        assert sorted(kernel.session_ids(iqn)) == sorted(kernel.PORTALS)
        map_name = kernel.map_for(wwid)
        assert map_name, f"no multipath map for {wwid}: {kernel.maps()}"
        assert att.host_device == f"/dev/{kernel.dm_device(map_name)}"
        (disk,) = definition_disks(name)
        assert disk.find("source").get("dev") == att.host_device  # type: ignore[union-attr]
        assert disk.find("boot").get("order") == "1"  # type: ignore[union-attr]

        # virsh start: QEMU opens the map
        kernel.virsh("start", name, timeout=120)
        live = [d for d in kernel.domain_disks(name) if d.target == att.target_dev]
        assert [(d.bus, d.source) for d in live] == [("scsi", att.host_device)]
        pattern = kernel.write_pattern(att.host_device, 7)
        assert kernel.read_at(s.volume_file(vol.id), 7) == pattern

        # stopped again: the definition still has the disk, so the host side stays
        kernel.virsh("destroy", name, timeout=60)
        assert kernel.map_for(wwid) == map_name
        assert sorted(kernel.session_ids(iqn)) == sorted(kernel.PORTALS)

        s.agent.detach_volume(name, vol.id)
        attached = False
        assert definition_disks(name) == []
        kernel.settle()
        assert kernel.leftovers() == {}
    finally:
        if attached:
            kernel.virsh("destroy", name, ok=(0, 1))
            s.agent.detach_volume(name, vol.id, force=True)
        kernel.virsh("destroy", name, ok=(0, 1))
        kernel.virsh("undefine", name, ok=(0, 1))
        s.storage.delete_volume(vol.id)
