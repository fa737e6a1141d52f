"""Reliability on fakes: an unexpected failure at every step undoes everything; a record left by a
crash is finished or rolled back by reconcile; a missed udev event is found by the re-check at the
deadline; an unanswered CreateAttachment is cleaned up by the repeat."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import pytest

from blockwire.errors import DeadlineExceeded, Unavailable
from blockwire.model import ConnectionInfo, LocalConnection
from blockwire.runtime import failpoints
from blockwire.runtime.clock import Deadline
from hostagent import api
from hostagent.connectors.iscsi_qemu import QemuIscsiConnector
from hostagent.connectors.local import LocalConnector
from hostagent.host.sysfs import Sysfs
from hostagent.host.udev import Match, UdevDevice
from hostagent.model import AttachmentState
from hostagent.tools.libiscsi import Libiscsi
from tests.fakes.clock import FakeClock
from tests.fakes.hypervisor import FakeHypervisor
from tests.fakes.udev import FakeUdev
from tests.unit.hostagent.conftest import HOST_IQN, Rig, iscsi_info


def nothing_left(rig: Rig) -> None:
    assert rig.journal.all() == []
    assert rig.storage.exports == {}
    assert rig.hv.secrets == {}
    assert all(d == [] for d in rig.hv.disks_by_domain.values())


@pytest.mark.parametrize("failpoint", api.ATTACH_FAILPOINTS)
def test_an_unexpected_failure_at_every_attach_step_leaves_nothing(rig: Rig, failpoint: str) -> None:
    with rig.agent.failpoints.armed({failpoint: "raise"}), pytest.raises(failpoints.FailpointHit):
        rig.agent.attach("vm1", volume_id="vol-1")
    nothing_left(rig)
    assert rig.agent.attach("vm1", volume_id="vol-1").state is AttachmentState.ATTACHED


@pytest.mark.parametrize("failpoint", api.DETACH_FAILPOINTS)
def test_a_detach_that_failed_at_any_step_is_finished_by_reconcile(rig: Rig, failpoint: str) -> None:
    rig.agent.attach("vm1", volume_id="vol-1")
    with rig.agent.failpoints.armed({failpoint: "raise"}), pytest.raises(failpoints.FailpointHit):
        rig.agent.detach("vm1", "vol-1")
    (record,) = rig.journal.all()
    assert record.state is AttachmentState.DETACHING
    (action,) = rig.agent.reconcile()
    assert action.action == "rolled back"
    nothing_left(rig)


def test_unanswered_create_attachment_keeps_the_record_and_a_repeat_cleans_up(rig: Rig) -> None:
    real = rig.storage.create_attachment

    def lost_answer(*args: object, **kw: object) -> object:
        real(*args, **kw)  # type: ignore[arg-type]
        raise Unavailable("storage went away before answering")

    rig.storage.create_attachment = lost_answer  # type: ignore[method-assign]
    with pytest.raises(Unavailable):
        rig.agent.attach("vm1", volume_id="vol-1")
    (record,) = rig.journal.all()
    assert record.state is AttachmentState.ERROR
    assert len(rig.storage.exports) == 1  # made, and its id unknown to the agent
    rig.storage.create_attachment = real  # type: ignore[method-assign]
    a = rig.agent.attach("vm1", volume_id="vol-1")  # the repeat finds the export, deletes it, attaches
    assert list(rig.storage.exports) == [a.attachment_id]
    rig.agent.detach("vm1", "vol-1")
    nothing_left(rig)


def test_reconcile_rolls_forward_after_the_hotplug_and_back_before_it(rig: Rig) -> None:
    done = rig.agent.attach("vm1", volume_id="vol-1")
    rig.journal.put(
        api.replace(done, state=AttachmentState.ATTACHING, target_dev="")  # crash after the hot-plug
    )
    (action,) = rig.agent.reconcile()
    assert (action.action, action.detail) == ("finished", "sda")
    assert rig.journal.get("vol-1", "vm1").state is AttachmentState.ATTACHED  # type: ignore[union-attr]
    assert rig.journal.get("vol-1", "vm1").target_dev == "sda"  # type: ignore[union-attr]


@dataclass
class SecretListingHypervisor(FakeHypervisor):
    listed: list[str] = field(default_factory=list)

    def unused_secrets(self, prefix: str, secret_type: str) -> list[str]:
        return [u for (u, t) in self.secrets if u.startswith(prefix) and t == secret_type]


def test_reconcile_sweeps_secrets_no_record_accounts_for(rig: Rig, tmp_path: Path) -> None:
    hv = SecretListingHypervisor()
    hv.add_domain("vm1")
    conn = QemuIscsiConnector(hv, Libiscsi(rig.runner), initiator_iqn=HOST_IQN)
    rig.agent.hypervisor = hv
    rig.agent.connectors[api.Transport.ISCSI] = conn
    rig.agent._by_kind[conn.kind] = conn
    kept = rig.agent.attach("vm1", volume_id="vol-1")
    stray = iscsi_info("vol-gone")
    conn.connect(stray)  # a secret whose attachment record is gone
    assert len(hv.secrets) == 2
    actions = rig.agent.reconcile()
    assert [a.action for a in actions] == ["kept", "swept"]
    assert [u for (u, _) in hv.secrets] == [f"blockwire/vol-1/{kept.attachment_id}"]


@dataclass
class MissedEventUdev(FakeUdev):
    """The device appears while the waiter waits, but its event is lost (netlink overrun)."""

    appears: UdevDevice | None = None

    def wait_for(
        self,
        subsystem: str,
        match: Match,
        deadline: Deadline,
        *,
        trigger: object = None,
        what: str = "device",
    ) -> UdevDevice:
        self.waits.append(what)
        deadline.clock.sleep(deadline.remaining())
        if self.appears is not None:
            self.add(self.appears)  # in udev's database; no event reached us
        raise DeadlineExceeded(f"{what} did not appear within {deadline.seconds:g}s")


def _loop(size: int | None) -> UdevDevice:
    return UdevDevice(
        "loop9", "/devices/virtual/block/loop9", device_node="/dev/loop9", size_bytes=size,
        properties=MappingProxyType({}),
    )  # fmt: skip


def test_a_missed_udev_event_is_found_by_the_recheck_at_the_deadline(tmp_path: Path) -> None:
    udev = MissedEventUdev(appears=_loop(8 << 20))
    clock = FakeClock()
    conn = LocalConnector(udev, Sysfs(tmp_path), clock, device_timeout=5)
    info = ConnectionInfo(transport=LocalConnection("/dev/loop9"), volume_id="v")
    t0 = clock.monotonic()
    dev = conn.connect(info)
    assert dev.path == "/dev/loop9"
    assert dev.size_bytes == 8 << 20
    assert clock.monotonic() - t0 == 5  # it waited the whole deadline, then looked


def test_no_device_after_the_deadline_and_the_recheck_is_deadline_exceeded(tmp_path: Path) -> None:
    for udev in (MissedEventUdev(), MissedEventUdev(appears=_loop(None))):  # absent; present, no media
        conn = LocalConnector(udev, Sysfs(tmp_path), FakeClock(), device_timeout=5)
        with pytest.raises(DeadlineExceeded, match="did not appear within 5s"):
            conn.connect(ConnectionInfo(transport=LocalConnection("/dev/loop9"), volume_id="v"))
