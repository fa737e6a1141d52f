"""The storage service's domain values: frozen dataclasses, no grpc, no protobuf (STYLE.md rule 9).

The wire-level values both services share (Connector, ConnectionInfo, Chap, ...) live in
`blockwire.model`; this module adds what only the storage service keeps: volumes, snapshots,
attachments and the export record that says what a target must look like.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

from blockwire.model import AccessMode, Chap, ConnectionInfo, Connector, Encryption

MIB = 1024 * 1024


class VolumeState(enum.Enum):
    CREATING = "creating"
    AVAILABLE = "available"
    RESERVED = "reserved"
    ATTACHING = "attaching"
    IN_USE = "in-use"
    DETACHING = "detaching"
    EXTENDING = "extending"
    DELETING = "deleting"
    ERROR = "error"


SETTLED_VOLUME_STATES = frozenset({VolumeState.AVAILABLE, VolumeState.IN_USE, VolumeState.ERROR})
ATTACHABLE = frozenset(  # states in which a volume may be attached, extended or snapshotted
    {VolumeState.AVAILABLE, VolumeState.RESERVED, VolumeState.ATTACHING, VolumeState.IN_USE}
)


class SnapshotState(enum.Enum):
    CREATING = "creating"
    AVAILABLE = "available"
    DELETING = "deleting"
    ERROR = "error"


class AttachmentState(enum.Enum):
    RESERVED = "reserved"
    ATTACHING = "attaching"
    ATTACHED = "attached"
    DETACHING = "detaching"
    ERROR = "error"


class ImageFormat(enum.Enum):
    PROBE = "probe"
    RAW = "raw"
    QCOW2 = "qcow2"


@dataclass(frozen=True)
class ImageSource:
    path: str
    format: ImageFormat = ImageFormat.PROBE


@dataclass(frozen=True)
class VolumeSource:
    """Where a volume's content comes from: at most one of the three is set."""

    snapshot_id: str = ""
    volume_id: str = ""
    image: ImageSource | None = None

    def is_empty(self) -> bool:
        return not (self.snapshot_id or self.volume_id or self.image)


@dataclass(frozen=True)
class Progress:
    done_bytes: int = 0
    total_bytes: int = 0


@dataclass(frozen=True)
class ExportRecord:
    """What the volume's target must look like; kept in the catalog so a restart can rebuild it.

    The CHAP secrets are stored so that a restarted target accepts the credentials hosts already hold:
    the catalog file is therefore as sensitive as the secrets (the daemon creates it mode 0600).
    """

    target_iqn: str  # the target's name: an IQN, or the subsystem NQN for NVMe exporters
    lun: int  # the LUN, or the namespace id for NVMe exporters
    chap: Chap | None  # iSCSI only: NVMe's DH-HMAC-CHAP secrets are per host (NvmeExporter)
    mutual_chap: Chap | None
    access_mode: AccessMode


@dataclass(frozen=True)
class Volume:
    id: str
    name: str
    size_bytes: int
    state: VolumeState
    backend: str
    wwn: str
    serial: str
    create_time: datetime
    update_time: datetime
    multiattach: bool = False
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    source: VolumeSource = field(default_factory=VolumeSource)
    encrypted: bool = False  # LUKS1 with a fresh key (a copy of an encrypted source is encrypted anyway)
    key_size_bits: int = 0  # 0: 512
    progress: Progress = field(default_factory=Progress)
    error_message: str = ""
    export: ExportRecord | None = None
    #: Set when encrypted at rest (LUKS1; never with the passphrase). The backing device is then
    #: `encryption.header_bytes` larger than `size_bytes`.
    encryption: Encryption | None = None
    #: Filled in on reads from the attachments recorded for the volume; not stored with it.
    attachment_ids: tuple[str, ...] = ()
    volume_type: str = ""  # the name of its volume type ("": none)


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    volume_id: str
    size_bytes: int
    state: SnapshotState
    backend: str
    create_time: datetime
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    error_message: str = ""
    #: The volume's encryption when taken (the snapshot holds the same LUKS header and key).
    encryption: Encryption | None = None


