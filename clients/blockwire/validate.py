"""One check per wire field (STYLE.md rule 15), shared by storage, the agent and every embedder.

Storage runs these on its requests and on the connection info it announces before it returns it; the
agent's `HostAgent` facade runs them on entry, so a virt manager that embeds it gets exactly the checks a
gRPC caller gets. Pure and grpc-free: no I/O, nothing changes. Every function raises
`InvalidArgument(field, problem)` naming the field; a bad value is quoted at most 80 characters long
(`quote`), and secrets (CHAP passwords, Ceph keys) are never quoted.

What the rules are, where they once differed:

* **Portals** (`portal`, `split_portal`; iSCSI portals, NVMe-oF addresses, Ceph monitors) are
  ``address:port`` with an IP address: IPv4, or IPv6 in brackets (``[::1]:3260``, a zone id of
  interface-name characters allowed). The port is required. Host names are NOT allowed: storage
  announces the addresses of its `[exporters.*] portals`, which its config holds to IP:port; the kernel
  connector finds its sessions by the IP:port the kernel shows, so it would not find the session its own
  login to a host name (or to a portal without a port) made; and a name makes every connect depend on
  the resolver at that moment. (The agent once took host names and a missing port, defaulting to 3260:
  only QEMU's initiator could use them. Only storage's IP:port form passed both services.)
* **iSCSI names** (`iqn`): RFC 3720 3.2.6.3, ``iqn.YYYY-MM.reversed.domain[:id]`` in lower case, or
  ``eui.`` and 16 hex digits, at most 223 characters; the id part is held to ``[A-Za-z0-9._:-]``, the
  characters initiators really use (IQNs reach tgtadm's and iscsiadm's command lines). The agent's QEMU
  connector once took any ``iqn.YYYY-MM.`` name without white space or '/'.
* **Ids** (`object_id`: volume, snapshot and attachment ids, also ids an embedder chooses for its own
  connection info) are 1-128 characters of ``[A-Za-z0-9._-]`` starting with a letter, digit or '_':
  they name journal records and libvirt secrets. Storage issues 32 hex digits. (Storage once took any
  printable id and answered NOT_FOUND for what it had not issued.)
* **Domains** (`domain`) are libvirt domain names or UUIDs: printable, at most 255 characters, no '/'
  (storage once took a '/').
* **Informational text** (`text`: serials, device names storage records, platform): printable (no
  control characters), at most 255 characters; stored and returned, never interpreted.
* **Paths** (`path`: local devices and files, image files) are absolute and normalized: no '..', '.',
  '//'; at most 4096 characters.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Final

from blockwire.errors import InvalidArgument
from blockwire.model import (
    Chap,
    ConnectionInfo,
    Connector,
    FcConnection,
    IoTune,
    IscsiConnection,
    LocalConnection,
    NvmeofConnection,
    RbdConnection,
    Transport,
)

MIB: Final = 1 << 20
MAX_QUOTE: Final = 80  # characters of a bad value a message shows
MAX_TEXT: Final = 255
MAX_PATH: Final = 4096
MAX_IQN: Final = 223  # also the longest NQN (NVMe base specification)
MAX_LUN: Final = 16383  # SAM flat space addressing; what every initiator and target here supports
MAX_SIZE: Final = 1 << 60  # 1 EiB: a larger volume is a typo
MAX_PAGE: Final = 1000
DEFAULT_PAGE: Final = 100
MAX_PATHS: Final = 32  # paths, portals or monitors of one connection
MAX_LABELS: Final = 64
MAX_PORTAL: Final = 64
MAX_U32: Final = (1 << 32) - 1
MAX_U64: Final = (1 << 64) - 1
WWN_PREFIXES: Final = ("naa.", "eui.", "t10.", "0x")  # what sysfs, udev and people put before a WWN

# Every pattern is applied with fullmatch: "$" alone would also accept a trailing newline.
NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,62}")
ID_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
LABEL_KEY_RE: Final = re.compile(r"[a-z0-9._/-]{1,63}")
_DOMAIN_PART = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*"
IQN_RE: Final = re.compile(
    rf"iqn\.\d{{4}}-(0[1-9]|1[0-2])\.{_DOMAIN_PART}(:[A-Za-z0-9._:-]+)?|eui\.[0-9A-Fa-f]{{16}}"
)
NQN_RE: Final = re.compile(rf"nqn\.\d{{4}}-(0[1-9]|1[0-2])\.{_DOMAIN_PART}:[A-Za-z0-9._:-]+")
# Host names: RFC 1123 labels, plus '_' (seen in the wild); no spaces, no shell or XML metacharacters.
HOST_RE: Final = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*)(\.[A-Za-z0-9_]([A-Za-z0-9_-]*))*\.?")
ZONE_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # an IPv6 zone id: an interface name
WWPN_RE: Final = re.compile(r"[0-9a-f]{16}")
WWN_RE: Final = re.compile(r"[0-9a-f]{16}|[0-9a-f]{32}")
CHAP_USER_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,255}")
CHAP_SECRET_RE: Final = re.compile(r"[!-~]{1,255}")  # printable ASCII, no spaces: iscsid and libvirt take it
GROUP_RE: Final = re.compile(r"[A-Za-z0-9._-]{0,64}")
DISK_SERIAL_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,20}")  # virtio-blk's limit; every bus takes it
TARGET_DEV_RE: Final = re.compile(r"(sd|vd|hd)[a-z]{1,3}")
RBD_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
RBD_KEY_RE: Final = re.compile(r"[A-Za-z0-9+/]{1,252}={0,2}")
UUID_RE: Final = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
NVME_TRANSPORTS: Final = ("tcp", "rdma")
NGUID_RE: Final = re.compile(r"[0-9a-f]{32}")
DHCHAP_SECRET_RE: Final = re.compile(r"DHHC-1:0[0-3]:[A-Za-z0-9+/]{44,92}={0,2}:")
RBD_IMAGE_ID_RE: Final = re.compile(r"[0-9a-f]{1,64}")


def quote(value: str) -> str:
    """A bad value as a message shows it: repr of at most MAX_QUOTE characters."""
    return repr(value[:MAX_QUOTE])


# -- scalars ---------------------------------------------------------------------------------------


def text(value: str, field: str, max_len: int = MAX_TEXT) -> str:
    """An informational string (a serial, a device name): stored and returned, never interpreted.
    At most `max_len` characters, printable (no NUL, newline or other control characters)."""
    if len(value) > max_len:
        raise InvalidArgument(field, f"at most {max_len} characters")
    if not value.isprintable():
        raise InvalidArgument(field, "must be printable (no control characters)")
    return value


def _uint(value: int, field: str, top: int) -> int:
    """A count from the wire (uint32/uint64): typed callers can pass what the wire cannot."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise InvalidArgument(field, f"{repr(value)[:MAX_QUOTE]} is not a whole number from 0 to {top}")
    return value


