"""A rig of REAL daemons for the host tier's reliability tests (crash, faults, soak): `blockwire-storage`
and `blockwire-agent` as subprocesses over unix sockets in a work directory, on the session's tgtd and
the host's libvirtd, with failpoints armed per start (BLOCKWIRE_FAILPOINTS), kill -9, restart, and
probes of every place state can leak to: libvirt live XML and secrets, the journal, storage's
attachment rows, tgtd targets and CHAP accounts, the daemons' fds and RSS. Each daemon is a
tests.rig.Daemon.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import libvirt
from lxml import etree

from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import hostagent_pb2_grpc, storage_pb2_grpc
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import types_pb2 as pb
from tests.host.daemons import Tgtd
from tests.rig import Daemon, domain_xml

MIB = 1 << 20


def rpc_code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@dataclass
class Rig:
    work: Path
    tgtd: Tgtd
    virt: libvirt.virConnect
    iqn_prefix: str = field(default_factory=lambda: f"iqn.2026-01.io.blockwire.t{uuid.uuid4().hex[:6]}")
    # the daemons of the last start (tests.rig.Daemon); a new one each start
    storage_proc: Daemon | None = None
    agent_proc: Daemon | None = None
    backend_dir: Path | None = None
    oversubscription: float = 1.0
    detach_timeout: float = 10.0
    # TOML appended to each daemon's config (tables such as "[limits]" go last, so appending works)
    storage_config: str = ""
    agent_config: str = ""
    # Volume ids this rig's tests used: probes and cleanup look only at their libvirt secrets, since
    # libvirtd (and its secrets) is shared with whatever else runs on the machine.
    volume_ids: set[str] = field(default_factory=set)
    # the libvirtd `virt` is connected to (a private one of tests/host/libvirt_hosts.py), and the storage
    # daemon's socket when another rig runs it (two agents, one storage)
    libvirt_uri: str = "qemu:///system"
    storage_socket: Path | None = None
    # both daemons' log level (benchmarks run them at the deployed default, INFO)
    log_level: str = "DEBUG"
    # the backend create_volume uses ("file"; another one is added through storage_config)
    backend: str = "file"

    def lv(self) -> libvirt.virConnect:
        """The libvirt connection, opened again when libvirtd restarted under it."""
        try:  # no event loop runs in tests: only a call tells that the connection is gone
            self.virt.getLibVersion()
            alive = True
        except libvirt.libvirtError:
            alive = False
        if not alive:
            self.virt = libvirt.open(self.libvirt_uri)
        return self.virt

    # -- daemons

    def start_storage(self, failpoints: str = "") -> Daemon:
        sock = self.work / "storage.sock"
        volumes = self.backend_dir or self.work / "volumes"
        volumes.mkdir(exist_ok=True)
        config = self.work / "storage.toml"
        portals = ", ".join(f'"{p}"' for p in self.tgtd.portals)
        config.write_text(
            f"""[server]
unix_socket = "{sock}"
log_format = "kv"
log_level = "{self.log_level}"

[service]
catalog_path = "{self.work / "storage.db"}"
iqn_prefix = "{self.iqn_prefix}"

[exporters.tgt]
kind = "tgt"
portals = [{portals}]
control_port = {self.tgtd.control_port}

[[backends]]
name = "file"
kind = "file"
exporter = "tgt"
path = "{volumes}"
oversubscription_ratio = {self.oversubscription}
{self.storage_config}"""
        )
        self.storage_proc = Daemon.storage(config, sock).start(failpoints)
        return self.storage_proc

    def start_agent(self, failpoints: str = "") -> Daemon:
        sock = self.work / "agent.sock"
        config = self.work / "agent.toml"
        config.write_text(
            f"""state_dir = "{self.state}"