@dataclass(frozen=True)
class Attachment:
    id: str
    volume_id: str
    connector: Connector
    access_mode: AccessMode
    state: AttachmentState
    create_time: datetime
    update_time: datetime
    connection_info: ConnectionInfo | None = None
    domain: str = ""
    target_dev: str = ""
    host_device: str = ""
    error_message: str = ""
    migration_source_id: str = ""  # the destination of a live migration: the source attachment


T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: tuple[T, ...]
    next_token: str = ""


@dataclass(frozen=True)
class Capacity:
    backend: str
    total_bytes: int
    free_bytes: int
    provisioned_bytes: int
    max_volume_bytes: int


@dataclass(frozen=True)
class OperationStats:
    operation: str
    count: int
    errors: int
    p50_micros: int
    p95_micros: int


@dataclass(frozen=True)
class BackendStats:
    backend: str
    kind: str
    exporter: str
    volume_count: int
    snapshot_count: int
    export_count: int
    portals: tuple[str, ...]
    healthy: bool


@dataclass(frozen=True)
class CreateVolumeSpec:
    """A validated CreateVolume request."""

    name: str
    size_bytes: int  # 0 with a source means the source's size
    backend: str = ""
    multiattach: bool = False
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    source: VolumeSource = field(default_factory=VolumeSource)
    encrypted: bool = False  # LUKS1 with a fresh key (a copy of an encrypted source is encrypted anyway)
    key_size_bits: int = 0  # 0: 512
    volume_type: str = ""  # a type's name ("": the default type, if one is configured)
    #: The type's extra specs (filled in by the create flow from the type, not by callers).
    extra_specs: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class QosSpecs:
    """Named limits (storagesvc.types): `specs` maps a limit (total_bytes_sec, read_iops_sec_per_gb,
    ...) to a non-negative integer, as text. `consumer` is where they apply: "front-end" (the
    hypervisor: libvirt iotune), "back-end" (the storage; none of ours enforces it yet) or "both"."""

    id: str
    name: str
    consumer: str
    create_time: datetime
    update_time: datetime
    specs: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class VolumeType:
    """A named kind of volume: extra specs place it (storagesvc.scheduler) and give it properties
    (multiattach, encryption); at most one QoS specs limits its disks."""

    id: str
    name: str
    create_time: datetime
    update_time: datetime
    description: str = ""
    extra_specs: Mapping[str, str] = field(default_factory=dict, hash=False)
    qos_specs_id: str = ""


@dataclass(frozen=True)
class NodeBackend:
    """One backend as its storage node registered it in the shared catalog (figures as of the node's
    last heartbeat). `shared`: every node reaches it (rbd); otherwise only `node` does (file, lvm-thin)."""

    name: str
    node: str
    kind: str
    shared: bool
    healthy: bool
    total_bytes: int
    free_bytes: int
    provisioned_bytes: int
    volume_count: int
    capabilities: Mapping[str, str] = field(default_factory=dict, hash=False)
    max_over_subscription_ratio: float = 1.0
    availability_zone: str = ""


@dataclass(frozen=True)
class StorageNode:
    """One blockwire-storage process of a cluster: where other nodes forward calls to (`address`, mutual
    TLS) and its last heartbeat. It is down when that heartbeat is older than its own `down_after`."""

    name: str
    address: str
    heartbeat: datetime
    start_time: datetime
    down_after: float
    backends: tuple[NodeBackend, ...] = ()

    def up(self, now: datetime) -> bool:
        return (now - self.heartbeat).total_seconds() < self.down_after

    def silent_for(self, now: datetime) -> float:
        """Seconds since its last heartbeat."""
        return max(0.0, (now - self.heartbeat).total_seconds())
