"""Reconcile of a kept kernel attachment that lost some of its paths: only the lost paths are logged in
again (PathRestorer), never `connect` (which undoes everything it finds when it fails) and never a
disconnect, whatever the restore does."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from blockwire.errors import Unavailable
from blockwire.model import ConnectionInfo, Connector, Transport
from hostagent.api import HostAgent, PathRestorer
from hostagent.connectors.base import iscsi_of
from hostagent.events import EventBus
from hostagent.journal import Journal
from hostagent.model import AttachmentState, ConnectorKind, HostDevice
from tests.fakes.clock import FakeClock
from tests.fakes.hypervisor import FakeHypervisor
from tests.fakes.storage_api import FakeStorage
from tests.unit.hostagent.conftest import HOST_IQN, WWN, two_paths


@dataclass
class KernelLike:
    """A multipath connector: `have` devices are present; restore_paths adds the rest or fails."""

    kind: ConnectorKind = ConnectorKind.ISCSI_KERNEL
    have: list[str] = field(default_factory=lambda: ["/dev/sda", "/dev/sdb"])
    restore_fails: bool = False
    calls: list[str] = field(default_factory=list)

    def validate(self, info: ConnectionInfo) -> None:
        pass

    def connect(self, info: ConnectionInfo) -> HostDevice:
        self.calls.append("connect")
        return HostDevice(path="/dev/dm-0", wwn=WWN, path_devices=tuple(self.have))

    def disconnect(self, info: ConnectionInfo, force: bool = False) -> None:
        self.calls.append("disconnect")

    def extend(self, info: ConnectionInfo) -> int:
        return 0

    def paths(self, info: ConnectionInfo) -> list[str]:
        return list(self.have)

    def restore_paths(self, info: ConnectionInfo) -> list[str]:
        self.calls.append("restore_paths")
        if self.restore_fails:
            raise Unavailable("iscsiadm exited with 8: could not log in to 127.0.0.2:3260")
        self.have.append("/dev/sdc")
        return ["/dev/sdc"]

    def expected_paths(self, info: ConnectionInfo) -> int:
        return len(iscsi_of(info).paths)


def attached(tmp_path: Path, conn: KernelLike) -> HostAgent:
    hv = FakeHypervisor()
    hv.add_domain("vm1")
    agent = HostAgent(
        hypervisor=hv,
        connectors={Transport.ISCSI: conn},
        journal=Journal(tmp_path / "state"),
        connector=Connector(host="host-a", initiator_iqn=HOST_IQN, transports=(Transport.ISCSI,)),
        clock=FakeClock(),
        storage=FakeStorage(infos={"vol-1": two_paths()}),
        events=EventBus(),
    )
    agent.attach("vm1", volume_id="vol-1")
    conn.calls.clear()
    return agent


def test_the_kernel_connector_restores_paths() -> None:
    from hostagent.connectors.iscsi import IscsiConnector  # noqa: PLC0415

    assert issubclass(IscsiConnector, PathRestorer)


def test_a_kept_attachment_that_lost_a_path_has_only_that_path_restored(tmp_path: Path) -> None:
    conn = KernelLike()
    agent = attached(tmp_path, conn)
    conn.have = ["/dev/sda"]  # one session lost while the agent was down
    (action,) = agent.reconcile()
    assert (action.action, action.detail) == ("kept", "paths restored (2 of 2)")
    assert conn.calls == ["restore_paths"]


def test_a_failed_restore_keeps_the_attachment_degraded_and_touches_nothing(tmp_path: Path) -> None:
    conn = KernelLike(restore_fails=True)
    agent = attached(tmp_path, conn)
    conn.have = ["/dev/sda"]
    (action,) = agent.reconcile()
    assert (action.action, action.detail) == ("kept", "degraded: 1 of 2 paths")
    assert conn.calls == ["restore_paths"]  # no connect, no disconnect: the guest's map stays
    assert agent.journal.get("vol-1", "vm1").state is AttachmentState.ATTACHED  # type: ignore[union-attr]


def test_no_path_left_is_reported_and_nothing_is_tried(tmp_path: Path) -> None:
    conn = KernelLike()
    agent = attached(tmp_path, conn)
    conn.have = []
    (action,) = agent.reconcile()
    assert action.action == "kept"
    assert action.detail.startswith("degraded: no path")
    assert conn.calls == []
