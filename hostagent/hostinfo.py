"""Building this host's Connector (GetConnector): initiator names, FC ports, NQN, capabilities.

Identities the host already has (/etc/iscsi/initiatorname.iscsi, /etc/nvme/hostnqn) are used as they
are; missing ones are generated once and persisted in the agent's state dir, so the host keeps the same
name across restarts (storage ACLs depend on it).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from blockwire.model import Connector, Transport
from blockwire.validate import normal_wwpn
from hostagent.host.sysfs import Sysfs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostFiles:
    state_dir: str
    initiator_file: str = "/etc/iscsi/initiatorname.iscsi"
    hostnqn_file: str = "/etc/nvme/hostnqn"
    hostid_file: str = "/etc/nvme/hostid"


def parse_initiatorname(text: str) -> str:
    """ "InitiatorName=iqn...." (comments allowed) -> the IQN, or ""."""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("InitiatorName="):
            return line.partition("=")[2].strip()
    return ""


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _persist(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def initiator_iqn(files: HostFiles) -> str:
    iqn = parse_initiatorname(_read(files.initiator_file))
    if iqn:
        return iqn
    own = Path(files.state_dir) / "initiatorname.iscsi"
    iqn = parse_initiatorname(_read(str(own)))
    if not iqn:
        iqn = f"iqn.2026-01.io.blockwire:{uuid.uuid4().hex[:12]}"
        _persist(own, f"InitiatorName={iqn}\n")
        log.info("generated initiator name %s (stored in %s)", iqn, own)
    return iqn


def host_nqn(files: HostFiles) -> tuple[str, str]:
    nqn = _read(files.hostnqn_file).strip()
    hostid = _read(files.hostid_file).strip()
    if not nqn:
        own = Path(files.state_dir) / "hostnqn"
        nqn = _read(str(own)).strip()
        if not nqn:
            nqn = f"nqn.2014-08.org.nvmexpress:uuid:{uuid.uuid4()}"
            _persist(own, nqn + "\n")
    if not hostid and ":uuid:" in nqn:
        hostid = nqn.rpartition(":uuid:")[2]
    return nqn, hostid


def fc_ports(sysfs: Sysfs) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """WWPNs and WWNNs of every FC HBA port (/sys/class/fc_host/host*/port_name, node_name)."""
    wwpns: list[str] = []
    wwnns: list[str] = []
    for host in sysfs.listdir("class/fc_host"):
        for attr, out in (("port_name", wwpns), ("node_name", wwnns)):
            value = normal_wwpn(sysfs.read(f"class/fc_host/{host}/{attr}") or "")
            if value:
                out.append(value)
    return tuple(wwpns), tuple(wwnns)


def kernel_iscsi_available(sysfs: Sysfs) -> bool:
    return sysfs.exists("module/iscsi_tcp") or sysfs.exists("class/iscsi_transport")


def nvme_tcp_available(sysfs: Sysfs) -> bool:
    """The kernel has the NVMe/TCP host driver (nvme-tcp loaded or built in) and its fabrics device."""
    return sysfs.exists("module/nvme_tcp") and sysfs.exists("class/nvme-fabrics")


def host_ips() -> tuple[str, ...]:
    ips: set[str] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            ips.add(str(info[4][0]))
    except OSError:
        log.debug("host name does not resolve; no IPs reported")
    return tuple(sorted(ip for ip in ips if not ip.startswith("127.") and ip != "::1"))


def rbd_available(sysfs: Sysfs, mode: str) -> bool:
    """Whether this host can attach RBD volumes in `mode`: QEMU's librbd (qemu-block-extra's block-rbd
    module) and the Ceph bindings the identity check reads the image with; or the kernel's rbd driver
    and the rbd CLI that maps."""
    if mode == "kernel":
        return sysfs.exists("bus/rbd") and shutil.which("rbd") is not None
    return _qemu_has_rbd() and importlib.util.find_spec("rados") is not None


def _qemu_has_rbd() -> bool:
    return any(
        Path(d).glob("block-rbd.so")
        for d in (
            "/usr/lib/x86_64-linux-gnu/qemu",
            "/usr/lib64/qemu",
            "/usr/lib/qemu",
            "/usr/lib/aarch64-linux-gnu/qemu",
        )
    )


def build_connector(
    sysfs: Sysfs,
    files: HostFiles,
    *,
    kernel_iscsi: bool,
    multipath_allowed: bool = True,
    rbd: bool = False,
    nvme_tcp: bool = False,
    multipathd: bool | None = None,
) -> Connector:
    """This host's connector. It announces `multipath` (dm-multipath maps can be built here) when the
    agent may use it (`multipath_allowed`), multipathd is installed (`multipathd`; None: looked up on
    PATH) and a kernel path that dm-multipath serves is usable: the kernel iSCSI initiator, an FC HBA,
    or NVMe/TCP (its fallback where native NVMe multipath is off: an NVMe-only host gets it too)."""
    wwpns, wwnns = fc_ports(sysfs)
    if multipathd is None:
        multipathd = shutil.which("multipathd") is not None
    kernel_paths = kernel_iscsi or bool(wwpns) or nvme_tcp
    nqn, hostid = host_nqn(files)
    transports = [Transport.ISCSI]
    if wwpns:
        transports.append(Transport.FC)
    if rbd:
        transports.append(Transport.RBD)
    if nvme_tcp:
        transports.append(Transport.NVME_TCP)
    transports.append(Transport.LOCAL)
    return Connector(
        host=socket.gethostname(),
        ips=host_ips(),
        initiator_iqn=initiator_iqn(files),
        wwpns=wwpns,
        wwnns=wwnns,
        nvme_host_nqn=nqn,
        nvme_host_id=hostid,
        multipath=multipath_allowed and multipathd and kernel_paths,
        transports=tuple(transports),
        kernel_iscsi=kernel_iscsi,
        platform=platform.machine(),
    )
