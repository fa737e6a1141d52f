"""Typed wire-level values both services and the SDK share (STYLE.md rule 9).

Connectors and exporters see these frozen dataclasses, never proto messages or dicts. Secrets are
`Secret`s. `blockwire.convert` translates to and from the v1 messages; this module imports neither
grpc nor protobuf.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from blockwire.secret import Secret


class Transport(enum.Enum):
    ISCSI = "iscsi"
    FC = "fc"
    NVME_TCP = "nvme-tcp"
    RBD = "rbd"
    LOCAL = "local"


class AccessMode(enum.Enum):
    READ_WRITE = "rw"
    READ_ONLY = "ro"


@dataclass(frozen=True)
class Connector:
    """A compute host's initiators."""

    host: str
    ips: tuple[str, ...] = ()
    initiator_iqn: str = ""
    wwpns: tuple[str, ...] = ()
    wwnns: tuple[str, ...] = ()
    nvme_host_nqn: str = ""
    nvme_host_id: str = ""
    multipath: bool = False
    transports: tuple[Transport, ...] = ()
    kernel_iscsi: bool = False
    platform: str = ""


@dataclass(frozen=True)
class Chap:
    """One CHAP direction."""

    username: str
    password: Secret


@dataclass(frozen=True)
class IscsiPath:
    portal: str  # "address:port", IPv6 in brackets
    target_iqn: str
    lun: int


@dataclass(frozen=True)
class IscsiConnection:
    paths: tuple[IscsiPath, ...]
    chap: Chap | None = None
    mutual_chap: Chap | None = None
    initiator_iqn: str = ""


@dataclass(frozen=True)
class FcConnection:
    target_wwpns: tuple[str, ...]
    lun: int
    initiator_target_map: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class NvmeofPortal:
    address: str
    transport: str = "tcp"


@dataclass(frozen=True)
class NvmeofConnection:
    subsystem_nqn: str
    portals: tuple[NvmeofPortal, ...]
    namespace_uuid: str = ""
    namespace_id: int = 0
    namespace_nguid: str = ""
    host_nqn: str = ""
    dhchap_host_secret: Secret | None = None
    dhchap_ctrl_secret: Secret | None = None


@dataclass(frozen=True)
class RbdConnection:
    pool: str
    image: str
    monitors: tuple[str, ...] = ()
    user: str = ""
    key: Secret | None = None
    image_id: str = ""
    cluster_fsid: str = ""


@dataclass(frozen=True)
class LocalConnection:
    path: str


TransportInfo = IscsiConnection | FcConnection | NvmeofConnection | RbdConnection | LocalConnection


@dataclass(frozen=True)
class IoTune:
    """libvirt <iotune>; 0 means no limit."""

    total_bytes_sec: int = 0
    read_bytes_sec: int = 0
    write_bytes_sec: int = 0
    total_iops_sec: int = 0
    read_iops_sec: int = 0
    write_iops_sec: int = 0
    total_bytes_sec_max: int = 0
    total_iops_sec_max: int = 0
    size_iops_sec: int = 0
    group_name: str = ""

    def is_empty(self) -> bool:
        return self == IoTune()


LUKS_CIPHER = "aes-xts-plain64"
LUKS_KEY_SIZES = (256, 512)


@dataclass(frozen=True)
class Encryption:
    """A volume encrypted at rest with LUKS1 (QEMU decrypts it). `passphrase` travels only in a
    CreateAttachment answer to the attaching host; everywhere else (catalog, journal, listings) it is
    None and `key_ref` names the key in the storage service's key manager."""

    cipher: str = LUKS_CIPHER
    key_size_bits: int = 512
    key_ref: str = ""
    passphrase: Secret | None = None
    header_bytes: int = 0
    format: str = "luks"

    def without_key(self) -> Encryption:
        return Encryption(self.cipher, self.key_size_bits, self.key_ref, None, self.header_bytes, self.format)


@dataclass(frozen=True)
class ConnectionInfo:
    """Everything a host needs to connect one attachment, and to check that it reached the right LUN."""

    transport: TransportInfo
    volume_id: str = ""
    attachment_id: str = ""
    wwn: str = ""
    serial: str = ""
    size_bytes: int = 0
    access_mode: AccessMode = AccessMode.READ_WRITE
    discard: bool = False
    logical_block_size: int = 512
    physical_block_size: int = 512
    qos: IoTune = field(default_factory=IoTune)
    multiattach: bool = False
    encryption: Encryption | None = None

    def without_key(self) -> ConnectionInfo:
        """The same info with the encryption passphrase dropped (what may be stored or listed)."""
        if self.encryption is None or self.encryption.passphrase is None:
            return self
        return replace(self, encryption=self.encryption.without_key())

    @property
    def kind(self) -> Transport:
        return {
            IscsiConnection: Transport.ISCSI,
            FcConnection: Transport.FC,
            NvmeofConnection: Transport.NVME_TCP,
            RbdConnection: Transport.RBD,
            LocalConnection: Transport.LOCAL,
        }[type(self.transport)]