storage_address = "unix://{self.storage_socket or self.work / "storage.sock"}"
storage_timeout = 20.0
iscsi_mode = "qemu"
listen_unix = "{sock}"
initiator_file = "{self.work / "no-initiatorname"}"
hostnqn_file = "{self.work / "no-hostnqn"}"
device_timeout = 10.0
detach_timeout = {self.detach_timeout}
log_level = "{self.log_level}"
{self.agent_config}"""
        )
        self.agent_proc = Daemon.agent(config, sock).start(failpoints)
        return self.agent_proc

    def stop(self) -> None:
        for p in (self.agent_proc, self.storage_proc):
            if p is not None:
                p.stop()
        self.agent_proc = self.storage_proc = None

    @contextlib.contextmanager
    def running(self, *, agent: bool = True) -> Iterator[Rig]:
        """Both daemons started (storage alone without `agent`), and stopped afterwards."""
        try:
            self.start_storage()
            if agent:
                self.start_agent()
            yield self
        finally:
            self.stop()
            # Only now, with no storage daemon left to rebuild them (its export checks put back a target
            # a test's cleanup removed while it ran), this rig's targets and CHAP accounts go from the
            # session's shared tgtd, so the next test starts from an empty tgtd.
            force_cleanup(self, "")

    @property
    def state(self) -> Path:
        return self.work / "agent-state"

    @property
    def storage(self) -> storage_pb2_grpc.StorageServiceStub:
        assert self.storage_proc is not None
        return storage_pb2_grpc.StorageServiceStub(self.storage_proc.channel)

    @property
    def agent(self) -> hostagent_pb2_grpc.HostAgentServiceStub:
        assert self.agent_proc is not None
        return hostagent_pb2_grpc.HostAgentServiceStub(self.agent_proc.channel)

    # -- objects

    def create_volume(self, size: int = 8 * MIB) -> pb.Volume:
        v = self.storage.CreateVolume(
            spb.CreateVolumeRequest(
                name=f"vol-{uuid.uuid4().hex[:10]}", size_bytes=size, backend=self.backend
            ),
            timeout=60,
        ).volume
        assert v.state == pb.VOLUME_STATE_AVAILABLE, v
        self.volume_ids.add(v.id)
        return v

    def volume(self, volume_id: str) -> pb.Volume:
        return self.storage.GetVolume(spb.GetVolumeRequest(volume_id=volume_id), timeout=10).volume

    def delete_volume(self, volume_id: str) -> None:
        for a in self.attachments(volume_id):
            self.storage.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=a.id), timeout=30)
        self.storage.DeleteVolume(spb.DeleteVolumeRequest(volume_id=volume_id), timeout=30)

    def attach(self, domain: str, volume_id: str, timeout: float = 60) -> pb.Attachment:
        return self.agent.AttachVolume(  # type: ignore[no-any-return]
            hpb.AttachVolumeRequest(domain=domain, volume_id=volume_id), timeout=timeout
        ).attachment

    def detach(self, domain: str, volume_id: str, timeout: float = 60) -> None:
        self.agent.DetachVolume(hpb.DetachVolumeRequest(domain=domain, volume_id=volume_id), timeout=timeout)

    # -- probes

    def attachments(self, volume_id: str) -> list[pb.Attachment]:
        return list(
            self.storage.ListAttachments(
                spb.ListAttachmentsRequest(volume_id=volume_id), timeout=10
            ).attachments
        )

    def journal(self) -> list[str]:
        d = self.state / "attachments"
        return sorted(p.name for p in d.glob("*.json")) if d.exists() else []

    def live_disks(self, domain: str) -> list[etree._Element]:
        root = etree.fromstring(self.lv().lookupByName(domain).XMLDesc(0).encode())
        return root.findall("devices/disk")

    def secrets(self) -> list[str]:
        """libvirt secrets of this rig's volumes."""
        ours = tuple(f"blockwire/{v}/" for v in self.volume_ids)
        return [u for u in (s.usageID() for s in self.lv().listAllSecrets()) if u and u.startswith(ours)]

    def targets(self) -> dict[str, list[str]]:
        """Our targets in tgtd: IQN -> its ACL (initiator names)."""
        out = self.tgtd.adm("--op", "show", "--mode", "target").stdout
        found: dict[str, list[str]] = {}
        current = ""
        section = ""
        for line in out.splitlines():
            m = re.match(r"^Target \d+: (\S+)$", line)
            if m:
                current = m.group(1) if m.group(1).startswith(self.iqn_prefix + ":") else ""
                if current:
                    found[current] = []
                continue
            if line.startswith("    ") and not line.startswith("     "):
                section = line.strip().rstrip(":")
            elif current and section == "ACL information" and line.strip():
                found[current].append(line.strip())
        return found

    def accounts(self) -> list[str]:
        out = self.tgtd.adm("--op", "show", "--mode", "account").stdout
        return [line.strip() for line in out.splitlines() if line.startswith(" ") and line.strip()]

    def agent_iqn(self) -> str:
        return str(self.agent.GetConnector(hpb.GetConnectorRequest(), timeout=10).connector.initiator_iqn)

    def nothing_left(self, domain: str, volume_id: str) -> dict[str, object]:
        """Everything an attachment of `volume_id` to `domain` could have left, anywhere; {} when clean."""
        left: dict[str, object] = {}
        if self.live_disks(domain):
            left["libvirt disks"] = len(self.live_disks(domain))
        if self.secrets():
            left["libvirt secrets"] = self.secrets()
        if self.journal():
            left["journal"] = self.journal()
        if volume_id and self.storage_proc is not None:
            rows = self.attachments(volume_id)
            if rows:
                left["storage attachments"] = [pb.AttachmentState.Name(a.state) for a in rows]
            state = self.volume(volume_id).state
            if state != pb.VOLUME_STATE_AVAILABLE:
                left["volume state"] = pb.VolumeState.Name(state)
        if self.targets():
            left["tgt targets"] = self.targets()
        ours = [a for a in self.accounts() if re.fullmatch(r"(in|out)-[0-9a-f]{1,24}", a)]
        if ours:
            left["tgt accounts"] = ours
        return left

    def complete(self, domain: str, volume_id: str) -> dict[str, object]:
        """What is missing or wrong for one complete attachment of `volume_id` to `domain`; {} if none."""
        wrong: dict[str, object] = {}
        disks = self.live_disks(domain)
        if len(disks) != 1:
            wrong["libvirt disks"] = len(disks)
        recs = self.journal()
        if len(recs) != 1:
            wrong["journal"] = recs
        else:
            got = self.agent.GetAttachment(
                hpb.HostAgentServiceGetAttachmentRequest(volume_id=volume_id), timeout=10
            ).attachment
            if got.state != pb.ATTACHMENT_STATE_ATTACHED:
                wrong["journal state"] = pb.AttachmentState.Name(got.state)
        rows = self.attachments(volume_id)
        if [a.state for a in rows] != [pb.ATTACHMENT_STATE_ATTACHED]:
            wrong["storage attachments"] = [pb.AttachmentState.Name(a.state) for a in rows]
        if self.volume(volume_id).state != pb.VOLUME_STATE_IN_USE:
            wrong["volume state"] = pb.VolumeState.Name(self.volume(volume_id).state)
        targets = self.targets()
        if list(targets.values()) != [[self.agent_iqn()]]:
            wrong["tgt targets"] = targets
        return wrong


