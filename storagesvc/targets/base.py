"""The exporter interface: make a volume reachable as a LUN, for named initiators only.

One target per volume (IQN = prefix + ":" + volume id), one LUN, the volume's WWN and serial on every
portal (see `storagesvc.identity`), CHAP per volume export, and an ACL entry per attaching initiator.
Every method is idempotent: creating what exists or removing what is gone succeeds, so the service can
repeat calls after a crash and undo half-done work with the same calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from blockwire.model import Chap


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


@dataclass(frozen=True)
class TargetState:
    """A target as the exporter found it on the target side."""

    target_iqn: str
    initiators: tuple[str, ...]


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
        """Creates the target with its LUN and CHAP, admitting no initiator yet."""
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
        """Makes the LUN report the device's current size (after an extend)."""
        ...

    def list_targets(self, prefix: str) -> list[TargetState]:
        """Targets on the target side whose IQN starts with `prefix`."""
        ...

    def healthy(self) -> bool: ...


@runtime_checkable
class AccountPruner(Protocol):
    """An exporter whose CHAP accounts live apart from targets (tgt: accounts are global in tgtd), so a
    crash between creating an account and binding it can leave one behind."""

    def prune_accounts(self, is_ours: Callable[[str], bool]) -> list[str]:
        """Deletes accounts `is_ours` claims that no target uses; returns their names."""
        ...
