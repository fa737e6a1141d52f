"""Step timing at the agent's seams: the runner, udev, the hypervisor and the storage client report how long
each step of an attach or detach took to a `StepObserver` (the daemon's Prometheus histogram,
`blockwire_step_duration_seconds{step}`), without a line of timing code in the connectors or the api.

Steps: export / complete / unexport, migration_export / migration_complete / migration_rollback
(storage), udev / udev_gone (waits for a device), hotplug / unplug / block_resize / migrate (libvirt),
rbd_identity (the RBD image's id and size read through librados/librbd); the commands (login, logout,
identity, multipath ...) are timed by `blockwire.observability.TimedRunner`;
the in-process LUN reader (`hostagent.host.libiscsi`, no command to time) reports the same "identity"
step through `TimedLunReader`.
"""

from __future__ import annotations

from collections.abc import Callable

from blockwire.model import AccessMode, Chap, Connector
from blockwire.observability import StepObserver, timed
from blockwire.runtime.clock import Clock, Deadline
from hostagent.host.ceph import CephAccess, CephProbe, RbdImage
from hostagent.host.udev import Match, UdevDevice, UdevWaiter
from hostagent.model import Bus
from hostagent.storage import StorageApi, StorageAttachment
from hostagent.tools.libiscsi import Lun, LunReader
from hostagent.virt.diskxml import DiskSpec
from hostagent.virt.domains import LibvirtHypervisor


class TimedUdev:
    def __init__(self, udev: UdevWaiter, steps: StepObserver, clock: Clock) -> None:
        self.udev, self.steps, self.clock = udev, steps, clock

    def wait_for(
        self,
        subsystem: str,
        match: Match,
        deadline: Deadline,
        *,
        trigger: Callable[[], None] | None = None,
        what: str = "device",
    ) -> UdevDevice:
        with timed(self.steps, self.clock, "udev"):
            return self.udev.wait_for(subsystem, match, deadline, trigger=trigger, what=what)

    def wait_gone(
        self,
        subsystem: str,
        match: Match,
        deadline: Deadline,
        *,
        trigger: Callable[[], None] | None = None,
        what: str = "device",
    ) -> None:
        with timed(self.steps, self.clock, "udev_gone"):
            self.udev.wait_gone(subsystem, match, deadline, trigger=trigger, what=what)

    def find(self, subsystem: str, match: Match) -> list[UdevDevice]:
        return self.udev.find(subsystem, match)


class TimedCephProbe:
    def __init__(self, probe: CephProbe, steps: StepObserver, clock: Clock) -> None:
        self.probe, self.steps, self.clock = probe, steps, clock

    def image(self, access: CephAccess, pool: str, name: str, timeout: float) -> RbdImage:
        with timed(self.steps, self.clock, "rbd_identity"):
            return self.probe.image(access, pool, name, timeout)


class TimedLunReader:
    """A LunReader whose reads are the "identity" step, as iscsi-inq and iscsi-readcapacity16 are."""

    def __init__(self, reader: LunReader, steps: StepObserver, clock: Clock) -> None:
        self.reader, self.steps, self.clock = reader, steps, clock

    def identities(self, lun: Lun, chap: Chap | None, initiator: str) -> list[str]:
        with timed(self.steps, self.clock, "identity"):
            return self.reader.identities(lun, chap, initiator)

    def serial(self, lun: Lun, chap: Chap | None, initiator: str) -> str:
        with timed(self.steps, self.clock, "identity"):
            return self.reader.serial(lun, chap, initiator)

    def size(self, lun: Lun, chap: Chap | None, initiator: str) -> int:
        with timed(self.steps, self.clock, "identity"):
            return self.reader.size(lun, chap, initiator)


class TimedStorage:
    def __init__(self, storage: StorageApi, steps: StepObserver, clock: Clock) -> None:
        self.storage, self.steps, self.clock = storage, steps, clock

    def create_attachment(
        self, volume_id: str, connector: Connector, access_mode: AccessMode, domain: str
    ) -> StorageAttachment:
        with timed(self.steps, self.clock, "export"):
            return self.storage.create_attachment(volume_id, connector, access_mode, domain)

    def complete_attachment(self, attachment_id: str, target_dev: str, host_device: str) -> None:
        with timed(self.steps, self.clock, "complete"):
            self.storage.complete_attachment(attachment_id, target_dev, host_device)

    def delete_attachment(self, attachment_id: str) -> None:
        with timed(self.steps, self.clock, "unexport"):
            self.storage.delete_attachment(attachment_id)

    def create_migration_attachment(
        self, source_attachment_id: str, connector: Connector, domain: str
    ) -> StorageAttachment:
        with timed(self.steps, self.clock, "migration_export"):
            return self.storage.create_migration_attachment(source_attachment_id, connector, domain)

    def complete_migration(self, attachment_id: str, target_dev: str, host_device: str) -> None:
        with timed(self.steps, self.clock, "migration_complete"):
            self.storage.complete_migration(attachment_id, target_dev, host_device)

    def rollback_migration(self, attachment_id: str) -> None:
        with timed(self.steps, self.clock, "migration_rollback"):
            self.storage.rollback_migration(attachment_id)


class TimedHypervisor(LibvirtHypervisor):
    """libvirt with the hot-plug, the unplug (until DEVICE_REMOVED) and the resize timed."""

    def __init__(self, uri: str, *, connect_timeout: float, steps: StepObserver, clock: Clock) -> None:
        super().__init__(uri, connect_timeout=connect_timeout)
        self.steps, self.clock = steps, clock

    def attach_disk(
        self,
        domain: str,
        build: Callable[[str], DiskSpec],
        *,
        bus: Bus,
        preferred_target: str = "",
        persistent: bool = False,
        cold: bool = False,
    ) -> DiskSpec:
        with timed(self.steps, self.clock, "hotplug"):
            return super().attach_disk(
                domain, build, bus=bus, preferred_target=preferred_target, persistent=persistent, cold=cold
            )

    def migrate(self, domain: str, destination_uri: str, destination_xml: str) -> None:
        with timed(self.steps, self.clock, "migrate"):
            super().migrate(domain, destination_uri, destination_xml)

    def detach_disk(self, domain: str, target_dev: str, deadline: Deadline) -> bool:
        with timed(self.steps, self.clock, "unplug"):
            return super().detach_disk(domain, target_dev, deadline)

    def block_resize(self, domain: str, target_dev: str, size_bytes: int) -> None:
        with timed(self.steps, self.clock, "block_resize"):
            super().block_resize(domain, target_dev, size_bytes)
