"""Two libvirt hosts with an agent each and one storage daemon (the host tier's migration tests and
bench/migrate.py), and the calls a virt manager makes for a live migration through blockwire."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt

from blockwire.v1 import hostagent_pb2 as hpb
from tests.fakes.daemon_rig import Rig, force_cleanup
from tests.host.daemons import Tgtd
from tests.host.libvirt_hosts import LibvirtHost, two_hosts

KEYS = '\n[keys]\nkind = "embedded"\nmaster_key_file = "{master}"\n'


@dataclass
class World:
    hosts: tuple[LibvirtHost, LibvirtHost]
    a: Rig  # storage (with the embedded key manager: `master_key`) + agent A on libvirt host A
    b: Rig  # agent B on libvirt host B (storage: a's)

    @property
    def master_key(self) -> Path:
        return self.a.work / "master.key"

    def rig(self, side: str) -> Rig:
        return self.a if side == "a" else self.b

    def host(self, side: str) -> LibvirtHost:
        return self.hosts[0] if side == "a" else self.hosts[1]


@contextlib.contextmanager
def running_world(tgtd: Tgtd) -> Iterator[World]:
    """Libvirt hosts A and B, storage + agent A (host name bw-host-a) and agent B (bw-host-b), all
    stopped afterwards by pid, the work directory removed. tests.host.daemons.Missing when libvirtd
    cannot run so."""
    root = Path(tempfile.mkdtemp(prefix="bwmig", dir="/tmp"))  # short: unix socket paths
    hosts = two_hosts(root)
    rigs: list[Rig] = []
    try:
        for h in hosts:
            h.start()
        for side, h in zip("ab", hosts, strict=True):
            work = root / f"agent-{side}"
            work.mkdir()
            rigs.append(
                Rig(
                    work=work,
                    tgtd=tgtd,
                    virt=h.open(),
                    libvirt_uri=h.uri,
                    detach_timeout=5.0,
                    agent_config=f'libvirt_uri = "{h.uri}"\nhost_name = "bw-host-{side}"\n',
                    storage_socket=root / "agent-a" / "storage.sock" if side == "b" else None,
                    # encrypted volumes: the embedded key manager, its master key beside the catalog
                    storage_config=KEYS.format(master=work / "master.key") if side == "a" else "",
                )
            )
        a, b = rigs
        b.iqn_prefix = a.iqn_prefix
        a.start_storage()
        a.start_agent()
        b.start_agent()
        yield World((hosts[0], hosts[1]), a, b)
    finally:
        for rig in reversed(rigs):
            rig.stop()
        if rigs:
            force_cleanup(rigs[0], "")
        for h in hosts:
            h.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- the caller's side: what a virt manager does ------------------------------------------------------


def prepare(world: World, src: str, dst: str, domain: str) -> hpb.PrepareMigrationResponse:
    source = world.rig(src)
    dom = source.lv().lookupByName(domain)
    listed = source.agent.ListAttachments(
        hpb.HostAgentServiceListAttachmentsRequest(domain=domain), timeout=10
    ).attachments
    return world.rig(dst).agent.PrepareMigration(
        hpb.PrepareMigrationRequest(
            domain=domain,
            domain_xml=dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE),
            volumes=[
                hpb.MigrationVolume(volume_id=a.volume_id, source_attachment_id=a.id, target_dev=a.target_dev)
                for a in listed
            ],
        ),
        timeout=120,
    )


def libvirt_migrate(world: World, src: str, dst: str, domain: str, xml: str) -> float:
    dom = world.rig(src).lv().lookupByName(domain)
    began = time.monotonic()
    dom.migrateToURI3(
        world.host(dst).uri,
        {libvirt.VIR_MIGRATE_PARAM_DEST_XML: xml},
        libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER,
    )
    return time.monotonic() - began


def finish(world: World, src: str, dst: str, domain: str) -> None:
    world.rig(dst).agent.FinishIncomingMigration(
        hpb.FinishIncomingMigrationRequest(domain=domain), timeout=60
    )
    world.rig(src).agent.FinishOutgoingMigration(
        hpb.FinishOutgoingMigrationRequest(domain=domain), timeout=60
    )


def migrate(world: World, src: str, dst: str, domain: str) -> None:
    prepared = prepare(world, src, dst, domain)
    libvirt_migrate(world, src, dst, domain, prepared.destination_domain_xml)
    finish(world, src, dst, domain)
