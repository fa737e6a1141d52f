"""<encryption> in disk XML: golden files and round trips for encrypted block and network disks, and the
element as libvirt may show it (inside <source>)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hostagent.model import Bus, Io
from hostagent.virt.diskxml import (
    Auth,
    BlockSource,
    DiskEncryption,
    DiskSpec,
    NetHost,
    NetworkSource,
    disk_xml,
    moved_disk_xml,
    parse_disk,
    replace_disk_sources,
)

GOLDEN = Path(__file__).resolve().parents[2] / "data" / "diskxml"
UUID = "6f1b1f0f-7c11-4f4a-a2c6-3e0b3b3c6b39"

SPECS = {
    "network_iscsi_luks": DiskSpec(
        source=NetworkSource(
            protocol="iscsi",
            name="iqn.2026-01.io.blockwire:vol-1/1",
            hosts=(NetHost("127.0.0.1", 3260),),
            initiator_iqn="iqn.2026-01.io.blockwire:host-a",
            auth=Auth(username="user1", secret_type="iscsi", usage="blockwire/vol-1/att-1"),
        ),
        target_dev="sdd",
        io=Io.THREADS,
        serial="vol-1",
        encryption=DiskEncryption(secret_uuid=UUID),
    ),
    "block_luks": DiskSpec(
        source=BlockSource("/dev/mapper/3600140512345678"),
        target_dev="vdb",
        bus=Bus.VIRTIO,
        serial="vol-2",
        encryption=DiskEncryption(secret_uuid=UUID),
    ),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_golden(name: str) -> None:
    path = GOLDEN / f"{name}.xml"
    text = disk_xml(SPECS[name])
    if os.environ.get("BLOCKWIRE_REGEN_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()
    assert '<encryption format="luks" engine="qemu">' in text
    assert f'<secret type="passphrase" uuid="{UUID}"/>' in text


@pytest.mark.parametrize("name", sorted(SPECS))
def test_round_trip(name: str) -> None:
    assert parse_disk(disk_xml(SPECS[name])) == SPECS[name]


def test_encryption_inside_source_is_read() -> None:
    xml = f"""<disk type='block' device='disk'><driver name='qemu' type='raw'/>
      <source dev='/dev/sdb'><encryption format='luks' engine='qemu'>
      <secret type='passphrase' uuid='{UUID}'/></encryption></source>
      <target dev='sdb' bus='scsi'/></disk>"""
    assert parse_disk(xml).encryption == DiskEncryption(secret_uuid=UUID)


def test_unencrypted_disk_has_none() -> None:
    assert parse_disk(disk_xml(DiskSpec(source=BlockSource("/dev/sdb"), target_dev="sdb"))).encryption is None


OTHER = "0b7c2d55-3c6e-4c3a-9d51-5c3f0b8f7a10"


@pytest.mark.parametrize("inside_source", [False, True])
def test_a_moved_disk_names_the_destinations_secret_once(inside_source: bool) -> None:
    """A live migration's destination disk: the source host's <encryption> (at disk level, or inside
    <source> as libvirt may show it) is replaced by the destination's own secret; the rest is kept."""
    enc = f"<encryption format='luks' engine='qemu'><secret type='passphrase' uuid='{UUID}'/></encryption>"
    source = f"<source dev='/dev/sdb'>{enc}</source>" if inside_source else f"<source dev='/dev/sdb'/>{enc}"
    domain = f"""<domain type='kvm'><name>d</name><devices><disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>{source}<target dev='sdb' bus='scsi'/><serial>vol-2</serial>
      </disk></devices></domain>"""
    moved = BlockSource("/dev/mapper/3600140512345678")
    mine = DiskEncryption(secret_uuid=OTHER)
    for xml in (
        moved_disk_xml(domain, "sdb", moved, mine),
        replace_disk_sources(domain, {"sdb": moved}, {"sdb": mine}),
    ):
        assert UUID not in xml
        assert xml.count("<encryption") == 1
        assert f'<secret type="passphrase" uuid="{OTHER}"/>' in xml
        assert "/dev/mapper/3600140512345678" in xml
        assert "<serial>vol-2</serial>" in xml
    spec = parse_disk(moved_disk_xml(domain, "sdb", moved, mine))
    assert spec.encryption == mine
    assert spec.source == moved
    # an unencrypted volume's disk: nothing added, nothing taken
    plain = parse_disk(moved_disk_xml(domain.replace(enc, ""), "sdb", moved))
    assert plain.encryption is None