def name(value: str, field: str = "name") -> str:
    """A volume, snapshot or backend name."""
    if not value:
        raise InvalidArgument(field, "required; 1-63 characters of [A-Za-z0-9._-]")
    if not NAME_RE.fullmatch(value):
        raise InvalidArgument(
            field,
            f"{quote(value)} is not 1-63 characters of [A-Za-z0-9._-] starting with a letter, digit or '_'",
        )
    return value


def object_id(value: str, field: str) -> str:
    """A volume, snapshot or attachment id. An empty one is a malformed request; a well-formed one that
    names nothing is NOT_FOUND (the caller's business, not this module's)."""
    if not value:
        raise InvalidArgument(field, "required")
    if not ID_RE.fullmatch(value):
        raise InvalidArgument(field, f"{quote(value)} is not 1-128 characters of [A-Za-z0-9._-]")
    return value


def domain(value: str, field: str = "domain", *, required: bool = True) -> str:
    """A libvirt domain name or UUID: printable, no '/', at most 255 characters ("" only if not
    `required`: a filter or an attachment without a consumer)."""
    if not value:
        if required:
            raise InvalidArgument(field, "required")
        return value
    text(value, field)
    if "/" in value:
        raise InvalidArgument(field, f"{quote(value)}: libvirt domain names have no '/'")
    return value


def host(value: str, field: str = "host") -> str:
    """A compute host's name (RFC 1123, '_' allowed)."""
    if not 0 < len(value) <= 253 or HOST_RE.fullmatch(value) is None:
        raise InvalidArgument(field, f"{quote(value)} is not a host name (RFC 1123, at most 253 characters)")
    return value


