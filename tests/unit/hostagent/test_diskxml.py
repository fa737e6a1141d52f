"""Disk XML: golden files for every source kind and option, and a parse that round-trips."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from blockwire.errors import InvalidArgument
from blockwire.model import IoTune
from hostagent.model import Bus, Cache, Discard, Io
from hostagent.virt.diskxml import (
    Auth,
    BlockSource,
    DiskSpec,
    DriveAddress,
    FileSource,
    NetHost,
    NetworkSource,
    disk_xml,
    next_drive_address,
    next_target_dev,
    parse_disk,
    parse_domain_disks,
)

GOLDEN = Path(__file__).resolve().parents[2] / "data" / "diskxml"

SPECS = {
    "block_scsi_minimal": DiskSpec(source=BlockSource("/dev/dm-3"), target_dev="sdb"),
    "block_full": DiskSpec(
        source=BlockSource("/dev/sdc"),
        target_dev="sdc",
        bus=Bus.SCSI,
        cache=Cache.NONE,
        io=Io.NATIVE,
        discard=Discard.UNMAP,
        iotune=IoTune(
            total_bytes_sec=0,
            read_bytes_sec=10485760,
            write_bytes_sec=5242880,
            read_iops_sec=500,
            write_iops_sec=250,
            total_bytes_sec_max=20971520,
            total_iops_sec_max=2000,
            size_iops_sec=4096,
            group_name="tenant-a",
        ),
        serial="vol-0123456789abcdef",
        wwn="5000c50015ea71ac",
        shareable=True,
        logical_block_size=512,
        physical_block_size=4096,
        address=DriveAddress(controller=1, unit=12),
    ),
    "file_virtio_readonly": DiskSpec(
        source=FileSource("/var/lib/blockwire/volumes/v1.raw"),
        target_dev="vdb",
        bus=Bus.VIRTIO,
        cache=Cache.WRITEBACK,
        io=Io.THREADS,
        discard=Discard.IGNORE,
        read_only=True,
        serial="v1",
    ),
    "file_sata_no_cache_attr": DiskSpec(
        source=FileSource("/srv/img.raw"), target_dev="sda", bus=Bus.SATA, cache=None, driver_type="raw"
    ),
    "network_iscsi_chap": DiskSpec(
        source=NetworkSource(
            protocol="iscsi",
            name="iqn.2026-01.io.blockwire:vol-1/1",
            hosts=(NetHost("127.0.0.1", 3260),),
            initiator_iqn="iqn.2026-01.io.blockwire:host-a",
            auth=Auth(username="user1", secret_type="iscsi", usage="blockwire/att-1"),
        ),
        target_dev="sdd",
        io=Io.THREADS,
        iotune=IoTune(total_iops_sec=1000),
        serial="vol-1",
    ),
    "network_rbd_two_monitors": DiskSpec(
        source=NetworkSource(
            protocol="rbd",
            name="volumes/vol-2",
            hosts=(NetHost("10.0.0.1", 6789), NetHost("10.0.0.2", 6789)),
            auth=Auth(username="cinder", secret_type="ceph", uuid="3e0b3b3c-6b39-4f4a-a2c6-6f1b1f0f7c11"),
        ),
        target_dev="vdc",
        bus=Bus.VIRTIO,
        discard=Discard.UNMAP,
    ),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_golden(name: str) -> None:
    path = GOLDEN / f"{name}.xml"
    text = disk_xml(SPECS[name])
    if os.environ.get("BLOCKWIRE_REGEN_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_round_trip(name: str) -> None:
    assert parse_disk(disk_xml(SPECS[name])) == SPECS[name]


LIVE_DOMAIN = """<domain type='kvm' id='7'>
  <name>vm1</name>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='threads'/>
      <source protocol='iscsi' name='iqn.2026-01.io.blockwire:vol-1/1' index='2'>
        <host name='127.0.0.1' port='3260'/>
        <initiator><iqn name='iqn.2026-01.io.blockwire:host-a'/></initiator>
        <auth username='user1'><secret type='iscsi' usage='blockwire/att-1'/></auth>
      </source>
      <target dev='sdd' bus='scsi'/>
      <iotune><total_iops_sec>1000</total_iops_sec></iotune>
      <serial>vol-1</serial>
      <alias name='scsi0-0-0-3'/>
      <address type='drive' controller='0' bus='0' target='0' unit='3'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <auth username='old'><secret type='iscsi' usage='legacy'/></auth>
      <source protocol='iscsi' name='iqn.x:y/0'><host name='h' port='3260'/></source>
      <target dev='sde' bus='scsi'/>
    </disk>
  </devices>
