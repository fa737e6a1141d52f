"""The kernel's iSCSI sessions as sysfs shows them (/sys/class/iscsi_session, iscsi_connection,
scsi_host): read by the kernel iSCSI connector and by the path supervisor (hostagent.pathcheck).

Read from sysfs, not from `iscsiadm -m session -P 3`, which walks every session of the host (one process
and a sysfs walk per call): the cost of a look would grow with the number of volumes attached.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from hostagent.host.sysfs import Sysfs


@dataclass(frozen=True)
class KernelSession:
    """An iSCSI session as the kernel shows it in sysfs."""

    sid: str
    portal: str  # "address:port" (IPv6 in brackets), as connection info announces it
    target: str
    state: str  # LOGGED_IN, FAILED, FREE


def kernel_sessions(sysfs: Sysfs, targets: Collection[str] | None = None) -> list[KernelSession]:
    """The kernel's iSCSI sessions (to `targets` only, when given): each iscsi_session's targetname and
    state, and its connection's persistent address and port."""
    out = []
    for rel in sysfs.glob("class/iscsi_session/session*/targetname"):
        name = sysfs.read(rel) or ""
        if targets is not None and name not in targets:
            continue
        base = rel.rsplit("/", 1)[0]
        sid = base.rsplit("/", 1)[1].removeprefix("session")
        state = sysfs.read(f"{base}/state") or ""
        for conn in sysfs.glob(f"class/iscsi_connection/connection{sid}:*"):
            address = sysfs.read(f"{conn}/persistent_address") or ""
            port = sysfs.read(f"{conn}/persistent_port") or ""
            shown = f"[{address}]" if ":" in address else address
            out.append(KernelSession(sid, f"{shown}:{port}", name, state))
    return out


def session_host(sysfs: Sysfs, sid: str) -> int:
    """The SCSI host number the session hangs under (-1: not (yet) in sysfs)."""
    hosts = sysfs.glob(f"class/scsi_host/host*/device/session{sid}")
    return int(hosts[0].split("/")[2].removeprefix("host")) if hosts else -1
