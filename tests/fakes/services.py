"""Both real services in process: the real StorageService (StorageRig: file backend, FakeExporter) and a
real HostAgent behind the real HostAgentServicer, each on its own in-process gRPC server.

The agent talks to the served storage through its real StorageApi (GrpcStorageApi over the SDK), so an
attach leaves what a real attach leaves on both sides. Its seams are fakes: FakeHypervisor (domains
vm1 and vm2), QEMU's iSCSI connector over a FakeRunner whose libiscsi tools answer for the LUNs the
FakeExporter holds (the volume's WWN, serial and file size), FakeUdev, FakeClock. A Faults interceptor
stands in front of each servicer for what a real service cannot be driven into (UNAVAILABLE, a hang).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from blockwire.model import Connector, Transport
from blockwire.runtime.failpoints import Failpoints
from hostagent.api import HostAgent
from hostagent.connectors.iscsi_qemu import QemuIscsiConnector
from hostagent.connectors.local import LocalConnector
from hostagent.events import EventBus, Subscription
from hostagent.host.sysfs import Sysfs
from hostagent.journal import Journal
from hostagent.rpc.servicer import HostAgentServicer
from hostagent.rpc.storage_client import GrpcStorageApi, channel_for
from hostagent.tools.libiscsi import Libiscsi
from tests.fakes.clock import FakeClock
from tests.fakes.executor import FakeRunner, Reply
from tests.fakes.exporter import FakeExporter
from tests.fakes.faults import Faults
from tests.fakes.grpc_server import Running, serve
from tests.fakes.hypervisor import FakeHypervisor
from tests.fakes.storage_rig import StorageRig
from tests.fakes.udev import FakeUdev

HOST = "compute1"
HOST_IQN = "iqn.2026-01.io.blockwire.test:compute1"
DOMAINS = ("vm1", "vm2")

_URL = re.compile(r"iscsi://(?:[^@/]*@)?[^/]+/(?P<iqn>[^/]+)/(?P<lun>\d+)$")


def libiscsi_answers(exporter: FakeExporter) -> FakeRunner:
    """A FakeRunner whose iscsi-inq and iscsi-readcapacity16 answer as the exporter's LUN would."""

    def lun_of(argv: tuple[str, ...]):  # type: ignore[no-untyped-def]
        m = _URL.search(argv[-1])
        target = exporter.targets.get(m.group("iqn")) if m else None
        return target.lun if target is not None else None

    def vpd83(argv: tuple[str, ...]) -> Reply:
        lun = lun_of(argv)
        if lun is None:
            return Reply(returncode=1, stderr="iscsi-inq: no such LUN")
        text = (
            "Page Code:(0x83) DEVICE_IDENTIFICATION\nDEVICE DESIGNATOR #0\nCode Set:(2) ASCII\nPIV:0\n"
            f"Association:(0) LOGICAL_UNIT\nDesignator Type:(1) T10_VENDORT_ID\nDesignator:[{lun.wwn}]\n"
        )
        return Reply(stdout=text)

    def vpd80(argv: tuple[str, ...]) -> Reply:
        lun = lun_of(argv)
        if lun is None:
            return Reply(returncode=1, stderr="iscsi-inq: no such LUN")
        return Reply(stdout=f"Unit Serial Number:[{lun.serial:>40}]\n")

    def capacity(argv: tuple[str, ...]) -> Reply:
        lun = lun_of(argv)
        if lun is None:
            return Reply(returncode=1, stderr="iscsi-readcapacity16: no such LUN")
        return Reply(stdout=f"Total size:{os.path.getsize(lun.device_path)}\n")

    return (
        FakeRunner()
        .on(r"iscsi-inq -e 1 -c 131", vpd83)
        .on(r"iscsi-inq -e 1 -c 128", vpd80)
        .on(r"iscsi-readcapacity16", capacity)
    )


class WatchedBus(EventBus):
    """The agent's EventBus, telling a test when a WatchEvents stream has subscribed: the only moment
    from which that stream is sure to get every later event."""

    def __init__(self) -> None:
        super().__init__()
        self._subscribed = threading.Condition()
        self.subscribers = 0

    def subscribe(self) -> Subscription:
        sub = super().subscribe()
        with self._subscribed:
            self.subscribers += 1
            self._subscribed.notify_all()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        super().unsubscribe(sub)
        with self._subscribed:
            self.subscribers -= 1

    def wait_subscribed(self, count: int = 1, timeout: float = 5.0) -> bool:
        with self._subscribed:
            return self._subscribed.wait_for(lambda: self.subscribers >= count, timeout=timeout)


@dataclass
class Services:
    storage: StorageRig
    storage_server: Running
    agent: HostAgent
    events: WatchedBus
    hv: FakeHypervisor
    runner: FakeRunner
    agent_server: Running
    storage_faults: Faults  # in front of each servicer: refusals, holds and call counts by method
    agent_faults: Faults


@contextmanager
def services(root: Path, *, domains: tuple[str, ...] = DOMAINS) -> Iterator[Services]:
    """Serves a real StorageService and a real HostAgent (using that storage) until the block ends."""
    with ExitStack() as stack:
        rig = StorageRig.make(root / "storage")
        stack.callback(rig.close)
        storage_faults, agent_faults = Faults(), Faults()
        storage_server = stack.enter_context(serve(rig.servicer, interceptors=[storage_faults]))
        channel: grpc.Channel = channel_for(storage_server.address)
        stack.callback(channel.close)
        hv = FakeHypervisor()
        for name in domains:
            hv.add_domain(name)
        runner = libiscsi_answers(rig.exporter)
        clock = FakeClock()
        events = WatchedBus()
        agent = HostAgent(
            hypervisor=hv,
            connectors={
                Transport.ISCSI: QemuIscsiConnector(hv, Libiscsi(runner), initiator_iqn=HOST_IQN),
                Transport.LOCAL: LocalConnector(FakeUdev(), Sysfs(root / "sys"), clock, device_timeout=5),
            },
            journal=Journal(root / "agent-state"),
            connector=Connector(host=HOST, initiator_iqn=HOST_IQN, transports=(Transport.ISCSI,)),
            clock=clock,
            storage=GrpcStorageApi(channel, timeout=10),
            events=events,
            failpoints=Failpoints(),
        )
        agent_server = stack.enter_context(serve(HostAgentServicer(agent), interceptors=[agent_faults]))
        stack.callback(storage_faults.release.set)  # first on the way out: no held call outlives the block
        stack.callback(agent_faults.release.set)
        yield Services(
            rig, storage_server, agent, events, hv, runner, agent_server, storage_faults, agent_faults
        )