</domain>"""


def test_live_xml_keeps_auth_iotune_and_alias() -> None:
    first, second = parse_domain_disks(LIVE_DOMAIN)
    assert first.alias == "scsi0-0-0-3"
    # the address libvirt assigned is read back, never lost
    assert first.spec == replace(SPECS["network_iscsi_chap"], address=DriveAddress(0, 0, 0, 3))
    assert isinstance(second.spec.source, NetworkSource)
    assert second.spec.source.auth == Auth("old", "iscsi", "legacy")
    assert second.spec.cache is None


def test_unknown_enum_value_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match=r"disk\.driver\.cache"):
        parse_disk("<disk type='file' device='disk'><driver cache='bogus'/><target dev='sda'/></disk>")


def test_next_target_dev() -> None:
    assert next_target_dev(Bus.SCSI, set()) == "sda"
    assert next_target_dev(Bus.SCSI, {"sda", "sdb", "vda"}) == "sdc"
    assert next_target_dev(Bus.VIRTIO, {"vda"}) == "vdb"
    assert next_target_dev(Bus.SCSI, {f"sd{chr(ord('a') + i)}" for i in range(26)}) == "sdaa"
    assert next_target_dev(Bus.SCSI, {"sda"}, preferred="sdq") == "sdq"
    with pytest.raises(InvalidArgument):
        next_target_dev(Bus.SCSI, {"sda"}, preferred="sda")


UNITS_DOMAIN = """<domain type='kvm'>
  <devices>
    <controller type='scsi' index='1' model='virtio-scsi'/>
    <controller type='scsi' index='0' model='lsilogic'/>
    <disk type='file' device='disk'><target dev='sda' bus='scsi'/>
      <address type='drive' controller='1' bus='0' target='0' unit='0'/></disk>
    <disk type='file' device='disk'><target dev='sdb' bus='scsi'/>
      <address type='drive' controller='1' bus='0' target='0' unit='1'/></disk>
    <disk type='file' device='disk'><target dev='sdc' bus='scsi'/>
      <address type='drive' controller='0' bus='0' target='0' unit='2'/></disk>
  </devices>
</domain>"""


def test_next_drive_address_takes_the_first_free_unit_of_the_virtio_scsi_controller() -> None:
    assert next_drive_address(UNITS_DOMAIN) == DriveAddress(controller=1, unit=2)


def test_next_drive_address_goes_past_seven_units() -> None:
    disks = "".join(
        f"<disk type='file'><target dev='sd{chr(97 + u)}' bus='scsi'/>"
        f"<address type='drive' controller='0' bus='0' target='0' unit='{u}'/></disk>"
        for u in range(9)
    )
    xml = (
        f"<domain><devices><controller type='scsi' index='0' model='virtio-scsi'/>{disks}</devices></domain>"
    )
    assert next_drive_address(xml) == DriveAddress(controller=0, unit=9)


def test_next_drive_address_counts_the_persistent_definition_too() -> None:
    live = "<domain><devices><controller type='scsi' index='0' model='virtio-scsi'/></devices></domain>"
    config = (
        "<domain><devices><disk type='file'><target dev='sda' bus='scsi'/>"
        "<address type='drive' controller='0' bus='0' target='0' unit='0'/></disk></devices></domain>"
    )
    assert next_drive_address(live, config) == DriveAddress(controller=0, unit=1)


def test_next_drive_address_without_virtio_scsi_leaves_it_to_libvirt() -> None:
    assert next_drive_address("<domain><devices/></domain>") is None
