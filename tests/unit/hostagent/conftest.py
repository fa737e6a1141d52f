"""Fixtures of the hostagent unit tier: a HostAgent on fakes (hypervisor, storage, udev, runner, clock)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from blockwire.model import Chap, ConnectionInfo, Connector, IscsiConnection, IscsiPath, Transport
from blockwire.runtime.failpoints import Failpoints
from blockwire.secret import Secret
from hostagent.api import HostAgent
from hostagent.connectors.iscsi_qemu import QemuIscsiConnector
from hostagent.connectors.local import LocalConnector
from hostagent.encryption import VolumeKeys
from hostagent.events import EventBus
from hostagent.host.sysfs import Sysfs
from hostagent.journal import Journal
from hostagent.tools.libiscsi import Libiscsi
from tests.fakes.clock import FakeClock
from tests.fakes.executor import FakeRunner, Reply
from tests.fakes.hypervisor import FakeHypervisor
from tests.fakes.storage_api import FakeStorage
from tests.fakes.udev import FakeUdev

DATA = Path(__file__).resolve().parents[2] / "data"
HOST_IQN = "iqn.2026-01.io.blockwire:host-a"
TARGET = "iqn.2026-01.io.blockwire:vol-1"
WWN = "6001405abcdef0123456789abcdef012"
PORTALS = ("127.0.0.1:3260", "127.0.0.2:3260")


def sample(name: str) -> str:
    text = (DATA / "samples" / name).read_text(errors="replace")
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


def iscsi_info(volume_id: str = "vol-1", *, wwn: str = WWN, password: str = "secretpass12") -> ConnectionInfo:
    return ConnectionInfo(
        transport=IscsiConnection(
            paths=(IscsiPath(PORTALS[0], TARGET, 1),),
            chap=Chap("user1", Secret(password)),
            initiator_iqn=HOST_IQN,
        ),
        volume_id=volume_id,
        wwn=wwn,
        serial="SERIAL1",
        size_bytes=16 << 20,
    )


def two_paths() -> ConnectionInfo:
    """The LUN of `iscsi_info` on both PORTALS, without CHAP: what the path checks work on."""
    return ConnectionInfo(
        transport=IscsiConnection(paths=tuple(IscsiPath(p, TARGET, 1) for p in PORTALS)),
        volume_id="vol-1",
        wwn=WWN,
    )


@dataclass
class Rig:
    agent: HostAgent
    hv: FakeHypervisor
    storage: FakeStorage
    udev: FakeUdev
    runner: FakeRunner
    clock: FakeClock
    journal: Journal
    state: Path


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    hv = FakeHypervisor()
    hv.add_domain("vm1")
    hv.add_domain("vm2")
    hv.add_domain("stopped", running=False)
    storage = FakeStorage(infos={"vol-1": iscsi_info()})
    udev = FakeUdev()
    runner = (
        FakeRunner()
        .on(r"iscsi-inq -e 1 -c 131", Reply(stdout=sample("iscsi_inq_vpd83_tgt_scsi_id.txt")))
        .on(r"iscsi-inq -e 1 -c 128", Reply(stdout=sample("iscsi_inq_vpd80_tgt.txt")))
    )
    clock = FakeClock()
    journal = Journal(tmp_path / "state")
    sysfs = Sysfs(tmp_path / "sys")
    agent = HostAgent(
        hypervisor=hv,
        connectors={
            Transport.ISCSI: QemuIscsiConnector(hv, Libiscsi(runner), initiator_iqn=HOST_IQN),
            Transport.LOCAL: LocalConnector(udev, sysfs, clock, device_timeout=5),
        },
        journal=journal,
        connector=Connector(host="host-a", initiator_iqn=HOST_IQN, transports=(Transport.ISCSI,)),
        clock=clock,
        storage=storage,
        events=EventBus(),
        failpoints=Failpoints(),
        volume_keys=VolumeKeys(hv),
    )
    return Rig(agent, hv, storage, udev, runner, clock, journal, tmp_path / "state")
