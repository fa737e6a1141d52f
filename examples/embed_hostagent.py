"""Embedding the host agent in a virt manager, as a library, without gRPC.

`hostagent.api.HostAgent` is what `blockwire-agent` serves over gRPC; a virt manager can call it
directly. `hostagent.wiring.build_agent` wires it with the real collaborators (libvirt, udev, the
journal in `state_dir`). Without a storage service (``storage=None``) the virt manager passes the
connection info it already holds, here a local image file; with one it passes an object satisfying
`hostagent.storage.StorageApi` and attaches by volume id.

Run as root on a host with libvirtd and a running domain that has a virtio-scsi controller:

    sudo .venv/bin/python examples/embed_hostagent.py DOMAIN /var/lib/images/data.img
    sudo .venv/bin/python examples/embed_hostagent.py DOMAIN /var/lib/images/data.img --keep

It reconciles the journal (what a restart would do), attaches the file as a SCSI disk, prints the
attachment and the agent's events, lists the domain's attachments, and detaches again unless --keep.
Other transports are the same call with another `ConnectionInfo`, e.g. iSCSI through QEMU's initiator:

    ConnectionInfo(
        transport=IscsiConnection(paths=(IscsiPath("192.0.2.1:3260", "iqn.2026-01.io.example:vol1", 1),)),
        volume_id="vol1",
        wwn="6001405...",  # the LUN's identity (NAA, 32 hex digits): a device with another WWN is refused
    )
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from blockwire.errors import BlockwireError
from blockwire.model import ConnectionInfo, LocalConnection
from hostagent.api import HostAgent
from hostagent.config import AgentConfig
from hostagent.events import Subscription
from hostagent.model import Bus, DiskOptions
from hostagent.wiring import build_agent


def show_events(sub: Subscription) -> None:
    """Prints the events published so far (attach started, progress steps, attached ...)."""
    while (event := sub.get(timeout=0.0)) is not None:
        detail = " ".join(x for x in (event.step, event.path, event.message) if x)
        print(f"  event {event.type.name.lower():<15} {event.volume_id} {event.domain} {detail}")


def run(agent: HostAgent, domain: str, image: Path, volume_id: str, keep: bool) -> None:
    for action in agent.reconcile():
        print(f"reconcile: {action.volume_id} on {action.domain}: {action.action} {action.detail}")
    with agent.events.subscribe() as sub:
        info = ConnectionInfo(transport=LocalConnection(str(image)), volume_id=volume_id)
        # Idempotent per (domain, volume): running this twice returns the existing attachment.
        attachment = agent.attach(
            domain, connection_info=info, disk=DiskOptions(bus=Bus.SCSI), persistent=False
        )
        print(f"attached {attachment.volume_id} to {attachment.domain} as {attachment.target_dev}")
        show_events(sub)
        for a in agent.list_attachments(domain):
            print(f"  {a.volume_id}: {a.state.value} {a.target_dev} serial={a.serial} source={a.host_device}")
        if not keep:
            # Waits for libvirt's DEVICE_REMOVED; a repeat (or a volume not attached) returns False.
            agent.detach(domain, volume_id)
            print(f"detached {volume_id} from {domain}")
            show_events(sub)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("domain", help="a running libvirt domain (name or UUID)")
    parser.add_argument("image", type=Path, help="an image file to attach (e.g. made with truncate -s 1G)")
    parser.add_argument("--volume-id", default="embedded-demo", help="the id the journal records it under")
    parser.add_argument("--state-dir", default="/var/lib/blockwire-embed", help="where the journal lives")
    parser.add_argument("--libvirt-uri", default="qemu:///system")
    parser.add_argument("--keep", action="store_true", help="leave the disk attached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the embedder configures logging

    config = AgentConfig(state_dir=args.state_dir, libvirt_uri=args.libvirt_uri, iscsi_mode="qemu")
    try:
        agent, hypervisor = build_agent(config, storage=None)
    except BlockwireError as exc:
        print(f"cannot start the agent: {exc.message}", file=sys.stderr)
        return 1
    try:
        run(agent, args.domain, args.image.resolve(), args.volume_id, args.keep)
    except BlockwireError as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        hypervisor.close()
    print(f"grpc imported: {'grpc' in sys.modules}")  # False: the agent works without it
    return 0


if __name__ == "__main__":
    sys.exit(main())
