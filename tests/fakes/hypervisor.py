"""FakeHypervisor: domains, disks and secrets in memory, with the real target allocation and disk XML."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from blockwire.errors import BlockwireError, FailedPrecondition, NotFound
from blockwire.runtime.clock import Deadline
from blockwire.secret import Secret
from hostagent.model import Bus
from hostagent.virt.diskxml import (
    DiskSpec,
    LiveDisk,
    NetworkSource,
    disk_xml,
    next_target_dev,
    parse_disk,
    parse_domain_disks,
)
from hostagent.virt.hypervisor import DomainInfo


@dataclass
class FakeHypervisor:
    domains: dict[str, DomainInfo] = field(default_factory=dict)
    disks_by_domain: dict[str, list[DiskSpec]] = field(default_factory=dict)
    secrets: dict[tuple[str, str], Secret] = field(default_factory=dict)
    fail_attach: BlockwireError | None = None
    fail_detach: BlockwireError | None = None
    attached_xml: list[str] = field(default_factory=list)
    resized: list[tuple[str, str, int]] = field(default_factory=list)
    peers: dict[str, FakeHypervisor] = field(default_factory=dict)  # libvirt URI -> the other host
    fail_migrate: BlockwireError | None = None

    def add_domain(self, name: str, *, running: bool = True, persistent: bool = True) -> DomainInfo:
        info = DomainInfo(name, f"00000000-0000-0000-0000-{len(self.domains):012d}", persistent, running)
        self.domains[name] = info
        self.disks_by_domain[name] = []
        return info

    def lookup(self, domain: str) -> DomainInfo:
        for d in self.domains.values():
            if domain in (d.name, d.uuid):
                return d
        raise NotFound(f"domain {domain!r} does not exist on this host")

    def disks(self, domain: str, *, inactive: bool = False) -> list[LiveDisk]:
        """A running domain's disks are live (and persistent when attached so); a shut-off one's are
        its definition's."""
        name = self.lookup(domain).name
        return [LiveDisk(s, alias=f"scsi0-0-0-{i}") for i, s in enumerate(self.disks_by_domain[name])]

    def running_disks(self) -> dict[str, list[LiveDisk]]:
        return {n: self.disks(n) for n, d in self.domains.items() if d.running}

    def defined_disks(self) -> dict[str, list[LiveDisk]]:
        return {n: self.disks(n) for n in self.domains}

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
        dom = self.lookup(domain)
        if cold and (dom.running or not dom.persistent):
            raise FailedPrecondition(f"domain {dom.name!r} is not shut off")
        if not cold and not dom.running:
            raise FailedPrecondition(f"domain {dom.name!r} is not running")
        name = dom.name
        used = {s.target_dev for s in self.disks_by_domain[name]}
        spec = build(next_target_dev(bus, used, preferred_target))
        xml = disk_xml(spec)
        if self.fail_attach is not None:
            raise self.fail_attach
        self.attached_xml.append(xml)
        self.disks_by_domain[name].append(parse_disk(xml))
        return spec

    def detach_disk(self, domain: str, target_dev: str, deadline: Deadline) -> bool:
        name = self.lookup(domain).name
        if self.fail_detach is not None:
            raise self.fail_detach
        before = self.disks_by_domain[name]
        self.disks_by_domain[name] = [s for s in before if s.target_dev != target_dev]
        return len(before) != len(self.disks_by_domain[name])

    def block_resize(self, domain: str, target_dev: str, size_bytes: int) -> None:
        self.resized.append((domain, target_dev, size_bytes))

    def migratable_xml(self, domain: str) -> str:
        dom = self.lookup(domain)
        disks = "".join(disk_xml(s) for s in self.disks_by_domain[dom.name])
        return f"<domain><name>{dom.name}</name><uuid>{dom.uuid}</uuid><devices>{disks}</devices></domain>"

    def migrate(self, domain: str, destination_uri: str, destination_xml: str) -> None:
        """Hands the domain to the FakeHypervisor registered as `destination_uri` in `peers`, with the
        disks of `destination_xml` (what libvirt does to the two hosts' domains)."""
        if self.fail_migrate is not None:
            raise self.fail_migrate
        dest = self.peers[destination_uri]
        info = self.domains.pop(self.lookup(domain).name)
        dest.domains[info.name] = info
        dest.disks_by_domain[info.name] = [d.spec for d in parse_domain_disks(destination_xml)]
        del self.disks_by_domain[info.name]

    def define_secret(self, usage: str, secret_type: str, value: Secret) -> str:
        self.secrets[(usage, secret_type)] = value
        if secret_type == "volume":
            return str(uuid.uuid5(uuid.NAMESPACE_URL, usage))
        return "11111111-2222-3333-4444-555555555555"

    def undefine_secret(self, usage: str, secret_type: str) -> bool:
        return self.secrets.pop((usage, secret_type), None) is not None

    def secret_exists(self, usage: str, secret_type: str) -> bool:
        return (usage, secret_type) in self.secrets

    def unused_secrets(self, prefix: str, secret_type: str) -> list[str]:
        """Like LibvirtHypervisor's: the usage ids under `prefix` no domain's disk refers to."""
        used = {
            s.source.auth.usage
            for specs in self.disks_by_domain.values()
            for s in specs
            if isinstance(s.source, NetworkSource) and s.source.auth is not None
        }
        used_uuids = {
            s.encryption.secret_uuid for d in self.disks_by_domain.values() for s in d if s.encryption
        }
        used |= {u for (u, t) in self.secrets if str(uuid.uuid5(uuid.NAMESPACE_URL, u)) in used_uuids}
        return sorted(
            u for (u, t) in self.secrets if t == secret_type and u.startswith(prefix) and u not in used
        )
