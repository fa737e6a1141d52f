"""The exporter interface: make a volume reachable as a LUN, for named initiators only.

One target per volume (IQN = prefix + ":" + volume id), one LUN, the volume's WWN and serial on every
portal (see `storagesvc.identity`), CHAP per volume export, and an ACL entry per attaching initiator.

The same interface serves NVMe-oF (`NvmeExporter`, the `nvmet` exporter): there a "target" is a
subsystem (its NQN where an IQN would be), the "LUN" is namespace 1 (identified by NGUID and UUID
instead of WWN), an "initiator" is a host NQN, and DH-HMAC-CHAP secrets belong to the host (see
`NvmeExporter.host_secrets`) rather than to the export. `transport_of` tells the two kinds apart.
Every method is idempotent: creating what exists or removing what is gone succeeds, so the service can
repeat calls after a crash and undo half-done work with the same calls.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from blockwire.model import Chap, Transport
from blockwire.secret import Secret


@dataclass(frozen=True)
class TargetSpec:
    """What a volume's target must look like."""

    volume_id: str
    target_iqn: str
    device_path: str
    wwn: str  # 32 hex digits, NAA-6
    serial: str
    readonly: bool
    chap: Chap | None = None
    mutual_chap: Chap | None = None
    nguid: str = ""  # NVMe exporters: the namespace's NGUID and UUID (storagesvc.identity)
    uuid: str = ""


def same_path(a: str, b: str) -> bool:
    """Whether two device paths name the same thing (a target may report a link resolved)."""
    return a == b or (bool(a) and bool(b) and os.path.realpath(a) == os.path.realpath(b))


@dataclass(frozen=True)
class LunState:
    """The volume's LUN as the exporter found it on the target side."""

    lun: int
    device_path: str  # what the LUN reads and writes; "" when it has no backing
    wwn: str  # the NAA-6 designator it announces (VPD 0x83), 32 hex digits
    serial: str  # its unit serial number (VPD 0x80)
    online: bool = True
    readonly: bool | None = None  # None: the exporter protects writes elsewhere (LIO: per mapped LUN)
    #: An NVMe namespace's NGUID and UUID (its identity in place of wwn and serial); None: a SCSI LUN.
    nguid: str | None = None
    uuid: str | None = None

    def differs(self, spec: TargetSpec) -> str:
        """What is wrong with this LUN for `spec`, in words; "" when it serves the volume as it must."""
        if not same_path(self.device_path, spec.device_path):
            return f"LUN {self.lun} is backed by {self.device_path or 'nothing'}, not {spec.device_path}"
        if self.nguid is not None:
            if (self.nguid, self.uuid) != (spec.nguid, spec.uuid):
                return (
                    f"namespace {self.lun} announces nguid {self.nguid or '-'} uuid {self.uuid or '-'}, "
                    f"not the volume's {spec.nguid} {spec.uuid}"
                )
        elif (self.wwn, self.serial) != (spec.wwn, spec.serial):
            return (
                f"LUN {self.lun} announces wwn {self.wwn or '-'} serial {self.serial or '-'}, "
                f"not the volume's {spec.wwn} {spec.serial}"
            )
        if not self.online:
            return f"LUN {self.lun} is offline"
        if self.readonly is not None and self.readonly != spec.readonly:
            return f"LUN {self.lun} is {'read-only' if self.readonly else 'writable'}, not as exported"
        return ""


@dataclass(frozen=True)
class TargetState:
    """A target as the exporter found it on the target side."""

    target_iqn: str
    initiators: tuple[str, ...]
    lun: LunState | None  # the volume's LUN (`Exporter.lun`); None when the target has lost it


class Exporter(Protocol):
    kind: str
    #: "address:port" strings announced in connection info, in order; two or more give multipath.
    portals: tuple[str, ...]
    #: LUN number the volume appears at on its target.
    lun: int

    def start(self) -> None:
        """Prepares the target side (portals) at service start; idempotent."""
        ...

    def ensure_target(self, spec: TargetSpec) -> None:
        """Creates the target with its LUN and CHAP, admitting no initiator yet; on an existing target,
        puts back what is missing or wrong (the LUN, its backing, its identity) without touching the
        ACL or the sessions logged in."""
        ...

    def remove_target(self, target_iqn: str) -> None:
        """Removes the target, its LUN, ACL and CHAP accounts. A missing target is fine."""
        ...

    def allow(self, spec: TargetSpec, initiator_iqn: str) -> None:
        """Admits one initiator (with the spec's CHAP, for exporters that keep CHAP per initiator)."""
        ...

    def deny(self, target_iqn: str, initiator_iqn: str) -> None:
        """Removes one initiator from the ACL; a missing entry or target is fine."""
        ...

    def resize(self, spec: TargetSpec) -> None:
        """Makes the LUN report the device's current size (after an extend), never leaving it without
        its identity or backing; on failure the LUN is as before (or as `ensure_target` makes it)."""
        ...

    def list_targets(self, prefix: str) -> list[TargetState]:
        """Targets on the target side whose IQN starts with `prefix`, each with its ACL and the state
        of its LUN (backing, identity), read in one listing where the exporter can."""
        ...

    def healthy(self) -> bool: ...


@runtime_checkable
class AccountPruner(Protocol):
    """An exporter whose CHAP accounts live apart from targets (tgt: accounts are global in tgtd), so a
    crash between creating an account and binding it can leave one behind."""

    def prune_accounts(self, is_ours: Callable[[str], bool]) -> list[str]:
        """Deletes accounts `is_ours` claims that no target uses; returns their names."""
        ...


@runtime_checkable
class NvmeExporter(Protocol):
    """An exporter over NVMe-oF. Its targets are subsystems named `nqn_prefix` + ":" + volume id
    (`storagesvc.identity.subsystem_nqn`), its initiators host NQNs (`Connector.nvme_host_nqn`), and
    DH-HMAC-CHAP secrets are per host: the kernel target keeps one key per host NQN for every subsystem
    that admits it."""

    nqn_prefix: str

    def host_secrets(self, host_nqn: str) -> tuple[Secret | None, Secret | None]:
        """The host's DH-HMAC-CHAP secrets (host, controller) as `allow` sets them; (None, None) when
        authentication is off, (secret, None) when the target cannot authenticate itself to hosts."""
        ...


def transport_of(exporter: Exporter) -> Transport:
    """The transport hosts reach `exporter`'s targets over."""
    return Transport.NVME_TCP if isinstance(exporter, NvmeExporter) else Transport.ISCSI
