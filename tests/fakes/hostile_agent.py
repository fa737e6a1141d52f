"""A HostAgent on fakes for the hostile-input tests, in two flavours, with its recorders exposed:

* "qemu": QEMU's initiator (libiscsi tools) and the local connector: attaches reach the hypervisor, whose
  disk XML is kept (FakeHypervisor.attached_xml);
* "kernel": the kernel initiator (iscsiadm, multipath) and FC: every command line is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from blockwire.model import Connector, Transport
from hostagent.api import HostAgent
from hostagent.connectors.base import VolumeConnector
from hostagent.connectors.fc import FcConnector
from hostagent.connectors.iscsi import IscsiConnector
from hostagent.connectors.iscsi_qemu import QemuIscsiConnector
from hostagent.connectors.local import LocalConnector
from hostagent.host.sysfs import Sysfs
from hostagent.journal import Journal
from hostagent.tools.iscsiadm import Iscsiadm
from hostagent.tools.libiscsi import Libiscsi
from hostagent.tools.multipath import Multipath
from tests.fakes.clock import FakeClock
from tests.fakes.executor import FakeRunner
from tests.fakes.hypervisor import FakeHypervisor
from tests.fakes.openers import FakeOpeners
from tests.fakes.storage_api import FakeStorage
from tests.fakes.udev import FakeUdev

HOST_IQN = "iqn.2026-01.io.blockwire:hostile-host"


@dataclass
class HostileAgent:
    agent: HostAgent
    hv: FakeHypervisor
    runner: FakeRunner
    storage: FakeStorage
    state: Path


def hostile_agent(state: Path, flavour: str) -> HostileAgent:
    hv = FakeHypervisor()
    hv.add_domain("vm1")
    clock = FakeClock()
    runner = FakeRunner()
    udev = FakeUdev()
    sysfs = Sysfs(state / "sys")
    connectors: dict[Transport, VolumeConnector] = {
        Transport.LOCAL: LocalConnector(udev, sysfs, clock, device_timeout=1.0)
    }
    if flavour == "qemu":
        connectors[Transport.ISCSI] = QemuIscsiConnector(hv, Libiscsi(runner), initiator_iqn=HOST_IQN)
    else:
        multipath = Multipath(runner)
        openers = FakeOpeners()
        connectors[Transport.ISCSI] = IscsiConnector(
            Iscsiadm(runner, clock),
            sysfs,
            udev,
            multipath,
            clock,
            initiator_iqn=HOST_IQN,
            openers=openers,
            device_timeout=1.0,
        )
        connectors[Transport.FC] = FcConnector(
            sysfs, udev, multipath, clock, openers=openers, device_timeout=1.0
        )
    storage = FakeStorage()
    agent = HostAgent(
        hypervisor=hv,
        connectors=connectors,
        journal=Journal(state / "state"),
        connector=Connector(host="hostile-host", initiator_iqn=HOST_IQN, transports=(Transport.ISCSI,)),
        clock=clock,
        storage=storage,
    )
    return HostileAgent(agent, hv, runner, storage, state)