def define_domain(virt: libvirt.virConnect, prefix: str = "bw-rel") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    dom = virt.defineXML(domain_xml(name))
    try:
        dom.create()
    except BaseException:
        dom.undefine()
        raise
    return name


def remove_domain(virt: libvirt.virConnect, name: str) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        dom = virt.lookupByName(name)
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        dom.undefine()


def force_cleanup(rig: Rig, domain: str) -> None:
    """After a failed test: removes what the test's attachments may have left (disks, secrets, targets,
    accounts, journal), so that the next test starts clean."""
    with contextlib.suppress(libvirt.libvirtError):
        dom = rig.lv().lookupByName(domain)
        for disk in rig.live_disks(domain):
            with contextlib.suppress(libvirt.libvirtError):
                dom.detachDeviceFlags(
                    etree.tostring(disk, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE
                )
    ours = tuple(f"blockwire/{v}/" for v in rig.volume_ids)
    for s in rig.lv().listAllSecrets():
        if (s.usageID() or "").startswith(ours):
            with contextlib.suppress(libvirt.libvirtError):
                s.undefine()
    for p in (rig.state / "attachments").glob("*.json") if (rig.state / "attachments").exists() else []:
        p.unlink()
    out = rig.tgtd.adm("--op", "show", "--mode", "target").stdout
    for m in re.finditer(r"^Target (\d+): (\S+)$", out, re.M):
        if m.group(2).startswith(rig.iqn_prefix + ":"):
            rig.tgtd.adm("--op", "delete", "--mode", "target", "--tid", m.group(1), "--force", check=False)
    for a in rig.accounts():
        if re.fullmatch(r"(in|out)-[0-9a-f]{1,24}", a):
            rig.tgtd.adm("--op", "delete", "--mode", "account", "--user", a, check=False)


@contextlib.contextmanager
def loop_device(backing: Path, size: int = 8 * MIB) -> Iterator[str]:
    """A loop device (first free) on a new sparse file; detached afterwards."""
    with open(backing, "wb") as f:
        f.truncate(size)
    path = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], check=True, capture_output=True, text=True, timeout=30
    ).stdout.strip()
    try:
        yield path
    finally:
        subprocess.run(["losetup", "-d", path], check=False, timeout=30)


def loop_devices_of(backing_dir: Path) -> list[str]:
    """Loop devices whose backing file is under `backing_dir`."""
    out = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True,
                         check=False, timeout=30).stdout  # fmt: skip
    return [line.split()[0] for line in out.splitlines() if str(backing_dir) in line]
