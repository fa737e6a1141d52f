"""The host agent's own frozen values (STYLE.md rule 9). Wire-level values live in `blockwire.model`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from blockwire.model import AccessMode, ConnectionInfo, IoTune


class ConnectorKind(enum.Enum):
    """Which connector made a connection. The values are what the journal stores in `connector_kind`
    (records written before this enum existed hold the same strings and load unchanged)."""

    ISCSI_KERNEL = "iscsi-kernel"
    ISCSI_QEMU = "iscsi-qemu"
    FC = "fc"
    LOCAL = "local"
    RBD_QEMU = "rbd-qemu"
    RBD_KERNEL = "rbd-kernel"
    NVME_TCP = "nvme-tcp"  # the kernel's NVMe/TCP host driver (hostagent.connectors.nvme)


@dataclass(frozen=True)
class SecretRef:
    """Credentials a network target is opened with, by reference: the user name and the usage id and type
    of the hypervisor's secret that holds the password (never the password itself)."""

    username: str
    usage: str
    secret_type: str


@dataclass(frozen=True)
class NetworkTarget:
    """A volume the hypervisor's own initiator connects to (QEMU's libiscsi or librbd): nothing is opened
    on the host. `name` is what the protocol addresses ("IQN/LUN" for iSCSI, "pool/image" for RBD);
    `hosts` are (address, port): the portal, or the Ceph monitors."""

    protocol: str
    name: str
    hosts: tuple[tuple[str, int], ...]
    initiator_iqn: str = ""
    auth: SecretRef | None = None


@dataclass(frozen=True)
class HostDevice:
    """What a connect made usable, transport-neutral (`hostagent.virt.sources.disk_source` maps it to
    the disk's <source>): a host block device (`path`; its multipath map and path devices), a regular
    file (`is_file`), or, with `network`, a target the hypervisor opens itself (no host path)."""

    path: str = ""
    wwn: str = ""
    size_bytes: int = 0
    multipath_name: str = ""
    path_devices: tuple[str, ...] = ()
    is_file: bool = False
    network: NetworkTarget | None = None

    @property
    def qemu_native(self) -> bool:
        """Opened by QEMU's own initiator, not through a host device."""
        return self.network is not None


class Bus(enum.Enum):
    VIRTIO = "virtio"
    SCSI = "scsi"
    SATA = "sata"


class Cache(enum.Enum):
    NONE = "none"
    WRITETHROUGH = "writethrough"
    WRITEBACK = "writeback"
    DIRECTSYNC = "directsync"
    UNSAFE = "unsafe"


class Io(enum.Enum):
    NATIVE = "native"
    THREADS = "threads"
    IO_URING = "io_uring"


class Discard(enum.Enum):
    IGNORE = "ignore"
    UNMAP = "unmap"


@dataclass(frozen=True)
class DiskOptions:
    """How a volume appears to a domain; None means "the default" (see AttachVolume's proto comment)."""

    bus: Bus = Bus.SCSI
    cache: Cache = Cache.NONE
    io: Io | None = None
    discard: Discard | None = None
    iotune: IoTune = field(default_factory=IoTune)
    serial: str = ""
    read_only: bool = False
    shareable: bool = False
    target_dev: str = ""
    logical_block_size: int = 0
    physical_block_size: int = 0
    boot_order: int = 0  # 0: none; only for a cold attach (a shut-off domain's definition)


class AttachmentState(enum.Enum):
    ATTACHING = "attaching"
    ATTACHED = "attached"
    DETACHING = "detaching"
    ERROR = "error"
    MIGRATING = "migrating"  # the destination's part of a live migration: prepared, the domain not yet here


@dataclass(frozen=True)
class JournalRecord:
    """This host's attachment of one volume to one domain (what the journal records)."""

    volume_id: str
    domain: str
    state: AttachmentState
    connection_info: ConnectionInfo
    domain_uuid: str = ""  # the domain this record is about; a same-named domain defined later is another
    attachment_id: str = ""
    access_mode: AccessMode = AccessMode.READ_WRITE
    connector_kind: ConnectorKind | None = None  # None: no connect begun
    owns_export: bool = False
    persistent: bool = False
    serial: str = ""
    target_dev: str = ""
    host_device: str = ""
    error_message: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None
    # The destination of a live migration: the source's storage attachment, until storage completed the
    # migration (hostagent.migration)
    migration_source_id: str = ""


class EventType(enum.Enum):
    ATTACH_STARTED = 1
    ATTACHED = 2
    ATTACH_FAILED = 3
    DETACH_STARTED = 4
    DETACHED = 5
    DETACH_FAILED = 6
    PATH_DOWN = 7
    PATH_UP = 8
    RESIZED = 9
    PROGRESS = 10


@dataclass(frozen=True)
class Event:
    """Something the agent did, for WatchEvents."""

    type: EventType
    time: datetime
    volume_id: str = ""
    domain: str = ""
    attachment_id: str = ""
    path: str = ""
    step: str = ""
    message: str = ""


@dataclass(frozen=True)
class Finding:
    """Something on the host nobody accounts for (`hostagent.doctor`). `fixable`: provably orphaned, a
    fix removes it; `fixed`: it did."""

    kind: str
    name: str
    detail: str
    fixable: bool = False
    fixed: bool = False
    volume_id: str = ""  # the volume it belongs to, when known: a fix holds that volume's lock
