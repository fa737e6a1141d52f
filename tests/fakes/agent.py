"""A HostAgent wired to fakes (hypervisor, storage, udev, runner, clock): the contract tier serves it."""

from __future__ import annotations

from pathlib import Path

from blockwire.model import Connector, Transport
from hostagent.api import HostAgent
from hostagent.connectors.iscsi_qemu import QemuIscsiConnector
from hostagent.connectors.local import LocalConnector
from hostagent.host.sysfs import Sysfs
from hostagent.journal import Journal
from hostagent.tools.libiscsi import Libiscsi
from tests.fakes.clock import FakeClock
from tests.fakes.executor import FakeRunner
from tests.fakes.hypervisor import FakeHypervisor
from tests.fakes.storage_api import FakeStorage
from tests.fakes.udev import FakeUdev

FAKE_IQN = "iqn.2026-01.io.blockwire:fake-host"


def fake_agent(state_dir: Path) -> HostAgent:
    hv = FakeHypervisor()
    hv.add_domain("vm1")
    clock = FakeClock()
    return HostAgent(
        hypervisor=hv,
        connectors={
            Transport.ISCSI: QemuIscsiConnector(hv, Libiscsi(FakeRunner()), initiator_iqn=FAKE_IQN),
            Transport.LOCAL: LocalConnector(FakeUdev(), Sysfs(state_dir / "sys"), clock),
        },
        journal=Journal(state_dir / "state"),
        connector=Connector(host="fake-host", initiator_iqn=FAKE_IQN, transports=(Transport.ISCSI,)),
        clock=clock,
        storage=FakeStorage(),
    )
