"""What the agent needs from the hypervisor, as a Protocol: libvirt lives behind it in domains.py.

The api is given a `Hypervisor`, the QEMU-native connector only its secrets (`SecretStore` in
connectors/iscsi_qemu.py); the unit and contract tiers give them a fake (tests/fakes/hypervisor.py), the
host tier the real `LibvirtHypervisor`, which is both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from blockwire.runtime.clock import Deadline
from hostagent.model import Bus
from hostagent.virt.diskxml import DiskSpec, LiveDisk


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    persistent: bool
    running: bool
    migrating: bool = False  # paused by a live migration: arriving (destination) or about to leave


class Hypervisor(Protocol):
    def lookup(self, domain: str) -> DomainInfo:
        """The domain by name or UUID; NotFound when there is none."""
        ...

    def disks(self, domain: str, *, inactive: bool = False) -> list[LiveDisk]:
        """The disks of the domain's live XML (`inactive`: of its persistent definition)."""
        ...

    def running_disks(self) -> dict[str, list[LiveDisk]]:
        """The live disks of every running domain of the host, by domain name: who holds what."""
        ...

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
        """Allocates a free target name (per-domain lock), builds the spec with it and hot-plugs it.
        `cold`: the domain is shut off and persistent; the disk is written into its definition only
        (FailedPrecondition when it is running by then), and a boot order replaces the definition's
        <os><boot dev=.../> elements."""
        ...

    def defined_disks(self) -> dict[str, list[LiveDisk]]:
        """The disks of every domain, running (live) or shut off (its definition), by domain name."""
        ...

    def detach_disk(self, domain: str, target_dev: str, deadline: Deadline) -> bool:
        """Unplugs the disk and waits for DEVICE_REMOVED. False when there was no such disk (a repeat)."""
        ...

    def block_resize(self, domain: str, target_dev: str, size_bytes: int) -> None: ...

    def migratable_xml(self, domain: str) -> str:
        """The domain's XML as a migration's destination needs it (VIR_DOMAIN_XML_MIGRATABLE)."""
        ...

    def migrate(self, domain: str, destination_uri: str, destination_xml: str) -> None:
        """Live-migrates the running domain to the libvirt at `destination_uri` (peer to peer) with
        `destination_xml` as its definition there; returns when libvirt's migration completed."""
        ...
