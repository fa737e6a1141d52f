"""LibvirtHypervisor (hostagent/virt/domains.py) on a fake libvirt connection: the per-domain lock is
not held while a detach waits for DEVICE_REMOVED, and a libvirt.open that hangs cannot hold callers
past `connect_timeout`. The real thing is in tests/host/test_domain_units.py and the daemon tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import pytest
from lxml import etree

from blockwire.errors import DeadlineExceeded, Unavailable
from blockwire.runtime.clock import Deadline, SystemClock
from hostagent.model import Bus
from hostagent.virt.diskxml import DiskSpec, FileSource
from hostagent.virt.domains import LibvirtHypervisor
from tests.rig import wait_until

UUID = "6f1c7a52-1d55-4c39-9c4b-6a0f6f0f1c01"
DOMAIN_XML = f"""<domain type='kvm'><name>vm1</name><uuid>{UUID}</uuid><devices>
<controller type='scsi' index='0' model='virtio-scsi'/>
<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/var/tmp/a.raw'/>
<target dev='sda' bus='scsi'/><alias name='scsi0-0-0-0'/>
<address type='drive' controller='0' bus='0' target='0' unit='0'/></disk>
</devices></domain>"""


class FakeDomain:
    """A running transient domain: hot-plug adds the disk to the live XML at once; an unplug only asks,
    and the disk leaves when the test calls `release` (the guest's answer)."""

    def __init__(self) -> None:
        self.root = etree.fromstring(DOMAIN_XML.encode())
        self.unplug_asked = threading.Event()
        self._lock = threading.Lock()

    def name(self) -> str:
        return "vm1"

    def UUIDString(self) -> str:
        return UUID

    def isPersistent(self) -> bool:
        return False

    def isActive(self) -> bool:
        return True

    def state(self) -> list[int]:
        return [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED]

    def XMLDesc(self, flags: int = 0) -> str:
        with self._lock:
            return etree.tostring(self.root, encoding="unicode")

    def attachDeviceFlags(self, xml: str, flags: int) -> None:
        disk = etree.fromstring(xml.encode())
        etree.SubElement(disk, "alias", name=f"ua-{disk.find('target').get('dev')}")  # type: ignore[union-attr]
        with self._lock:
            self.root.find("devices").append(disk)  # type: ignore[union-attr]

    def detachDeviceFlags(self, xml: str, flags: int) -> None:
        self.unplug_asked.set()

    def release(self, target_dev: str) -> str:
        """The guest lets the disk go: it leaves the live XML; returns its alias."""
        with self._lock:
            for disk in self.root.findall("devices/disk"):
                if disk.find("target").get("dev") == target_dev:  # type: ignore[union-attr]
                    self.root.find("devices").remove(disk)  # type: ignore[union-attr]
                    return str(disk.find("alias").get("name"))  # type: ignore[union-attr]
        raise AssertionError(f"no disk {target_dev}")


class FakeConnection:
    def __init__(self, domain: FakeDomain) -> None:
        self.domain = domain
        self.callbacks: dict[int, Callable[..., None]] = {}

    def isAlive(self) -> bool:
        return True

    def setKeepAlive(self, interval: int, count: int) -> None:
        pass

    def domainEventRegisterAny(self, dom: Any, event: int, callback: Callable[..., None], opaque: Any) -> int:
        self.callbacks[event] = callback
        return event

    def domainEventDeregisterAny(self, callback_id: int) -> None:
        self.callbacks.pop(callback_id, None)

    def lookupByName(self, name: str) -> FakeDomain:
        assert name == "vm1"
        return self.domain

    def close(self) -> int:
        return 0

    def device_removed(self, alias: str) -> None:
        """libvirt's event loop delivers DEVICE_REMOVED."""
        self.callbacks[libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED](self, self.domain, alias, None)


def _no_events() -> None:
    pass


@pytest.fixture
def hv_and_domain() -> Iterator[tuple[LibvirtHypervisor, FakeDomain, FakeConnection]]:
    domain = FakeDomain()
    conn = FakeConnection(domain)
    hv = LibvirtHypervisor("qemu:///fake", opener=lambda uri: conn, start_events=_no_events)
    yield hv, domain, conn
    hv.close()


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_a_detach_waiting_for_device_removed_does_not_block_an_attach_on_the_domain(
    hv_and_domain: tuple[LibvirtHypervisor, FakeDomain, FakeConnection],
) -> None:
    hv, domain, conn = hv_and_domain
    detach, detached = _in_thread(lambda: hv.detach_disk("vm1", "sda", Deadline(SystemClock(), 20)))
    assert domain.unplug_asked.wait(5)

    attach, attached = _in_thread(
        lambda: hv.attach_disk(
            "vm1", lambda dev: DiskSpec(source=FileSource("/var/tmp/b.raw"), target_dev=dev), bus=Bus.SCSI
        )
    )
    attach.join(2)
    assert not attach.is_alive(), "the attach waited for the other disk's DEVICE_REMOVED"
    (spec,) = attached
    assert isinstance(spec, DiskSpec), spec
    assert spec.target_dev == "sdb"  # sda is still in the live XML while it is being removed
    assert spec.address is not None
    assert spec.address.unit == 1
    assert detach.is_alive()  # still waiting for the guest

    conn.device_removed(domain.release("sda"))
    detach.join(5)
    assert detached == [True]


def test_a_detach_that_is_not_released_in_time_says_so_and_frees_the_domain(
    hv_and_domain: tuple[LibvirtHypervisor, FakeDomain, FakeConnection],
) -> None:
    hv, _, _ = hv_and_domain
    with pytest.raises(DeadlineExceeded, match=r"did not release sda within 0\.2s; repeat the detach"):
        hv.detach_disk("vm1", "sda", Deadline(SystemClock(), 0.2))
    spec = hv.attach_disk(
        "vm1", lambda dev: DiskSpec(source=FileSource("/var/tmp/b.raw"), target_dev=dev), bus=Bus.SCSI
    )
    assert spec.target_dev == "sdb"


def test_a_hanging_libvirt_open_gives_unavailable_to_concurrent_callers_within_the_bound() -> None:
    release = threading.Event()
    opened: list[str] = []
    conn = FakeConnection(FakeDomain())

    def hanging_open(uri: str) -> FakeConnection:
        opened.append(uri)
        release.wait(30)  # libvirtd accepted the socket and does not answer
        return conn

    hv = LibvirtHypervisor("qemu:///hung", connect_timeout=0.3, opener=hanging_open, start_events=_no_events)
    try:
        callers = []
        t0 = time.monotonic()
        for _ in range(4):
            callers.append(_in_thread(lambda: hv.lookup("vm1")))
        for t, _ in callers:
            t.join(5)
        assert not any(t.is_alive() for t, _ in callers), "a caller is stuck behind libvirt.open"
        assert time.monotonic() - t0 < 2.0
        for _, out in callers:
            (err,) = out
            assert isinstance(err, Unavailable), err
            assert "qemu:///hung" in err.message
            assert "bound of 0.3s" in err.message
            assert "libvirt_connect_timeout" in err.message
        assert opened == ["qemu:///hung"]  # one open at a time, not one per caller

        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="no answer for"):
            hv.lookup("vm1")  # the open still hangs: a later caller is not made to wait again
        assert time.monotonic() - t0 < 0.2

        release.set()  # libvirtd answers at last: the next call uses the connection
        wait_until("the connection installed", lambda: _connects(hv), 5)
        assert hv.lookup("vm1").name == "vm1"
        assert opened == ["qemu:///hung"]
    finally:
        release.set()
        hv.close()


def _connects(hv: LibvirtHypervisor) -> bool:
    try:
        hv.lookup("vm1")
    except Unavailable:
        return False
    return True


def test_a_refused_open_is_unavailable_and_the_next_call_opens_again() -> None:
    conn = FakeConnection(FakeDomain())
    answers: list[object] = [libvirt.libvirtError("Failed to connect socket: Connection refused"), conn]

    def opener(uri: str) -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    hv = LibvirtHypervisor("qemu:///down", opener=opener, start_events=_no_events)
    try:
        with pytest.raises(
            Unavailable, match=r"qemu:///down: .*Connection refused \(is libvirtd running\?\)"
        ):
            hv.lookup("vm1")
        assert hv.lookup("vm1").uuid == UUID
    finally:
        hv.close()
