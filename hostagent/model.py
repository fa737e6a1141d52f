"""The host agent's own frozen values (STYLE.md rule 9). Wire-level values live in `blockwire.model`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from blockwire.model import AccessMode, ConnectionInfo, IoTune


@dataclass(frozen=True)
class HostDevice:
    """A volume as it appears on this host after a connect."""

    path: str = ""
    wwn: str = ""
    size_bytes: int = 0
    multipath_name: str = ""
    path_devices: tuple[str, ...] = ()
    qemu_native: bool = False


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


class AttachmentState(enum.Enum):
    ATTACHING = "attaching"
    ATTACHED = "attached"
    DETACHING = "detaching"
    ERROR = "error"


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
    connector_kind: str = ""
    owns_export: bool = False
    persistent: bool = False
    serial: str = ""
    target_dev: str = ""
    host_device: str = ""
    error_message: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None


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
