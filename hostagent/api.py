"""HostAgent: the facade a virt manager embeds (attach / detach / extend / list / migrate / reconcile). No
grpc. Live migration's handoff lives in hostagent/migration.py; the facade's methods delegate to it.

Attach is journal first, act second, undo on failure (STYLE.md rule 6):

    journal(ATTACHING) -> storage.create_attachment -> connector.connect (identity verified)
      -> hypervisor.attach_disk -> storage.complete_attachment -> journal(ATTACHED)

Each step that made something pushes its compensation on an ExitStack; a failure unwinds them in
reverse and removes the journal record, so a failed attach leaves nothing (no export, no device, no
libvirt secret, no disk). If a compensation itself fails, the record stays in ERROR and a detach or
`reconcile()` finishes the job. Calls on one volume are serialized (a concurrent one gets ABORTED);
calls on different volumes run in parallel.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, fields, replace
from typing import Protocol, runtime_checkable

from blockwire import validate
from blockwire.errors import (
    BlockwireError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from blockwire.model import (
    AccessMode,
    ConnectionInfo,
    Connector,
    IoTune,
    LocalConnection,
    NvmeofConnection,
    RbdConnection,
    Transport,
)
from blockwire.runtime.clock import Clock, Deadline
from blockwire.runtime.failpoints import NO_FAILPOINTS, Failpoints
from blockwire.runtime.locks import KeyedLocks
from hostagent import doctor
from hostagent.connectors.base import VolumeConnector
from hostagent.encryption import VolumeKeys
from hostagent.events import EventBus
from hostagent.journal import Journal
from hostagent.migration import (
    MigrationHandoff,
    MigrationResult,
    MigrationVolume,
    PeerAgent,
    PreparedMigration,
)
from hostagent.model import (
    AttachmentState,
    Cache,
    ConnectorKind,
    Discard,
    DiskOptions,
    Event,
    EventType,
    Finding,
    HostDevice,
    Io,
    JournalRecord,
)
from hostagent.storage import StorageApi, StorageAttachment
from hostagent.virt.diskxml import BlockSource, DiskSpec, FileSource, LiveDisk, Source
from hostagent.virt.hypervisor import DomainInfo, Hypervisor
from hostagent.virt.sources import disk_source

log = logging.getLogger(__name__)

# Failpoints (blockwire.runtime.failpoints, injected; the daemon arms them from BLOCKWIRE_FAILPOINTS):
# where the recovery tests kill the agent. The recovery rule of each is in `HostAgent.reconcile`.
FP_ATTACH_AFTER_JOURNAL = "agent.attach.after_journal"
FP_ATTACH_AFTER_CREATE_ATTACHMENT = "agent.attach.after_create_attachment"
FP_ATTACH_AFTER_CONNECT = "agent.attach.after_connect"
FP_ATTACH_AFTER_HOTPLUG = "agent.attach.after_hotplug"
FP_ATTACH_BEFORE_COMPLETE = "agent.attach.before_complete"
FP_ATTACH_AFTER_COMPLETE = "agent.attach.after_complete"
FP_DETACH_AFTER_JOURNAL = "agent.detach.after_journal"
FP_DETACH_AFTER_UNPLUG = "agent.detach.after_unplug"
FP_DETACH_AFTER_DISCONNECT = "agent.detach.after_disconnect"
FP_DETACH_BEFORE_DELETE_ATTACHMENT = "agent.detach.before_delete_attachment"
FP_DETACH_AFTER_DELETE_ATTACHMENT = "agent.detach.after_delete_attachment"
ATTACH_FAILPOINTS = (
    FP_ATTACH_AFTER_JOURNAL,
    FP_ATTACH_AFTER_CREATE_ATTACHMENT,
    FP_ATTACH_AFTER_CONNECT,
    FP_ATTACH_AFTER_HOTPLUG,
    FP_ATTACH_BEFORE_COMPLETE,
    FP_ATTACH_AFTER_COMPLETE,
)
DETACH_FAILPOINTS = (
    FP_DETACH_AFTER_JOURNAL,
    FP_DETACH_AFTER_UNPLUG,
    FP_DETACH_AFTER_DISCONNECT,
    FP_DETACH_BEFORE_DELETE_ATTACHMENT,
    FP_DETACH_AFTER_DELETE_ATTACHMENT,
)

_SERIAL_BAD = re.compile(r"[^A-Za-z0-9._-]")


@runtime_checkable
class Sweeper(Protocol):
    """A connector that can find host state it made which no journal record accounts for."""

    def sweep(self, keep: list[ConnectionInfo]) -> list[str]:
        """Removes what this connector made on the host for volumes not in `keep`; returns what it removed."""
        ...


@runtime_checkable
class PathRestorer(Protocol):
    """A multipath connector that can log in again the lost paths of a live attachment without ever
    touching the paths and map the attachment still uses."""

    def restore_paths(self, info: ConnectionInfo) -> list[str]:
        """Reconnects the paths of `info` that have no device; returns the devices added."""
        ...


@dataclass(frozen=True)
class ReconcileAction:
    volume_id: str
    domain: str
    action: str  # "kept", "finished", "rolled back", "failed"
    detail: str = ""


def combine_iotune(a: IoTune, b: IoTune) -> IoTune:
    """Field by field, the stricter non-zero limit wins."""
    values: dict[str, int | str] = {}
    for f in fields(IoTune):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "group_name":
            values[f.name] = x or y
        else:
            values[f.name] = min(v for v in (x, y) if v) if (x or y) else 0
    return IoTune(**values)  # type: ignore[arg-type]


def default_serial(volume_id: str, info_serial: str) -> str:
    if info_serial and validate.DISK_SERIAL_RE.fullmatch(info_serial):
        return info_serial
    return _SERIAL_BAD.sub("", volume_id)[:20] or "blockwire"


def require_identity(info: ConnectionInfo, allow_unverified: bool) -> None:
    """Connection info must announce the identity the device is checked against (STYLE.md rule 7),
    unless the caller opts out for this call; a local path has none to check."""
    if info.kind is Transport.LOCAL or info.wwn or info.serial or allow_unverified:
        return
    if isinstance(info.transport, RbdConnection) and info.transport.image_id:
        return  # an RBD image's identity is its id (the RBD connectors verify it)
    t = info.transport
    if isinstance(t, NvmeofConnection) and (t.namespace_nguid or t.namespace_uuid):
        return
    raise FailedPrecondition(
        f"the connection info of volume {info.volume_id} announces no identity (neither wwn nor serial, nor "
        "an NVMe namespace NGUID or UUID, nor an RBD image id), "
        "so the device it reaches cannot be checked; give the volume's wwn, or set "
        "allow_unverified_identity for this call"
    )


def check_sharing(info: ConnectionInfo, disk: DiskOptions, others: list[JournalRecord]) -> None:
    """Storage is the authority on whether a volume may reach several domains (STYLE.md rule 13)."""
    if info.multiattach:
        return
    if others:
        raise FailedPrecondition(
            f"volume {info.volume_id} is attached to domain {others[0].domain!r} on this host and is not "
            "multiattach; detach it there first"
        )
    if disk.shareable:
        raise FailedPrecondition(
            f"volume {info.volume_id} is not multiattach, so its disk cannot be shareable; "
            "create the volume multiattach to share it"
        )


def source_path(source: Source) -> str:
    """The host path a disk source opens ("" for a network disk, which QEMU connects by itself)."""
    if isinstance(source, BlockSource):
        return source.dev
    if isinstance(source, FileSource):
        return source.file
    return ""


def option_differences(
    a: JournalRecord, live: LiveDisk, disk: DiskOptions, access_mode: AccessMode, persistent: bool
) -> list[str]:
    """What a repeated attach asks differently from the attachment that exists (empty: the same).
    Options left at their default ("the volume's", "next free") match whatever was chosen."""
    spec = live.spec
    differs: list[str] = []

    def differ(name: str, have: object, want: object) -> None:
        if have != want:
            differs.append(f"{name} is {_shown(have)}, asked {_shown(want)}")

    differ("access_mode", a.access_mode, access_mode)
    differ("persistent", a.persistent, persistent)
    differ("bus", spec.bus, disk.bus)
    differ("read_only", spec.read_only, disk.read_only or access_mode is AccessMode.READ_ONLY)
    differ("cache", spec.cache, disk.cache)
    if disk.io is not None:
        differ("io", spec.io, disk.io)
    if disk.discard is not None:
        differ("discard", spec.discard, disk.discard)
    if disk.serial:
        differ("serial", spec.serial, disk.serial)
    if disk.target_dev:
        differ("target_dev", spec.target_dev, disk.target_dev)
    if disk.shareable:
        differ("shareable", spec.shareable, True)
    if not disk.iotune.is_empty():
        differ("iotune", spec.iotune, combine_iotune(disk.iotune, a.connection_info.qos))
    if disk.logical_block_size:
        differ("logical_block_size", spec.logical_block_size or 512, disk.logical_block_size)
    if disk.physical_block_size:
        differ("physical_block_size", spec.physical_block_size or 512, disk.physical_block_size)
    if disk.boot_order:
        differ("boot_order", spec.boot_order, disk.boot_order)
    return differs


def _shown(value: object) -> str:
    return str(value.value) if isinstance(value, enum.Enum) else str(value)


def _disk_size(info: ConnectionInfo, device_size: int) -> int:
    """The size the domain's disk gets for a device of `device_size` bytes. An encrypted volume's disk
    is QEMU's luks layer, whose size is the payload's: libvirt resizes that layer, and QEMU grows the
    device beneath it to the payload's offset plus that size, so the header's bytes come off (given in
    full, QEMU would try to grow the device past its end, or an RBD image by the header's size)."""
    if info.encryption is None:
        return device_size
    return device_size - info.encryption.header_bytes


class HostAgent:
    """Attaches volumes to this host's libvirt domains. Every collaborator is injected."""

    def __init__(
        self,
        *,
        hypervisor: Hypervisor,
        connectors: Mapping[Transport, VolumeConnector],
        journal: Journal,
        connector: Connector,
        clock: Clock,
        storage: StorageApi | None = None,
        events: EventBus | None = None,
        detach_timeout: float = 30.0,
        extra_connectors: tuple[VolumeConnector, ...] = (),
        failpoints: Failpoints = NO_FAILPOINTS,
        volume_keys: VolumeKeys | None = None,
    ) -> None:
        self.hypervisor = hypervisor
        self.volume_keys = volume_keys  # encrypted volumes; None: refused on this host
        self.failpoints = failpoints
        self.connectors = dict(connectors)
        self._by_kind = {c.kind: c for c in (*connectors.values(), *extra_connectors)}
        self.journal = journal
        self.connector = connector
        self.clock = clock
        self.storage = storage
        self.events = events or EventBus()
        self.detach_timeout = detach_timeout
        self._locks = KeyedLocks()
        self.migration = MigrationHandoff(self)

    # -- helpers ----------------------------------------------------------------------------------
    def _emit(self, type_: EventType, a: JournalRecord | None = None, **kw: str) -> None:
        base: dict[str, str] = {}
        if a is not None:
            base = {"volume_id": a.volume_id, "domain": a.domain, "attachment_id": a.attachment_id}
        self.events.publish(Event(type=type_, time=self.clock.now(), **{**base, **kw}))

    def emit(self, type_: EventType, a: JournalRecord | None = None, **kw: str) -> None:
        """Publishes an event on the agent's bus (for supervisors working beside the api)."""
        self._emit(type_, a, **kw)

    def connector_of_kind(self, kind: ConnectorKind) -> VolumeConnector | None:
        return self._by_kind.get(kind)

    def hold_volume(self, volume_id: str) -> AbstractContextManager[None]:
        """The volume's lock, or Aborted at once when a call on the volume is in flight."""
        return self._locks.hold_or_abort(volume_id, f"volume {volume_id}")

    def _connector_for(self, info: ConnectionInfo, kind: ConnectorKind | None = None) -> VolumeConnector:
        if kind is not None and kind in self._by_kind:
            return self._by_kind[kind]
        try:
            return self.connectors[info.kind]
        except KeyError:
            raise InvalidArgument(
                "connection_info", f"transport {info.kind.value} is not supported on this host"
            ) from None

    def _domain_or_none(self, domain: str) -> DomainInfo | None:
        try:
            return self.hypervisor.lookup(domain)
        except NotFound:
            return None

    def _disk_by_serial(self, domain: str, serial: str, *, inactive: bool = False) -> LiveDisk | None:
        disks = self.hypervisor.disks(domain, inactive=inactive)
        return next((d for d in disks if d.spec.serial == serial), None)

    def _domain_of(self, a: JournalRecord) -> DomainInfo | None:
        """The domain a record is about, or None when it is gone. A domain defined later under the same
        name (another UUID) is not it: its disks are never taken for the record's."""
        dom = self._domain_or_none(a.domain)
        if dom is not None and a.domain_uuid and dom.uuid != a.domain_uuid:
            log.warning(
                "domain %r is now %s, not %s of the record of %s: treating the record's domain as gone",
                a.domain,
                dom.uuid,
                a.domain_uuid,
                a.volume_id,
            )
            return None
        return dom

    def _live_disk(self, a: JournalRecord) -> LiveDisk | None:
        dom = self._domain_of(a)
        return self._disk_by_serial(dom.name, a.serial) if dom is not None and dom.running else None

    def _disk_of(self, a: JournalRecord, dom: DomainInfo | None) -> LiveDisk | None:
        """`a`'s disk where the domain has it now: in its live XML when it runs, in its definition when
        it is shut off (a cold attach, or a persistent one of a domain stopped since)."""
        if dom is None:
            return None
        if dom.running:
            return self._disk_by_serial(dom.name, a.serial)
        return self._disk_by_serial(dom.name, a.serial, inactive=True) if dom.persistent else None

    def _other_holders(self, a: JournalRecord) -> list[str]:
        """Domains other than `a`'s own (by UUID) whose live XML or definition has `a`'s disk (same
        serial and the same host device or network source): a domain undefined and defined again, whose
        next start would open the volume. Their disk is never taken away by cleaning up `a`."""
        own = self._domain_of(a)
        found = []
        for name, disks in self.hypervisor.defined_disks().items():
            if own is not None and name == own.name:
                continue
            for d in disks:
                if d.spec.serial != a.serial:
                    continue
                path = source_path(d.spec.source)
                if (a.host_device and path == a.host_device) or (not path and not a.host_device):
                    found.append(f"domain {name!r} ({d.spec.target_dev})")
                    break
        return found

    def _unplug_or_hold(self, a: JournalRecord, held: list[str]) -> None:
        """The hot-plug's undo: unplugs `a`'s disk if the domain has it. When the domain does not let
        go, `held` names it, so that nothing under the disk is disconnected or unexported."""
        dom = self._domain_of(a)
        if dom is not None and not dom.running:  # a cold attach: the disk leaves the definition
            cold = self._disk_of(a, dom)
            if cold is not None:
                self.hypervisor.detach_disk(
                    dom.name, cold.spec.target_dev, Deadline(self.clock, self.detach_timeout)
                )
            return
        if dom is None:
            return
        live = self._disk_by_serial(dom.name, a.serial)
        if live is None:
            return
        try:
            self.hypervisor.detach_disk(
                dom.name, live.spec.target_dev, Deadline(self.clock, self.detach_timeout)
            )
        except BlockwireError:
            try:
                still = self._disk_by_serial(dom.name, a.serial) is not None
            except BlockwireError:
                still = True  # cannot tell (libvirt down): assume the domain still has it
            if still:
                held.append(f"domain {dom.name!r} ({live.spec.target_dev})")
            raise

    def _holders(self, a: JournalRecord) -> tuple[list[str], list[str]]:
        """Who holds what `a`'s disconnect would remove: (running domains outside the journal's
        accounting, domains of other records of the volume that share the host device)."""
        sharing = {o.domain for o in self.journal.of_volume(a.volume_id) if o.domain != a.domain}
        foreign: list[str] = []
        shared: list[str] = []
        if a.host_device:
            running = self.hypervisor.running_disks()
        else:
            # No host device (a network disk QEMU opens itself): only the record's own disk, found by its
            # serial in its own domain, can hold it; no need to read every running domain's XML
            dom = self._domain_or_none(a.domain)
            running = {dom.name: self.hypervisor.disks(dom.name)} if dom is not None and dom.running else {}
        for name, disks in running.items():
            for d in disks:
                ours = name == a.domain and bool(a.serial) and d.spec.serial == a.serial
                same_device = bool(a.host_device) and source_path(d.spec.source) == a.host_device
                if not (ours or same_device):
                    continue
                where = f"domain {name!r} ({d.spec.target_dev})"
                (shared if name in sharing and not ours else foreign).append(where)
        return foreign, shared

    def _disconnect(self, a: JournalRecord, *, force: bool) -> None:
        """Disconnects `a` on the host unless a running domain holds it (never, whatever `force`
        says: force only overrides a device held open by a process) or another domain's attachment of
        the same multiattach volume shares the host device (then it stays for that one)."""
        if a.connector_kind is None:
            return
        foreign, shared = self._holders(a)
        if foreign:
            raise FailedPrecondition(
                f"{', '.join(foreign)} still holds volume {a.volume_id}; not disconnecting it from the "
                "host. Detach it from that domain first, then repeat"
            )
        if self.volume_keys is not None:  # this attachment's own secret, whoever shares the device
            self.volume_keys.remove(a.connection_info)
        if shared:
            log.info("volume %s: host connection kept for %s", a.volume_id, ", ".join(shared))
            return
        self._connector_for(a.connection_info, a.connector_kind).disconnect(a.connection_info, force)

    @staticmethod
    def _validate_options(disk: DiskOptions) -> None:
        validate.disk_serial(disk.serial, "disk.serial")
        validate.target_dev(disk.target_dev, "disk.target_dev")
        validate.block_size(disk.logical_block_size, "disk.logical_block_size")
        validate.block_size(disk.physical_block_size, "disk.physical_block_size")
        validate.iotune(disk.iotune, "disk.iotune")
        validate.boot_order(disk.boot_order)

    def _validate_info(self, info: ConnectionInfo) -> VolumeConnector:
        """The wire rules (blockwire.validate; also for a connector that does not run them), then the
        connector's own; returns the connector."""
        validate.validate_connection_info(info)
        conn = self._connector_for(info)
        conn.validate(info)
        return conn

    def _spec(
        self, target: str, a: JournalRecord, info: ConnectionInfo, source: Source, disk: DiskOptions
    ) -> DiskSpec:
        """The disk's spec at `target` (the name the hypervisor allocated under its per-domain lock)."""
        is_block = isinstance(source, BlockSource)
        io = disk.io or (
            Io.NATIVE if is_block and disk.cache in (Cache.NONE, Cache.DIRECTSYNC) else Io.THREADS
        )
        discard = disk.discard or (Discard.UNMAP if info.discard else None)
        logical = disk.logical_block_size or (
            info.logical_block_size if info.logical_block_size != 512 else 0
        )
        # QEMU refuses a physical block size below the logical one, and takes 512 when none is given: a
        # 4096-byte logical size (nvmet on a 4 KiB file system) needs its physical size written too.
        physical = disk.physical_block_size or max(
            info.physical_block_size if info.physical_block_size != 512 else 0, logical
        )
        return DiskSpec(
            source=source,
            target_dev=target,
            bus=disk.bus,
            cache=disk.cache,
            io=io,
            discard=discard,
            iotune=combine_iotune(disk.iotune, info.qos),
            serial=a.serial,
            read_only=disk.read_only or a.access_mode is AccessMode.READ_ONLY,
            shareable=info.multiattach,
            logical_block_size=logical,
            physical_block_size=physical,
            boot_order=disk.boot_order,
        )

    def _undo(
        self,
        stack: ExitStack,
        failures: list[str],
        name: str,
        fn: Callable[[], object],
        *,
        unless_held: list[str] | None = None,
    ) -> None:
        """Pushes a compensation. One that would take away what a domain still holds (`unless_held`
        names the holder, set by the failed unplug) is not run: it is recorded as a failure, so the
        record stays ERROR with everything under the disk intact for a later detach."""

        def run() -> None:
            if unless_held:
                failures.append(f"{name}: kept, {unless_held[0]} still holds the disk")
                log.error("not undoing %s: %s still holds the disk", name, unless_held[0])
                return
            try:
                fn()
            except Exception as exc:
                log.exception("undoing %s failed", name)
                failures.append(f"{name}: {getattr(exc, 'message', type(exc).__name__)}")

        stack.callback(run)

    @staticmethod
    def _is_cold(dom: DomainInfo, disk: DiskOptions) -> bool:
        """Whether an attach to `dom` is a cold one (shut off: the definition only); refuses what
        cannot be done to the domain as it is."""
        if not dom.running:
            if not dom.persistent:
                raise FailedPrecondition(f"domain {dom.name!r} is neither running nor defined")
            return True
        if disk.boot_order:
            raise FailedPrecondition(
                f"domain {dom.name!r} is running: a boot order is only written into the definition of a "
                "shut-off domain (a cold attach); attach without boot_order, or shut the domain off first"
            )
        return False

    # -- attach -----------------------------------------------------------------------------------
    def attach(
        self,
        domain: str,
        *,
        volume_id: str = "",
        connection_info: ConnectionInfo | None = None,
        disk: DiskOptions | None = None,
        access_mode: AccessMode = AccessMode.READ_WRITE,
        persistent: bool = False,
        allow_unverified_identity: bool = False,
    ) -> JournalRecord:
        """Attaches a volume (by id, through storage; or by connection info) to a domain.

        A running domain gets the disk hot-plugged (and, `persistent`, in its definition too). A defined,
        shut-off domain gets it written into its definition only (a cold attach: `persistent` is implied,
        and `disk.boot_order` may make it the boot disk); the host side is connected (identity verified)
        and stays so while the disk is in the definition, so that the domain's start opens it.

        A repeat with the same options returns the attachment; with other options it is
        FailedPrecondition naming what differs. Connection info that announces no identity is refused
        unless `allow_unverified_identity` (local paths excepted). Every argument is checked first
        (blockwire.validate), as for a gRPC caller."""
        disk = disk or DiskOptions()
        validate.domain(domain)
        if bool(volume_id) == (connection_info is not None):
            raise InvalidArgument("volume", "give exactly one of volume_id and connection_info")
        if connection_info is not None:
            if not connection_info.volume_id:
                raise InvalidArgument("connection_info.volume_id", "required")
            self._validate_info(connection_info)
            require_identity(connection_info, allow_unverified_identity)
            volume_id = connection_info.volume_id
        else:
            validate.object_id(volume_id, "volume_id")
            if self.storage is None:
                raise FailedPrecondition("no storage service is configured; pass connection_info instead")
        self._validate_options(disk)
        if access_mode is AccessMode.READ_ONLY:
            disk = replace(disk, read_only=True)
        dom = self.hypervisor.lookup(domain)
        cold = self._is_cold(dom, disk)
        persistent = persistent or cold  # a cold attach writes the definition: that is what it is
        with self._locks.hold_or_abort(volume_id, f"volume {volume_id}"):
            existing = self.journal.get(volume_id, dom.name)
            if existing is not None and existing.migration_source_id:
                raise FailedPrecondition(
                    f"volume {volume_id} is being migrated to {dom.name!r} on this host "
                    f"({existing.state.value}); finish or abort that migration first"
                )
            if existing is not None:
                live = (
                    self._disk_of(existing, self._domain_of(existing))
                    if existing.state is AttachmentState.ATTACHED
                    else None
                )
                if live is not None:
                    differs = option_differences(existing, live, disk, access_mode, persistent)
                    if differs:
                        raise FailedPrecondition(
                            f"volume {volume_id} is already attached to {dom.name!r} with other options "
                            f"({'; '.join(differs)}); detach it first to attach it this way"
                        )
                    return existing
                log.warning("finishing a half-done attachment of %s to %s first", volume_id, dom.name)
                self._teardown(existing)
            others = [a for a in self.journal.of_volume(volume_id) if a.domain != dom.name]
            if connection_info is not None:
                check_sharing(connection_info, disk, others)
            return self._attach(
                dom=dom,
                volume_id=volume_id,
                given=connection_info,
                disk=disk,
                access_mode=access_mode,
                persistent=persistent,
                others=others,
                allow_unverified_identity=allow_unverified_identity,
                cold=cold,
            )

    def _attach(
        self,
        *,
        dom: DomainInfo,
        volume_id: str,
        given: ConnectionInfo | None,
        disk: DiskOptions,
        access_mode: AccessMode,
        persistent: bool,
        others: list[JournalRecord],
        allow_unverified_identity: bool,
        cold: bool = False,
    ) -> JournalRecord:
        now = self.clock.now()
        info = given or ConnectionInfo(transport=LocalConnection(""), volume_id=volume_id)
        a = JournalRecord(
            volume_id=volume_id,
            domain=dom.name,
            domain_uuid=dom.uuid,
            state=AttachmentState.ATTACHING,
            connection_info=info,
            access_mode=access_mode,
            owns_export=given is None,
            persistent=persistent,
            serial=disk.serial or default_serial(volume_id, info.serial),
            create_time=now,
            update_time=now,
        )
        failures: list[str] = []
        held: list[str] = []  # who still holds the disk after a failed unplug: nothing under it is undone
        self._emit(EventType.ATTACH_STARTED, a)
        with ExitStack() as stack:
            try:
                self.journal.put(a)
                # Last to run: the record goes only when every other compensation succeeded.
                self._undo(
                    stack,
                    failures,
                    "journal",
                    lambda: None if failures else self.journal.delete(volume_id, dom.name),
                )
                self.failpoints.hit(FP_ATTACH_AFTER_JOURNAL)
                if given is None:
                    a = self._export(
                        a,
                        stack=stack,
                        failures=failures,
                        held=held,
                        disk=disk,
                        others=others,
                        allow_unverified_identity=allow_unverified_identity,
                    )
                    info = a.connection_info
                conn = self._validate_info(info)  # what storage announced is checked as what a caller gives
                keys = self._volume_keys(info)
                if a.connector_kind is not conn.kind:  # with storage's export, already in that write
                    a = self.journal.update(a, connector_kind=conn.kind)
                self._undo(
                    stack,
                    failures,
                    "host connection",
                    lambda: self._disconnect(a, force=True),
                    unless_held=held,
                )
                device = conn.connect(info)
                self.failpoints.hit(FP_ATTACH_AFTER_CONNECT)
                if not info.wwn and device.wwn:
                    # The record keeps the identity connect found: detach, reconcile and path repair
                    # remove only devices whose WWN they can match (never "whatever is at the LUN").
                    info = replace(info, wwn=device.wwn)
                if device.path != a.host_device or info is not a.connection_info:
                    # (a network disk: no host device, and the identity was announced: nothing new)
                    a = self.journal.update(a, host_device=device.path, connection_info=info)
                self._emit(EventType.PROGRESS, a, step="connect", path=device.path)
                att = a
                # Registered before the hot-plug: libvirt can fail after QEMU added the device, and
                # the undo then finds it by its serial in the live XML.
                self._undo(stack, failures, "hot-plug", lambda: self._unplug_or_hold(att, held))
                source = disk_source(device)
                encryption = keys.define(info) if keys is not None else None
                spec = self.hypervisor.attach_disk(
                    dom.name,
                    lambda target: replace(
                        self._spec(target, att, info, source, disk), encryption=encryption
                    ),
                    bus=disk.bus,
                    preferred_target=disk.target_dev,
                    persistent=persistent,
                    cold=cold,
                )
                self.failpoints.hit(FP_ATTACH_AFTER_HOTPLUG)
                # Written with ATTACHED below, not on its own: a crash before that finds the disk by its
                # serial and takes the live target name (reconcile's table: after_hotplug)
                a = replace(a, target_dev=spec.target_dev)
                self._emit(EventType.PROGRESS, a, step="hotplug", path=spec.target_dev)
                self.failpoints.hit(FP_ATTACH_BEFORE_COMPLETE)
                if a.owns_export and self.storage is not None:
                    self.storage.complete_attachment(a.attachment_id, spec.target_dev, device.path)
                self.failpoints.hit(FP_ATTACH_AFTER_COMPLETE)
                a = self.journal.update(a, state=AttachmentState.ATTACHED, update_time=self.clock.now())
            except BaseException as exc:
                message = exc.message if isinstance(exc, BlockwireError) else type(exc).__name__
                stack.close()
                if failures:
                    self.journal.put(
                        replace(a, state=AttachmentState.ERROR, error_message="; ".join(failures)[:1000])
                    )
                self._emit(EventType.ATTACH_FAILED, a, message=message)
                raise
            stack.pop_all()
        self._emit(EventType.ATTACHED, a, path=a.target_dev)
        log.info("attached volume %s to %s as %s", volume_id, dom.name, a.target_dev)
        return a

    def _volume_keys(self, info: ConnectionInfo) -> VolumeKeys | None:
        """For an encrypted volume, the host's key handling, after checking the key came along."""
        if info.encryption is None:
            return None
        if self.volume_keys is None:
            raise FailedPrecondition(
                f"volume {info.volume_id} is encrypted and this host's agent has no libvirt secrets to "
                "hand its key to QEMU"
            )
        self.volume_keys.check(info)
        return self.volume_keys

    def _export(
        self,
        a: JournalRecord,
        *,
        stack: ExitStack,
        failures: list[str],
        held: list[str],
        disk: DiskOptions,
        others: list[JournalRecord],
        allow_unverified_identity: bool,
    ) -> JournalRecord:
        """Storage CreateAttachment, its undo, and the checks of what storage announced."""
        storage = self._storage()
        sa = self._create_export(storage, a.volume_id, a.access_mode, a.domain, failures)
        self._undo(stack, failures, "export", lambda: storage.delete_attachment(sa.id), unless_held=held)
        self.failpoints.hit(FP_ATTACH_AFTER_CREATE_ATTACHMENT)
        info = sa.connection_info
        # One write: the export's id, and the connector that will connect (when this host has one for
        # the transport; `_attach` checks the info and writes it otherwise), so connect needs no other.
        conn = self.connectors.get(info.kind)
        a = self.journal.update(
            a,
            attachment_id=sa.id,
            connection_info=info,
            serial=disk.serial or default_serial(a.volume_id, info.serial),
            connector_kind=conn.kind if conn is not None else None,
        )
        self._emit(EventType.PROGRESS, a, step="export")
        require_identity(info, allow_unverified_identity)
        check_sharing(info, disk, others)
        return a

    def _storage(self) -> StorageApi:
        assert self.storage is not None
        return self.storage

    def _create_export(
        self, storage: StorageApi, volume_id: str, mode: AccessMode, domain: str, failures: list[str]
    ) -> StorageAttachment:
        try:
            return storage.create_attachment(volume_id, self.connector, mode, domain)
        except (Unavailable, DeadlineExceeded):
            # Storage may have made the export and lost the answer: keep the record (ERROR) so that a
            # repeat attach, a detach or reconcile finds the export (a repeat CreateAttachment) and
            # deletes it.
            failures.append("export: outcome unknown, storage did not answer")
            raise

    # -- detach -----------------------------------------------------------------------------------
    def detach(self, domain: str, volume_id: str, *, force: bool = False) -> bool:
        """Detaches and disconnects; False when nothing was attached (a repeat)."""
        validate.domain(domain)
        validate.object_id(volume_id, "volume_id")
        with self._locks.hold_or_abort(volume_id, f"volume {volume_id}"):
            dom = self._domain_or_none(domain)
            name = dom.name if dom is not None else domain
            a = self.journal.get(volume_id, name)
            if a is None:
                return False
            a = self.journal.update(a, state=AttachmentState.DETACHING, update_time=self.clock.now())
            self.failpoints.hit(FP_DETACH_AFTER_JOURNAL)
            self._emit(EventType.DETACH_STARTED, a)
            try:
                self._teardown(a, force=force)
            except BaseException as exc:
                self._emit(EventType.DETACH_FAILED, a, message=getattr(exc, "message", type(exc).__name__))
                raise
            self._emit(EventType.DETACHED, a)
            log.info("detached volume %s from %s", volume_id, name)
            return True

    def _teardown(self, a: JournalRecord, *, force: bool = True) -> None:
        """Undoes whatever of `a` exists, in reverse order, then drops the record. Idempotent.

        The disk goes from the live domain and from a persistent definition (also of a shut-off
        domain: its next start must not find a stale path); the host side is disconnected only when no
        running domain holds it (`_disconnect`)."""
        if a.state is not AttachmentState.DETACHING:  # detach() wrote it already
            a = self.journal.update(a, state=AttachmentState.DETACHING)
        dom = self._domain_of(a)
        if dom is not None:
            live = self._disk_by_serial(dom.name, a.serial) if dom.running else None
            if live is None and dom.persistent:
                live = self._disk_by_serial(dom.name, a.serial, inactive=True)
            if live is not None:
                self.hypervisor.detach_disk(
                    dom.name, live.spec.target_dev, Deadline(self.clock, self.detach_timeout)
                )
                self.failpoints.hit(FP_DETACH_AFTER_UNPLUG)
        if a.connector_kind is not None:  # connect may have begun: disconnect (idempotent)
            self._disconnect(a, force=force)
            self.failpoints.hit(FP_DETACH_AFTER_DISCONNECT)
        if a.owns_export and self.storage is not None and a.migration_source_id:
            self._rollback_migration(a)  # a destination's attachment of a live migration
        elif a.owns_export and self.storage is not None:
            self.failpoints.hit(FP_DETACH_BEFORE_DELETE_ATTACHMENT)
            attachment_id = a.attachment_id
            if not attachment_id:
                # Crashed between CreateAttachment and recording its id: a repeat (idempotent per
                # volume and host) tells us the id, which is then deleted.
                attachment_id = self.storage.create_attachment(
                    a.volume_id, self.connector, a.access_mode, a.domain
                ).id
            self.storage.delete_attachment(attachment_id)
            self.failpoints.hit(FP_DETACH_AFTER_DELETE_ATTACHMENT)
        self.journal.delete(a.volume_id, a.domain)

    def _rollback_migration(self, a: JournalRecord) -> None:
        """Storage's side of undoing a migration's destination record: RollbackMigration; one that
        storage already completed is an ordinary attachment, which is deleted."""
        storage = self._storage()
        attachment_id = a.attachment_id
        if not attachment_id:
            # Crashed between CreateMigrationAttachment and recording its id: a repeat tells it.
            try:
                attachment_id = storage.create_migration_attachment(
                    a.migration_source_id, self.connector, a.domain
                ).id
            except (NotFound, FailedPrecondition) as exc:
                log.warning(
                    "%s@%s: no migration attachment to roll back (%s)", a.volume_id, a.domain, exc.message
                )
                return
        try:
            storage.rollback_migration(attachment_id)
        except FailedPrecondition:
            storage.delete_attachment(attachment_id)

    # -- live migration (hostagent.migration) -----------------------------------------------------
    def prepare_migration(
        self,
        domain: str,
        domain_xml: str,
        volumes: list[MigrationVolume],
        *,
        allow_unverified_identity: bool = False,
    ) -> PreparedMigration:
        """Destination: connects `volumes` of the arriving `domain` here and returns its destination XML."""
        return self.migration.prepare(
            domain, domain_xml, volumes, allow_unverified_identity=allow_unverified_identity
        )

    def finish_incoming_migration(self, domain: str) -> list[JournalRecord]:
        """Destination: the domain runs here; its attachments become ordinary ones."""
        return self.migration.finish_incoming(domain)

    def finish_outgoing_migration(self, domain: str) -> list[str]:
        """Source: the domain left; releases its volumes here."""
        return self.migration.finish_outgoing(domain)

    def migrate_domain(self, domain: str, peer: PeerAgent, destination_uri: str) -> MigrationResult:
        """Source: the whole flow with the destination's agent `peer` and libvirt at `destination_uri`."""
        return self.migration.migrate(domain, peer, destination_uri)

    def abort_migration(self, domain: str) -> list[str]:
        """Either side: undoes what this side made for a migration that did not complete."""
        return self.migration.abort(domain)

    # -- extend, read -----------------------------------------------------------------------------
    def extend(self, volume_id: str, new_size_bytes: int = 0) -> int:
        validate.object_id(volume_id, "volume_id")
        with self._locks.hold_or_abort(volume_id, f"volume {volume_id}"):
            records = [a for a in self.journal.of_volume(volume_id) if a.state is AttachmentState.ATTACHED]
            if not records:
                raise NotFound(f"volume {volume_id} is not attached on this host")
            size = 0
            for a in records:
                # the size storage says the volume has now, for connectors that wait for it (NVMe/TCP)
                info = replace(a.connection_info, size_bytes=new_size_bytes or a.connection_info.size_bytes)
                size = self._connector_for(a.connection_info, a.connector_kind).extend(info)
                if new_size_bytes and size < new_size_bytes:
                    raise FailedPrecondition(
                        f"the host still sees {size} bytes for volume {volume_id}, not {new_size_bytes}; "
                        "check that storage finished the extend, then repeat"
                    )
                if a.target_dev:
                    self.hypervisor.block_resize(a.domain, a.target_dev, _disk_size(a.connection_info, size))
                self._emit(EventType.RESIZED, a, message=f"{size} bytes")
            return size

    def get(self, volume_id: str, domain: str = "") -> JournalRecord:
        validate.object_id(volume_id, "volume_id")
        validate.domain(domain, required=False)
        found = [a for a in self.journal.of_volume(volume_id) if not domain or a.domain == domain]
        if not found and domain:
            dom = self._domain_or_none(domain)
            if dom is not None:
                found = [a for a in self.journal.of_volume(volume_id) if a.domain == dom.name]
        if not found:
            raise NotFound(
                f"volume {volume_id} has no attachment on this host" + (f" to {domain}" if domain else "")
            )
        if len(found) > 1:
            raise FailedPrecondition(f"volume {volume_id} has {len(found)} attachments here; name the domain")
        return found[0]

    def list_attachments(self, domain: str = "") -> list[JournalRecord]:
        validate.domain(domain, required=False)
        return [a for a in self.journal.all() if not domain or a.domain == domain]

    # -- host-only connect ------------------------------------------------------------------------
    def connect_volume(self, info: ConnectionInfo, *, allow_unverified_identity: bool = False) -> HostDevice:
        conn = self._validate_info(info)
        require_identity(info, allow_unverified_identity)
        with self._locks.hold_or_abort(info.volume_id or repr(info.transport), "this volume"):
            return conn.connect(info)

    def audit(self, *, fix: bool = False) -> list[Finding]:
        """`blockwire doctor`: what on this host (or in storage for it) no attachment accounts for; with
        `fix`, what is provably orphaned removed (never a device; see `hostagent.doctor`)."""
        return doctor.audit(self, fix=fix)

    def all_connectors(self) -> list[VolumeConnector]:
        """Every connector of this agent, once each."""
        return list({id(c): c for c in self._by_kind.values()}.values())

    def holding(self, volume_id: str) -> AbstractContextManager[None]:
        """The volume's lock, as attach and detach hold it (for work beside them, e.g. the doctor's)."""
        return self._locks.hold(volume_id)

    def extend_connection(self, info: ConnectionInfo) -> int:
        """Rescans a host-only connection (connect_volume's) after the volume grew; the size the host now
        sees, in bytes. An attachment to a domain grows with `extend` instead (which also tells QEMU)."""
        conn = self._validate_info(info)
        with self._locks.hold_or_abort(info.volume_id or repr(info.transport), "this volume"):
            return conn.extend(info)

    def connection_paths(self, info: ConnectionInfo) -> list[str]:
        """The host paths (devices or portals) that lead to a connected volume now."""
        return self._validate_info(info).paths(info)

    def disconnect_volume(self, info: ConnectionInfo, *, force: bool = False) -> None:
        """Disconnects what connect_volume made. Never a volume the agent attached to a domain (that
        is DetachVolume's); the connector itself refuses a device another volume or a process holds."""
        conn = self._validate_info(info)
        with self._locks.hold_or_abort(info.volume_id or repr(info.transport), "this volume"):
            attached = self.journal.of_volume(info.volume_id) if info.volume_id else []
            if attached:
                raise FailedPrecondition(
                    f"volume {info.volume_id} is attached to domain {attached[0].domain!r} by this agent; "
                    "detach it with DetachVolume instead"
                )
            conn.disconnect(info, force)

    # -- restart ----------------------------------------------------------------------------------
    def reconcile(self) -> list[ReconcileAction]:
        """Compares the journal with what the host really has (libvirt's live XML, libvirt secrets, the
        connector's devices and sessions, storage's attachment) and finishes or rolls back half-done work.

        Run at start, before serving. The journal record is written before each side effect and deleted
        last, so after a crash (kill -9) at any step the record says how far the agent may have got; the
        live disk (found by its serial) says whether the guest already sees the volume. The rule per step
        of attach (failpoint names in brackets, see `ATTACH_FAILPOINTS`):

        ================================================  ====================================================
        crashed                                           on restart
        ================================================  ====================================================
        after the journal write [after_journal]           roll back: drop the record (nothing else was made)
        after storage CreateAttachment, before its id     roll back: a repeat CreateAttachment (idempotent per
        reached the journal [after_create_attachment]     volume and host) tells the id, which is deleted:
                                                          storage drops the row and the target
        after connect / login [after_connect]             roll back: disconnect (libvirt secret, sessions,
                                                          multipath map, node records), delete the attachment
        after the hot-plug [after_hotplug], before or     roll forward: the guest already sees the disk, so
        after CompleteAttachment [before_complete,        CompleteAttachment (a repeat is OK) and the record
        after_complete]                                   becomes ATTACHED with the live target name
        ================================================  ====================================================

        Detach writes DETACHING first and is always rolled forward (the caller asked for it): unplug if
        the disk is still live, disconnect, DeleteAttachment, drop the record; every step is idempotent,
        so a crash after any of them [`DETACH_FAILPOINTS`] ends with nothing attached. Records in ERROR (a
        compensation failed) are rolled back the same way.

        A cold attach (a shut-off domain) follows the same table with "the disk is in the domain's
        definition" for "the guest sees the disk": a crash after the definition was written rolls forward.

        ATTACHED records are kept when the domain has the disk: in its live XML when it runs, in its
        definition when it is shut off (a cold attach, or a persistent one of a domain stopped since;
        starting and stopping the domain changes nothing). An ATTACHED record whose disk is gone (a
        running domain lost it, a shut-off one's definition no longer has it, a live-only disk of a
        domain that stopped, an undefined domain) is rolled back, but only when no other domain's live
        XML or definition has the disk (a domain undefined and defined again under another UUID): then
        it is reported "kept" naming that domain, and nothing is taken away.

        For a kept record the connector's paths are compared with the connection info: a kernel
        attachment that lost some of its sessions has those paths logged in again (`PathRestorer`:
        only the lost paths; one that fails again, or shows another LUN, is dropped alone, and the map
        and paths the guest still uses are never touched; the record is reported "kept, degraded"
        until every path is back). Not when it lost all of them: that would tear down the multipath
        map the guest still uses; it is reported "kept, degraded".

        Records of a live migration's destination (`migration_source_id` set) follow the table in
        `hostagent.migration`: rolled forward when the domain runs here with the disk, kept while it is
        paused arriving, rolled back otherwise.

        Last, connectors that can (`Sweeper`) remove host state that no record accounts for: libvirt
        secrets under "blockwire/" of attachments that are gone. Storage-side leftovers are storage's
        to clean: its own reconcile undoes attachments that never left RESERVED, and a repeat attach or
        detach of a volume finishes the rest. A record whose step fails (storage unreachable, libvirt
        down) is reported "failed" and left as it is for the next reconcile, attach or detach.
        """
        actions = []
        for a in self.journal.all():
            with self._locks.hold(a.volume_id):
                actions.append(self._reconcile_one(a))
        for act in actions:
            log.info("reconcile %s@%s: %s %s", act.volume_id, act.domain, act.action, act.detail)
        keep = [a.connection_info for a in self.journal.all()]
        for conn in {id(c): c for c in self._by_kind.values()}.values():
            if isinstance(conn, Sweeper):
                try:
                    for what in conn.sweep(keep):
                        log.warning("reconcile: removed %s, which no attachment accounts for", what)
                        actions.append(ReconcileAction("", "", "swept", what))
                except BlockwireError as exc:
                    log.error("reconcile: sweeping %s state failed: %s", conn.kind, exc.message)
        if self.volume_keys is not None:
            try:
                for what in self.volume_keys.sweep(keep):
                    log.warning("reconcile: removed %s, which no attachment accounts for", what)
                    actions.append(ReconcileAction("", "", "swept", what))
            except BlockwireError as exc:
                log.error("reconcile: sweeping volume key secrets failed: %s", exc.message)
        return actions

    def _reconcile_one(self, a: JournalRecord) -> ReconcileAction:
        try:
            if a.migration_source_id:
                return self.migration.reconcile(a)
            dom = self._domain_of(a)
            live = self._disk_of(a, dom)
            if a.state is AttachmentState.ATTACHED and live is not None:
                return ReconcileAction(a.volume_id, a.domain, "kept", self._check_paths(a))
            if dom is None or live is None:
                holders = self._other_holders(a)
                if holders:
                    return ReconcileAction(
                        a.volume_id,
                        a.domain,
                        "kept",
                        f"{', '.join(holders)} has the disk, not the record's domain: detach it there",
                    )
            if a.state is AttachmentState.ATTACHING and live is not None and a.connector_kind is not None:
                if a.owns_export and self.storage is not None and a.attachment_id:
                    self.storage.complete_attachment(a.attachment_id, live.spec.target_dev, a.host_device)
                self.journal.update(
                    a,
                    state=AttachmentState.ATTACHED,
                    target_dev=live.spec.target_dev,
                    update_time=self.clock.now(),
                )
                return ReconcileAction(a.volume_id, a.domain, "finished", live.spec.target_dev)
            self._teardown(a)
            return ReconcileAction(a.volume_id, a.domain, "rolled back", a.state.value)
        except BlockwireError as exc:
            return ReconcileAction(a.volume_id, a.domain, "failed", exc.message)

    def _check_paths(self, a: JournalRecord) -> str:
        """Compares a kept attachment's host paths (devices, sessions) with its connection info."""
        if a.connector_kind is None:
            return ""
        conn = self._connector_for(a.connection_info, a.connector_kind)
        have = conn.paths(a.connection_info)
        want = conn.expected_paths(a.connection_info)
        if len(have) >= want:
            return ""
        if not have:
            return f"degraded: no path to the volume is left on this host (want {want})"
        if not isinstance(conn, PathRestorer):
            return f"degraded: {len(have)} of {want} paths"
        # Never `connect` here: a connect that fails undoes everything it finds, and this map is in use.
        log.warning("%s@%s has %d of %d paths: logging in again", a.volume_id, a.domain, len(have), want)
        try:
            conn.restore_paths(a.connection_info)
        except BlockwireError as exc:
            log.error("%s@%s: restoring its paths failed: %s", a.volume_id, a.domain, exc.message)
        now = len(conn.paths(a.connection_info))
        return f"paths restored ({now} of {want})" if now >= want else f"degraded: {now} of {want} paths"
