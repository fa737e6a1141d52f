"""Real libvirt + QEMU: more than seven SCSI disks hot-plugged onto one virtio-scsi controller.

libvirt's default address for a SCSI disk puts seven on a controller and then tries to hot-plug another
controller, which a running q35 domain refuses; the agent gives each disk an explicit unit instead.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from blockwire.runtime.clock import Deadline, SystemClock
from hostagent.model import Bus
from hostagent.virt.diskxml import DiskSpec, FileSource
from hostagent.virt.domains import LibvirtHypervisor
from tests.host.daemons import Started
from tests.rig import domain_xml

DISKS = 9


@pytest.fixture
def domain(host_daemons: Started) -> Iterator[str]:
    conn = libvirt.open("qemu:///system")
    name = f"bw-units-{uuid.uuid4().hex[:8]}"
    dom = conn.createXML(domain_xml(name), 0)
    try:
        yield name
    finally:
        dom.destroy()
        conn.close()


def _units(conn_uri: str, name: str) -> list[tuple[str, str]]:
    conn = libvirt.open(conn_uri)
    try:
        root = etree.fromstring(conn.lookupByName(name).XMLDesc(0).encode())
    finally:
        conn.close()
    return [
        (d.find("target").get("dev"), d.find("address").get("unit"))  # type: ignore[union-attr]
        for d in root.findall("devices/disk")
    ]


@pytest.fixture
def image_dir() -> Iterator[Path]:
    """QEMU runs as its own user: the images live in a directory it can traverse (pytest's is 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="bw-units-", dir="/var/tmp"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def test_nine_disks_on_one_controller_attach_and_detach_concurrently(domain: str, image_dir: Path) -> None:
    images = []
    for i in range(DISKS):
        image = image_dir / f"disk{i}.raw"
        image.write_bytes(b"\0" * (1 << 20))
        images.append(image)
    hv = LibvirtHypervisor("qemu:///system")
    try:

        def attach(image: Path) -> DiskSpec:
            return hv.attach_disk(
                domain, lambda dev: DiskSpec(source=FileSource(str(image)), target_dev=dev), bus=Bus.SCSI
            )

        with ThreadPoolExecutor(DISKS) as pool:
            specs = list(pool.map(attach, images))
        live = _units("qemu:///system", domain)
        assert len(live) == DISKS
        assert len({dev for dev, _ in live}) == DISKS
        assert sorted(int(unit) for _, unit in live) == list(range(DISKS))
        assert {s.address.unit for s in specs if s.address} == set(range(DISKS))

        with ThreadPoolExecutor(DISKS) as pool:
            removed = list(
                pool.map(lambda s: hv.detach_disk(domain, s.target_dev, Deadline(SystemClock(), 30)), specs)
            )
        assert removed == [True] * DISKS
        assert _units("qemu:///system", domain) == []
    finally:
        hv.close()