def ip_address(value: str, field: str) -> str:
    """An IPv4 or IPv6 address (no brackets); an IPv6 one may name its zone ("fe80::1%eth0")."""
    address, pct, zone = value.partition("%")
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise InvalidArgument(field, f"{quote(value)} is not an IP address") from None
    if pct and (parsed.version != 6 or not ZONE_RE.fullmatch(zone)):
        raise InvalidArgument(field, f"{quote(value)}: a zone id is an interface name, on an IPv6 address")
    return value


def split_portal(value: str, field: str = "portal") -> tuple[str, int]:
    """'address:port' -> (address, port): "10.0.0.1:3260" -> ("10.0.0.1", 3260), "[::1]:3260" ->
    ("::1", 3260). An IP address, IPv6 in brackets, and a port (module docstring: no host names)."""
    host_part, sep, port = value.rpartition(":")
    if (
        len(value) > MAX_PORTAL
        or not sep
        or not (port.isascii() and port.isdigit() and len(port) <= 5)
        or not 0 < int(port) < 65536
    ):
        raise InvalidArgument(field, f"{quote(value)} is not address:port (an IP address and a port 1-65535)")
    bracketed = host_part.startswith("[") and host_part.endswith("]")
    address = host_part[1:-1] if bracketed else host_part
    if ":" in address and not bracketed:
        raise InvalidArgument(field, f"{quote(value)}: IPv6 addresses go in brackets ([::1]:3260)")
    ip_address(address, field)
    if bracketed and ":" not in address:
        raise InvalidArgument(field, f"{quote(value)}: only IPv6 addresses go in brackets")
    return address, int(port)


def portal(value: str, field: str = "portal") -> str:
    """`split_portal`'s rule; returns the portal unchanged."""
    split_portal(value, field)
    return value


def iqn(value: str, field: str) -> str:
    """An iSCSI name (RFC 3720; module docstring)."""
    if not value:
        raise InvalidArgument(
            field, "required: an iSCSI name (iqn.YYYY-MM.reverse.domain[:id] or eui.<16 hex>)"
        )
    if len(value) > MAX_IQN or not IQN_RE.fullmatch(value):
        raise InvalidArgument(
            field,
            f"{quote(value)} is not an iSCSI name "
            "(lower-case iqn.YYYY-MM.reverse.domain[:id], or eui.<16 hex>)",
        )
    return value


def nqn(value: str, field: str) -> str:
    """An NVMe qualified name: nqn.YYYY-MM.reverse.domain:id, the id held to [A-Za-z0-9._:-]."""
    if len(value) > MAX_IQN or not NQN_RE.fullmatch(value):
        raise InvalidArgument(field, f"{quote(value)} is not an NVMe name (nqn.YYYY-MM.reverse.domain:id)")
    return value


