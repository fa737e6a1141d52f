"""The NVMe/TCP connector behind HostAgent (fakes: hypervisor, storage, udev, the NVMe kernel): attach and
detach leave nothing; a failure at every attach step is undone; the all-or-nothing rule of reconcile;
a kept attachment that lost a controller gets that port connected again, nothing else touched."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from blockwire.errors import Unavailable
from blockwire.model import Connector, Transport
from blockwire.runtime import failpoints
from blockwire.runtime.failpoints import Failpoints
from hostagent.api import ATTACH_FAILPOINTS, HostAgent
from hostagent.connectors.nvme import NvmeConnector
from hostagent.events import EventBus
from hostagent.host.nvme import NvmeHost
from hostagent.host.sysfs import Sysfs
from hostagent.journal import Journal
from hostagent.model import AttachmentState, ConnectorKind
from tests.fakes.clock import FakeClock
from tests.fakes.hypervisor import FakeHypervisor
from tests.fakes.nvme import FakeNs, FakeNvmeKernel
from tests.fakes.openers import FakeOpeners
from tests.fakes.storage_api import FakeStorage
from tests.fakes.udev import FakeUdev
from tests.unit.hostagent.test_nvme import HOSTID, HOSTNQN, NGUID, NQN, P1, P2, UUID, info


class NvmeRig:
    def __init__(self, tmp_path: Path) -> None:
        self.udev = FakeUdev()
        self.kernel = FakeNvmeKernel(tmp_path / "sys", self.udev)
        self.kernel.export(NQN, (P1, P2), HOSTNQN, FakeNs(1, NGUID, UUID, 16 << 20))
        self.hv = FakeHypervisor()
        self.hv.add_domain("vm1")
        self.storage = FakeStorage(infos={"vol-1": info()})
        self.clock = FakeClock()
        self.journal = Journal(tmp_path / "state")
        self.conn = NvmeConnector(
            NvmeHost(Sysfs(tmp_path / "sys"), self.kernel.identify), self.kernel, self.udev, self.clock,
            openers=FakeOpeners(), host_nqn=HOSTNQN, host_id=HOSTID, device_timeout=5,
        )  # fmt: skip
        self.agent = self.new_agent()

    def new_agent(self) -> HostAgent:
        return HostAgent(
            hypervisor=self.hv,
            connectors={Transport.NVME_TCP: self.conn},
            journal=self.journal,
            connector=Connector(
                host="host-a", nvme_host_nqn=HOSTNQN, nvme_host_id=HOSTID, transports=(Transport.NVME_TCP,)
            ),
            clock=self.clock,
            storage=self.storage,
            events=EventBus(),
            failpoints=Failpoints(),
        )

    def nothing_left(self) -> None:
        assert self.kernel.controllers() == []
        assert self.kernel.heads() == []
        assert self.hv.disks_by_domain["vm1"] == []
        assert self.journal.all() == []


@pytest.fixture
def r(tmp_path: Path) -> NvmeRig:
    return NvmeRig(tmp_path)


def test_attach_hotplugs_the_head_and_detach_leaves_nothing(r: NvmeRig) -> None:
    a = r.agent.attach("vm1", volume_id="vol-1")
    assert a.state is AttachmentState.ATTACHED
    assert a.connector_kind is ConnectorKind.NVME_TCP
    (disk,) = r.hv.disks_by_domain["vm1"]
    assert "/dev/nvme0n1" in str(disk.source)
    assert r.agent.attach("vm1", volume_id="vol-1").attachment_id == a.attachment_id  # a repeat
    assert len(r.kernel.written) == 2
    r.agent.detach("vm1", "vol-1")
    r.nothing_left()
    r.agent.detach("vm1", "vol-1")  # a repeat is OK


@pytest.mark.parametrize("failpoint", ATTACH_FAILPOINTS[:-1])
def test_an_unexpected_failure_at_every_attach_step_leaves_nothing(r: NvmeRig, failpoint: str) -> None:
    with r.agent.failpoints.armed({failpoint: "raise"}), pytest.raises(failpoints.FailpointHit):
        r.agent.attach("vm1", volume_id="vol-1")
    r.nothing_left()
    assert r.agent.reconcile() == []


def test_a_refused_hotplug_is_undone(r: NvmeRig) -> None:
    r.hv.fail_attach = Unavailable("libvirt said no")
    with pytest.raises(Unavailable):
        r.agent.attach("vm1", volume_id="vol-1")
    r.nothing_left()


def test_a_crash_before_and_after_the_hotplug_all_or_nothing(r: NvmeRig) -> None:
    """What a SIGKILL after connect leaves (controllers, head, an ATTACHING record): the restarted agent
    rolls it back; after the hot-plug it rolls it forward."""
    r.agent.attach("vm1", volume_id="vol-1")
    a = r.journal.all()[0]
    live = list(r.hv.disks_by_domain["vm1"])
    r.hv.disks_by_domain["vm1"].clear()  # as if killed before the hot-plug
    r.journal.put(replace(a, state=AttachmentState.ATTACHING))
    (action,) = r.new_agent().reconcile()
    assert action.action == "rolled back"
    r.nothing_left()
    r.agent.attach("vm1", volume_id="vol-1")
    a = r.journal.all()[0]
    r.journal.put(replace(a, state=AttachmentState.ATTACHING))  # killed after the hot-plug
    (action,) = r.new_agent().reconcile()
    assert action.action == "finished"
    assert r.journal.all()[0].state is AttachmentState.ATTACHED
    assert len(r.kernel.controllers()) == 2
    assert len(r.hv.disks_by_domain["vm1"]) == len(live)
    r.agent.detach("vm1", "vol-1")
    r.nothing_left()


def test_reconcile_connects_a_port_the_kernel_gave_up_on(r: NvmeRig) -> None:
    r.agent.attach("vm1", volume_id="vol-1")
    r.kernel.drop("nvme1")  # ctrl_loss_tmo ran out on one port while the agent was down
    (action,) = r.new_agent().reconcile()
    assert action.action == "kept"
    assert sorted(c["name"] for c in r.kernel.controllers()) == ["nvme0", "nvme2"]
    assert r.kernel.heads() == ["nvme0n1"]
    r.agent.detach("vm1", "vol-1")
    r.nothing_left()
