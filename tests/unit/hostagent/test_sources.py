"""What a connect made usable -> the disk's <source> (hostagent.virt.sources): golden XML per transport.

The golden files in tests/data/sources/ were written by the connectors' own `disk_source` before the
mapping left them (commit f81fd7e): the pure mapping must give the same XML for the same volume.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockwire.model import Chap, ConnectionInfo, IscsiConnection, IscsiPath, LocalConnection
from blockwire.secret import Secret
from hostagent.connectors.iscsi_qemu import QemuIscsiConnector
from hostagent.connectors.local import LocalConnector
from hostagent.host.sysfs import Sysfs
from hostagent.model import HostDevice, NetworkTarget, SecretRef
from hostagent.tools.libiscsi import EXIT_LOGIN_FAILED, Libiscsi
from hostagent.virt.diskxml import DiskSpec, FileSource, disk_xml
from hostagent.virt.sources import disk_source
from tests.fakes.clock import FakeClock
from tests.fakes.executor import FakeRunner, Reply
from tests.fakes.hypervisor import FakeHypervisor
from tests.fakes.udev import FakeUdev
from tests.unit.hostagent.conftest import HOST_IQN, PORTALS, TARGET, WWN, sample

GOLDEN = Path(__file__).resolve().parents[2] / "data" / "sources"


def iscsi(*, chap: bool, paths: int = 1, attachment_id: str = "att-1") -> ConnectionInfo:
    return ConnectionInfo(
        transport=IscsiConnection(
            paths=tuple(IscsiPath(p, TARGET, 1) for p in PORTALS[:paths]),
            chap=Chap("user1", Secret("secretpass12")) if chap else None,
            initiator_iqn=HOST_IQN if chap else "",
        ),
        volume_id="vol-1",
        attachment_id=attachment_id,
        wwn=WWN,
        serial="SERIAL1",
    )


def qemu_connect(info: ConnectionInfo, *, first_portal_down: bool = False) -> HostDevice:
    """What the QEMU connector's connect returns (libiscsi's tools on recorded output)."""
    runner = (
        FakeRunner()
        .on(r"iscsi-inq -e 1 -c 131", Reply(stdout=sample("iscsi_inq_vpd83_tgt_scsi_id.txt")))
        .on(r"iscsi-inq -e 1 -c 128", Reply(stdout=sample("iscsi_inq_vpd80_tgt.txt")))
    )
    if first_portal_down:
        runner.on(r"127\.0\.0\.1:3260", Reply(returncode=EXIT_LOGIN_FAILED, stderr="connect: refused"))
    return QemuIscsiConnector(FakeHypervisor(), Libiscsi(runner), initiator_iqn=HOST_IQN).connect(info)


CASES = {
    "iscsi_qemu_chap": lambda: qemu_connect(iscsi(chap=True)),
    "iscsi_qemu_no_chap_second_portal": lambda: qemu_connect(
        iscsi(chap=False, paths=2, attachment_id=""), first_portal_down=True
    ),
    # what ScsiDevices.assemble returns for the kernel iSCSI and FC connectors
    "iscsi_kernel_multipath": lambda: HostDevice(
        path="/dev/dm-3", wwn=WWN, multipath_name="mpatha", path_devices=("/dev/sdc", "/dev/sdd")
    ),
    "fc_single_disk": lambda: HostDevice(path="/dev/sde", wwn=WWN, path_devices=("/dev/sde",)),
    # what LocalConnector.connect returns for a block device and for a regular file
    "local_block": lambda: HostDevice(path="/dev/loop7", size_bytes=1 << 20),
    "local_file": lambda: HostDevice(path="/srv/vol-1.raw", size_bytes=1 << 20, is_file=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_source_is_the_xml_the_connectors_wrote(name: str) -> None:
    path = GOLDEN / f"{name}.xml"
    text = disk_xml(DiskSpec(source=disk_source(CASES[name]()), target_dev="sdb", serial="vol-1"))
    if os.environ.get("BLOCKWIRE_REGEN_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_the_qemu_connector_says_what_qemu_opens_and_with_which_secret() -> None:
    device = qemu_connect(iscsi(chap=True))
    assert device.qemu_native
    assert device.path == ""
    assert device.network == NetworkTarget(
        protocol="iscsi",
        name=f"{TARGET}/1",
        hosts=(("127.0.0.1", 3260),),
        initiator_iqn=HOST_IQN,
        auth=SecretRef("user1", "blockwire/vol-1/att-1", "iscsi"),
    )
    assert "secretpass12" not in repr(device)


def test_a_local_file_is_a_file_source(tmp_path: Path) -> None:
    image = tmp_path / "vol.raw"
    image.write_bytes(b"\0" * 4096)
    conn = LocalConnector(FakeUdev(), Sysfs(tmp_path / "sys"), FakeClock(), device_timeout=1)
    device = conn.connect(ConnectionInfo(transport=LocalConnection(str(image)), volume_id="vol-1"))
    assert device == HostDevice(path=str(image), size_bytes=4096, is_file=True)
    assert disk_source(device) == FileSource(str(image))
