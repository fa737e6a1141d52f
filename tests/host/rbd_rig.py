"""What the RBD host tests and the RBD benchmark share: the agent daemon configured for RBD, connection
info of a real image, QEMU's data path (HMP qemu-io) and librbd reads (STYLE.md rule 15: once)."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from blockwire.convert import connection_info_to_pb
from blockwire.model import ConnectionInfo, RbdConnection
from blockwire.secret import Secret
from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import hostagent_pb2_grpc
from blockwire.v1 import types_pb2 as pb
from tests.ceph import CephCluster, CephUser
from tests.rig import Daemon, domain_xml

AGENT_TIMEOUT = 3.0  # the agent's rbd_timeout in these tests: how long a down cluster may hold an attach


@dataclass
class RbdAgent:
    """blockwire-agent with no storage service (connection info given by the caller), rbd_mode qemu."""

    work: Path
    rbd_timeout: float = AGENT_TIMEOUT
    extra: str = ""
    mode: str = "qemu"  # rbd_mode
    detach_timeout: float = 10.0
    daemon: dict[str, Any] = field(default_factory=dict)  # Daemon's keyword arguments (the guest's timeouts)
    proc: Daemon | None = None

    @property
    def state(self) -> Path:
        return self.work / "agent-state"

    def start(self, failpoints: str = "") -> Daemon:
        sock = self.work / "agent.sock"
        config = self.work / "agent.toml"
        config.write_text(
            f"""state_dir = "{self.state}"
iscsi_mode = "qemu"
rbd_mode = "{self.mode}"
rbd_timeout = {self.rbd_timeout}
listen_unix = "{sock}"
initiator_file = "{self.work / "no-initiatorname"}"
hostnqn_file = "{self.work / "no-hostnqn"}"
detach_timeout = {self.detach_timeout}
log_level = "DEBUG"
{self.extra}"""
        )
        self.proc = Daemon.agent(config, sock, **self.daemon).start(failpoints)
        return self.proc

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    @property
    def stub(self) -> hostagent_pb2_grpc.HostAgentServiceStub:
        assert self.proc is not None
        return hostagent_pb2_grpc.HostAgentServiceStub(self.proc.channel)

    def attach(self, domain: str, info: pb.ConnectionInfo, timeout: float = 60) -> pb.Attachment:
        req = hpb.AttachVolumeRequest(domain=domain, connection_info=info)
        return self.stub.AttachVolume(req, timeout=timeout).attachment

    def detach(self, domain: str, volume_id: str, timeout: float = 60) -> None:
        self.stub.DetachVolume(hpb.DetachVolumeRequest(domain=domain, volume_id=volume_id), timeout=timeout)

    def journal(self) -> list[str]:
        d = self.state / "attachments"
        return sorted(p.name for p in d.glob("*.json")) if d.exists() else []


def image_id(cluster: CephCluster, pool: str, image: str) -> str:
    return str(json.loads(cluster.cli("rbd", "info", f"{pool}/{image}", "--format", "json"))["id"])


def create_image(cluster: CephCluster, name: str, size_mib: int = 16, pool: str = "") -> str:
    """Creates `pool/name` and returns its image id."""
    pool = pool or cluster.pool
    cluster.cli("rbd", "create", f"{pool}/{name}", "--size", f"{size_mib}M")
    return image_id(cluster, pool, name)


def rbd_info(
    cluster: CephCluster,
    user: CephUser,
    image: str,
    volume_id: str,
    *,
    image_id_: str,
    key: str = "",
    pool: str = "",
) -> ConnectionInfo:
    return ConnectionInfo(
        transport=RbdConnection(
            pool=pool or cluster.pool,
            image=image,
            monitors=cluster.monitors,
            user=user.name,
            key=Secret(key or user.key),
            image_id=image_id_,
            cluster_fsid=cluster.fsid,
        ),
        volume_id=volume_id,
        attachment_id=f"att-{uuid.uuid4().hex[:8]}",
    )


def to_pb(info: ConnectionInfo) -> pb.ConnectionInfo:
    return connection_info_to_pb(info, with_secrets=True)


@contextlib.contextmanager
def running_domain(virt: libvirt.virConnect, prefix: str = "bw-rbd") -> Iterator[str]:
    """A no-OS kvm domain with a virtio-scsi controller, destroyed and undefined afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    dom = virt.defineXML(domain_xml(name))
    try:
        dom.create()
        yield name
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefine()


def librbd_read(cluster: CephCluster, pool: str, image: str, offset: int, length: int) -> bytes:
    """Reads the image through librbd as client.admin (not through QEMU)."""
    import rados  # noqa: PLC0415 - Debian's bindings, linked into the venv by scripts/setup
    import rbd  # noqa: PLC0415

    conf = {"keyring": str(cluster.admin_keyring)}
    with (
        rados.Rados(conffile=str(cluster.conf), rados_id="admin", conf=conf) as r,
        r.open_ioctx(pool) as ioctx,
        rbd.Image(ioctx, image, read_only=True) as img,
    ):
        return bytes(img.read(offset, length))


def ceph_secrets(virt: libvirt.virConnect, volume_id: str) -> list[str]:
    """Usage ids of libvirt's ceph secrets of `volume_id`'s attachments (the agent names them so)."""
    return [
        str(s.usageID())
        for s in virt.listAllSecrets(0)
        if s.usageType() == libvirt.VIR_SECRET_USAGE_TYPE_CEPH
        and str(s.usageID()).startswith(f"blockwire/{volume_id}/")
    ]


def disk_size(virt: libvirt.virConnect, domain: str, target_dev: str) -> int:
    """domblkinfo's capacity of the disk."""
    return int(virt.lookupByName(domain).blockInfo(target_dev)[0])
