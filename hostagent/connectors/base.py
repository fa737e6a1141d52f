"""The one connector interface (os-brick's shape, typed): connect / disconnect / extend / paths.

Each transport has one implementation with its collaborators injected (Runner, Sysfs, UdevWaiter,
Clock, tools). Connectors see frozen `ConnectionInfo`, never dicts or proto messages, and return a
transport-neutral `HostDevice` (a host device, a file, or a network target QEMU opens itself): what a
consumer writes for it (libvirt's disk <source>) is `hostagent.virt.sources`, not the connector's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Protocol

from blockwire.errors import DeadlineExceeded, InvalidArgument
from blockwire.model import ConnectionInfo, IscsiConnection
from blockwire.runtime.clock import Deadline
from blockwire.secret import Secret
from blockwire.validate import validate_connection_info
from hostagent.host.udev import Match, UdevDevice, UdevWaiter
from hostagent.model import ConnectorKind, Finding, HostDevice

log = logging.getLogger(__name__)


class VolumeConnector(Protocol):
    """Connects one transport's volumes to this host."""

    kind: ConnectorKind

    def validate(self, info: ConnectionInfo) -> None:
        """Raises InvalidArgument (naming the field) when the connection info is malformed: the wire
        rules (`blockwire.validate.validate_connection_info`), then what this connector needs. No I/O.
        The other methods trust info that passed it (also from the journal: never checked again)."""
        ...

    def connect(self, info: ConnectionInfo) -> HostDevice:
        """Makes the volume usable here and verifies its identity; says what a consumer opens (a host
        device or file, or `HostDevice.network`). A repeat returns the same device."""
        ...

    def disconnect(self, info: ConnectionInfo, force: bool = False) -> None:
        """Removes everything connect made. A repeat, or a volume not connected, returns quietly."""
        ...

    def extend(self, info: ConnectionInfo) -> int:
        """Rescans after the volume grew; returns the size the host now sees, in bytes."""
        ...

    def paths(self, info: ConnectionInfo) -> list[str]:
        """The host paths (devices or portals) currently leading to the volume."""
        ...

    def expected_paths(self, info: ConnectionInfo) -> int:
        """How many of `paths` a healthy connection of `info` has (fewer: degraded). No I/O."""
        ...


class SecretStore(Protocol):
    """The hypervisor's private secrets by usage id, all the QEMU-native connectors need of it
    (LibvirtHypervisor, the tests' FakeHypervisor)."""

    def define_secret(self, usage: str, secret_type: str, value: Secret) -> str:
        """Defines (or updates) a private secret with this usage id and sets its value; returns its UUID."""
        ...

    def undefine_secret(self, usage: str, secret_type: str) -> bool:
        """Removes the secret; False when there was none."""
        ...

    def secret_exists(self, usage: str, secret_type: str) -> bool: ...

    def unused_secrets(self, prefix: str, secret_type: str) -> list[str]:
        """Usage ids under `prefix` that no domain's live or persistent XML refers to."""
        ...


class PrivateSecrets:
    """One kind of blockwire's per-attachment private libvirt secrets (a usage type under a usage-id
    prefix whose next part is the volume id): what the restart's sweep, the doctor's audit and its fix
    need of them. The iSCSI CHAP, cephx and LUKS secrets alike."""

    def __init__(self, store: SecretStore, prefix: str, secret_type: str, what: str) -> None:
        self.store, self.prefix, self.secret_type, self.what = store, prefix, secret_type, what

    def orphans(self, wanted: Collection[str]) -> list[str]:
        """Usage ids of ours that no journal record (`wanted`) and no domain's XML refers to."""
        return [u for u in self.store.unused_secrets(self.prefix, self.secret_type) if u not in wanted]

    def sweep(self, wanted: Collection[str]) -> list[str]:
        """Undefines the orphans; says what it removed."""
        return [
            f"libvirt secret {u}"
            for u in self.orphans(wanted)
            if self.store.undefine_secret(u, self.secret_type)
        ]

    def findings(self, wanted: Collection[str]) -> list[Finding]:
        """The orphans as the doctor lists them (fixable)."""
        return [
            Finding(
                "libvirt_secret",
                usage,
                f"{self.what} ({self.secret_type} secret) no attachment and no domain uses",
                fixable=True,
                volume_id=usage.removeprefix(self.prefix).partition("/")[0],
            )
            for usage in self.orphans(wanted)
        ]

    def fix(self, finding: Finding) -> bool:
        """Undefines one orphan the doctor found, if it is one of these and still no domain uses it."""
        if finding.kind != "libvirt_secret" or not finding.name.startswith(self.prefix):
            return False
        if finding.name not in self.store.unused_secrets(self.prefix, self.secret_type):
            return False
        return self.store.undefine_secret(finding.name, self.secret_type)


class PrivateSecretsOwner:
    """The restart's sweep, the doctor's audit and its fix, for a part that keeps one kind of private
    secrets (`_private`) and knows which of them the journal's records still want (`_wanted`)."""

    _private: PrivateSecrets

    def _wanted(self, keep: list[ConnectionInfo]) -> set[str]:
        raise NotImplementedError

    def sweep(self, keep: list[ConnectionInfo]) -> list[str]:
        """Undefines our secrets that neither a journal record (`keep`) nor a domain refers to."""
        return self._private.sweep(self._wanted(keep))

    def audit(self, keep: list[ConnectionInfo]) -> list[Finding]:
        """The same secrets, listed for the doctor."""
        return self._private.findings(self._wanted(keep))

    def fix(self, finding: Finding) -> bool:
        return self._private.fix(finding)


def iscsi_of(info: ConnectionInfo) -> IscsiConnection:
    """The iSCSI transport of connection info `validate_iscsi` accepted (on entry, or before it was
    journaled: records are not checked again, so that rules made stricter never strand a detach)."""
    t = info.transport
    if not isinstance(t, IscsiConnection):
        raise InvalidArgument("connection_info", "the iSCSI connector needs an iscsi transport")
    return t


def validate_iscsi(info: ConnectionInfo) -> None:
    """Both iSCSI connectors' `validate`: the wire rules (blockwire.validate), and the transport."""
    iscsi_of(validate_connection_info(info))


def wait_device(
    udev: UdevWaiter,
    subsystem: str,
    match: Match,
    deadline: Deadline,
    *,
    trigger: Callable[[], None] | None = None,
    what: str = "device",
) -> UdevDevice:
    """`udev.wait_for`, then, when the deadline passed without a matching event, one re-check of the
    real state: an event can be lost (netlink buffer overrun, udevd restarted during the wait) while
    the device is there and initialized. Only when the re-check finds nothing either is it
    DEADLINE_EXCEEDED."""
    try:
        return udev.wait_for(subsystem, match, deadline, trigger=trigger, what=what)
    except DeadlineExceeded:
        found = udev.find(subsystem, match)
        if not found:
            raise
        log.warning("no udev event for %s within %gs, but it is there: event missed", what, deadline.seconds)
        return found[0]