def lun(value: int, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LUN:
        raise InvalidArgument(field, f"{value!r} is not a LUN from 0 to {MAX_LUN}")
    return value


def chap(value: Chap, field: str) -> Chap:
    """One CHAP direction: a user name of [A-Za-z0-9._:-] and a secret of printable ASCII without
    spaces, 1-255 characters each. The secret is never quoted."""
    if not value.username:
        raise InvalidArgument(f"{field}.username", "required: a CHAP user name")
    if not CHAP_USER_RE.fullmatch(value.username):
        raise InvalidArgument(f"{field}.username", "1-255 characters of [A-Za-z0-9._:-]")
    if not CHAP_SECRET_RE.fullmatch(value.password.reveal()):
        raise InvalidArgument(f"{field}.password", "1-255 printable ASCII characters, no spaces")
    return value


def wwn(value: str, field: str) -> str:
    """A SCSI identity as NAA or EUI hex, 16 or 32 digits, in any case, optionally after one of
    `WWN_PREFIXES` and with ':' or '-' between digits ("naa.6001405...", "0x6001405...")."""
    text(value, field, 64)
    digits = value.lower()
    prefix = next((p for p in WWN_PREFIXES if digits.startswith(p)), "")
    if not WWN_RE.fullmatch(digits[len(prefix) :].replace(":", "").replace("-", "")):
        raise InvalidArgument(field, f"{quote(value)} is not an NAA/EUI WWN (16 or 32 hex digits)")
    return value


def normal_wwpn(value: str) -> str:
    """A WWPN in its normal form: "0x50:01:..." (sysfs, people) -> "5001..."."""
    return value.strip().lower().removeprefix("0x").replace(":", "")


def wwpn(value: str, field: str) -> str:
    """A Fibre Channel port name: 16 hex digits (normal form: `normal_wwpn`)."""
    if not WWPN_RE.fullmatch(normal_wwpn(value)):
        raise InvalidArgument(field, f"{quote(value)} is not 16 hex digits")
    return value


def labels(value: Mapping[str, str], field: str = "labels") -> dict[str, str]:
    if len(value) > MAX_LABELS:
        raise InvalidArgument(field, f"at most {MAX_LABELS} labels")
    for k, v in value.items():
        if not LABEL_KEY_RE.fullmatch(k):
            raise InvalidArgument(f"{field}[{quote(k)}]", "keys are 1-63 characters of [a-z0-9._/-]")
        if len(v) > MAX_TEXT:
            raise InvalidArgument(f"{field}[{k!r}]", f"values are at most {MAX_TEXT} characters")
        if not v.isprintable():
            raise InvalidArgument(f"{field}[{k!r}]", "values must be printable (no control characters)")
    return dict(value)


def path(value: str, field: str) -> str:
    """An absolute, normalized path: '/dev/../etc/shadow' is refused, never resolved."""
    if not value:
        raise InvalidArgument(field, "required: an absolute path")
    text(value, field, MAX_PATH)
    if not posixpath.isabs(value):
        raise InvalidArgument(field, f"{quote(value)} is not an absolute path")
    if posixpath.normpath(value) != value or value.startswith("//"):
        raise InvalidArgument(field, f"{quote(value)} is not a normalized path (no '..', '.', '//')")
    return value


def size(value: int, field: str = "size_bytes", *, allow_zero: bool = False) -> int:
    """A volume size: a positive multiple of 1 MiB, at most 1 EiB (0 only with `allow_zero`: the
    source's size)."""
    if value == 0 and allow_zero:
        return 0
    if value <= 0:
        raise InvalidArgument(field, "must be a positive multiple of 1 MiB (1048576)")
    if value % MIB:
        raise InvalidArgument(field, f"{value} is not a multiple of 1 MiB (1048576)")
    if value > MAX_SIZE:
        raise InvalidArgument(field, f"{value} is larger than 1 EiB")
    return value


def page_size(value: int, field: str = "page_size") -> int:
    """A list page's size; returns the one to use (0 means DEFAULT_PAGE)."""
    if value == 0:
        return DEFAULT_PAGE
    if not 1 <= value <= MAX_PAGE:
        raise InvalidArgument(field, f"{value} is not in 1-{MAX_PAGE} (0 means {DEFAULT_PAGE})")
    return value


def block_size(value: int, field: str) -> int:
    """A logical or physical block size: 0 (the default) or a power of two from 512 to 65536."""
    if value and (value < 512 or value > 65536 or value & (value - 1)):
        raise InvalidArgument(field, "0 or a power of two from 512 to 65536")
    return value


def disk_serial(value: str, field: str = "disk.serial") -> str:
    """The serial a guest sees ("" for the volume's own)."""
    if value and not DISK_SERIAL_RE.fullmatch(value):
        raise InvalidArgument(field, "at most 20 characters of [A-Za-z0-9._-]")
    return value


def target_dev(value: str, field: str = "disk.target_dev") -> str:
    """The disk's name in the domain ("" for the next free one)."""
    if value and not TARGET_DEV_RE.fullmatch(value):
        raise InvalidArgument(field, f"{quote(value)} is not a disk name like sdb")
    return value


def iotune(value: IoTune, field: str) -> IoTune:
    """libvirt <iotune>: limits are whole numbers (0: none), the group name [A-Za-z0-9._-], at most 64."""
    for f in fields(IoTune):
        if f.name != "group_name":
            _uint(getattr(value, f.name), f"{field}.{f.name}", MAX_U64)
    if not GROUP_RE.fullmatch(value.group_name):
        raise InvalidArgument(f"{field}.group_name", "at most 64 characters of [A-Za-z0-9._-]")
    return value


# -- messages --------------------------------------------------------------------------------------


def connector(value: Connector, field: str = "connector", *, transport: Transport | None = None) -> Connector:
    """A compute host's connector. With `transport`, one an export over that transport can be made for:
    the host lists it (when it lists any) and has the name the target admits it by: an initiator name
    for iSCSI, a host NQN for NVMe/TCP."""
    if not value.host:
        raise InvalidArgument(f"{field}.host", "required")
    host(value.host, f"{field}.host")
    if transport is not None and value.transports and transport not in value.transports:
        raise InvalidArgument(
            f"{field}.transports", f"the host does not list {transport.value}, the transport of this export"
        )
    if value.initiator_iqn or transport is Transport.ISCSI:
        iqn(value.initiator_iqn, f"{field}.initiator_iqn")
    if len(value.ips) > MAX_LABELS:
        raise InvalidArgument(f"{field}.ips", f"at most {MAX_LABELS} addresses")
    for i, ip in enumerate(value.ips):
        ip_address(ip, f"{field}.ips[{i}]")
    for port_kind, ports in (("wwpns", value.wwpns), ("wwnns", value.wwnns)):
        if len(ports) > MAX_LABELS:
            raise InvalidArgument(f"{field}.{port_kind}", f"at most {MAX_LABELS} port names")
        for i, w in enumerate(ports):
            if not WWPN_RE.fullmatch(w):
                raise InvalidArgument(
                    f"{field}.{port_kind}[{i}]", f"{quote(w)} is not 16 lower-case hex digits"
                )
    # An NVMe export admits the host by its host NQN; the host id (a UUID) goes with it on connect.
    if transport is Transport.NVME_TCP:
        nqn(value.nvme_host_nqn, f"{field}.nvme_host_nqn")
    else:
        text(value.nvme_host_nqn, f"{field}.nvme_host_nqn")
    if transport is Transport.NVME_TCP and value.nvme_host_id and not UUID_RE.fullmatch(value.nvme_host_id):
        raise InvalidArgument(f"{field}.nvme_host_id", f"{quote(value.nvme_host_id)} is not a UUID")
    text(value.nvme_host_id, f"{field}.nvme_host_id")
    text(value.platform, f"{field}.platform")
    return value


def _count(items: tuple[object, ...], field: str, what: str) -> None:
    if not items:
        raise InvalidArgument(field, f"at least one {what} is required")
    if len(items) > MAX_PATHS:
        raise InvalidArgument(field, f"at most {MAX_PATHS} {what}s")


def _iscsi(t: IscsiConnection, field: str) -> None:
    _count(t.paths, f"{field}.paths", "path")
    for i, p in enumerate(t.paths):
        portal(p.portal, f"{field}.paths[{i}].portal")
        iqn(p.target_iqn, f"{field}.paths[{i}].target_iqn")
        lun(p.lun, f"{field}.paths[{i}].lun")
    if t.initiator_iqn:
        iqn(t.initiator_iqn, f"{field}.initiator_iqn")
    if t.mutual_chap is not None and t.chap is None:
        raise InvalidArgument(f"{field}.mutual_chap", "mutual CHAP needs chap too")
    if t.chap is not None:
        chap(t.chap, f"{field}.chap")
    if t.mutual_chap is not None:
        chap(t.mutual_chap, f"{field}.mutual_chap")


def _fc(t: FcConnection, field: str) -> None:
    if not t.target_wwpns:
        raise InvalidArgument(f"{field}.target_wwpns", "at least one target WWPN is required")
    for i, w in enumerate(t.target_wwpns):
        wwpn(w, f"{field}.target_wwpns[{i}]")
    lun(t.lun, f"{field}.lun")
    for initiator, targets in t.initiator_target_map.items():
        for w in (initiator, *targets):
            wwpn(w, f"{field}.initiator_target_map")


def _nvmeof(t: NvmeofConnection, field: str) -> None:
    nqn(t.subsystem_nqn, f"{field}.subsystem_nqn")
    _count(t.portals, f"{field}.portals", "portal")
    for i, p in enumerate(t.portals):
        portal(p.address, f"{field}.portals[{i}].address")
        if p.transport not in NVME_TRANSPORTS:
            raise InvalidArgument(f"{field}.portals[{i}].transport", f"one of {', '.join(NVME_TRANSPORTS)}")
    if t.namespace_uuid and not UUID_RE.fullmatch(t.namespace_uuid):
        raise InvalidArgument(f"{field}.namespace_uuid", f"{quote(t.namespace_uuid)} is not a UUID")
    _uint(t.namespace_id, f"{field}.namespace_id", MAX_U32)
    if t.namespace_nguid and not NGUID_RE.fullmatch(t.namespace_nguid):
        raise InvalidArgument(f"{field}.namespace_nguid", f"{quote(t.namespace_nguid)} is not 32 hex digits")
    if t.host_nqn:
        nqn(t.host_nqn, f"{field}.host_nqn")
    secrets = (("dhchap_host_secret", t.dhchap_host_secret), ("dhchap_ctrl_secret", t.dhchap_ctrl_secret))
    for name, s in secrets:
        if s is not None and not DHCHAP_SECRET_RE.fullmatch(s.reveal()):
            raise InvalidArgument(f"{field}.{name}", 'a DH-HMAC-CHAP secret ("DHHC-1:NN:<base64>:")')
    if t.dhchap_ctrl_secret is not None and t.dhchap_host_secret is None:
        raise InvalidArgument(f"{field}.dhchap_ctrl_secret", "only with dhchap_host_secret")


def _rbd(t: RbdConnection, field: str) -> None:
    for part, value in (("pool", t.pool), ("image", t.image)):
        if not RBD_NAME_RE.fullmatch(value):
            raise InvalidArgument(
                f"{field}.{part}", f"{quote(value)} is not 1-128 characters of [A-Za-z0-9._-]"
            )
    _count(t.monitors, f"{field}.monitors", "monitor")
    for i, m in enumerate(t.monitors):
        portal(m, f"{field}.monitors[{i}]")
    if t.user and not RBD_NAME_RE.fullmatch(t.user):
        raise InvalidArgument(f"{field}.user", f"{quote(t.user)} is not 1-128 characters of [A-Za-z0-9._-]")
    if t.key is not None and not RBD_KEY_RE.fullmatch(t.key.reveal()):
        raise InvalidArgument(f"{field}.key", "a Ceph key in base64")
    if t.image_id and not RBD_IMAGE_ID_RE.fullmatch(t.image_id):
        raise InvalidArgument(f"{field}.image_id", f"{quote(t.image_id)} is not an RBD image id (hex)")
    if t.cluster_fsid and not UUID_RE.fullmatch(t.cluster_fsid):
        raise InvalidArgument(f"{field}.cluster_fsid", f"{quote(t.cluster_fsid)} is not a UUID")


def validate_connection_info(info: ConnectionInfo, field: str = "connection_info") -> ConnectionInfo:
    """Every field of a typed ConnectionInfo, for every transport of the model. Returns `info`.

    The volume id is not required here (a host-only connect may not know it); `HostAgent.attach`
    requires it."""
    if info.volume_id:
        object_id(info.volume_id, f"{field}.volume_id")
    if info.attachment_id:
        object_id(info.attachment_id, f"{field}.attachment_id")
    if info.wwn:
        wwn(info.wwn, f"{field}.wwn")
    text(info.serial, f"{field}.serial")
    _uint(info.size_bytes, f"{field}.size_bytes", MAX_U64)
    block_size(info.logical_block_size, f"{field}.logical_block_size")
    block_size(info.physical_block_size, f"{field}.physical_block_size")
    iotune(info.qos, f"{field}.qos")
    t = info.transport
    if isinstance(t, IscsiConnection):
        _iscsi(t, f"{field}.iscsi")
    elif isinstance(t, FcConnection):
        _fc(t, f"{field}.fc")
    elif isinstance(t, NvmeofConnection):
        _nvmeof(t, f"{field}.nvmeof")
    elif isinstance(t, RbdConnection):
        _rbd(t, f"{field}.rbd")
    elif isinstance(t, LocalConnection):
        path(t.path, f"{field}.local.path")
    else:
        raise InvalidArgument(field, "no transport set (one of iscsi, fc, nvmeof, rbd, local)")
    return info
