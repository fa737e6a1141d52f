"""Checks of connection info before any of it reaches a command line (iscsiadm, iscsi-inq, multipath),
libvirt XML, a journal file name or a libvirt secret's usage id. Pure: no I/O.

Every function raises `InvalidArgument` naming the field, and quotes at most 80 characters of a bad
value; secrets are never quoted.
"""

from __future__ import annotations

import ipaddress
import os
import re

from blockwire.errors import InvalidArgument
from blockwire.model import ConnectionInfo, FcConnection, IoTune, IscsiConnection, LocalConnection
from hostagent.connectors.base import split_portal
from hostagent.identity import normalize_wwn

# Volume ids name journal files and libvirt secrets: no '/', no characters the journal would fold.
VOLUME_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
ATTACHMENT_ID_RE = re.compile(r"[A-Za-z0-9._-]{0,128}")
# RFC 3720 names, the id part held to the characters initiators use (they reach iscsiadm's argv).
IQN_RE = re.compile(
    r"iqn\.\d{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*"
    r"(:[A-Za-z0-9._:-]+)?|eui\.[0-9A-Fa-f]{16}"
)
MAX_IQN = 223
HOSTNAME_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*)(\.[A-Za-z0-9_]([A-Za-z0-9_-]*))*")
CHAP_USER_RE = re.compile(r"[A-Za-z0-9._:-]{1,255}")
CHAP_SECRET_RE = re.compile(r"[!-~]{1,255}")  # printable ASCII, no spaces: it goes to iscsid and libvirt
WWN_RE = re.compile(r"[0-9a-f]{16}|[0-9a-f]{32}")
WWPN_RE = re.compile(r"[0-9a-f]{16}")
GROUP_RE = re.compile(r"[A-Za-z0-9._-]{0,64}")
MAX_LUN = 16383  # SAM flat space addressing; what every initiator and target here supports
MAX_TEXT = 255
MAX_PATH = 4096


def text(value: str, field: str, max_len: int = MAX_TEXT) -> str:
    """A printable string (no NUL, newline or other control characters) of at most `max_len`."""
    if len(value) > max_len:
        raise InvalidArgument(field, f"at most {max_len} characters")
    if not value.isprintable():
        raise InvalidArgument(field, "must be printable (no control characters)")
    return value


def volume_id(value: str, field: str = "volume_id") -> str:
    if not value:
        raise InvalidArgument(field, "required")
    if not VOLUME_ID_RE.fullmatch(value):
        raise InvalidArgument(field, f"{value[:80]!r} is not 1-128 characters of [A-Za-z0-9._-]")
    return value


def domain(value: str, field: str = "domain") -> str:
    """A libvirt domain name or UUID: printable, no '/', at most 255 characters."""
    if not value:
        raise InvalidArgument(field, "required")
    text(value, field)
    if "/" in value:
        raise InvalidArgument(field, f"{value[:80]!r}: libvirt domain names have no '/'")
    return value


def iqn(value: str, field: str) -> str:
    if len(value) > MAX_IQN or not IQN_RE.fullmatch(value):
        raise InvalidArgument(
            field, f"{value[:80]!r} is not an iSCSI name (iqn.YYYY-MM.domain[:id], eui.<16 hex>)"
        )
    return value


def portal_host(host: str, field: str) -> str:
    """The address part of a portal: an IP address or a DNS name, nothing a URL or argv could misread."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if len(host) > 253 or not HOSTNAME_RE.fullmatch(host):
            raise InvalidArgument(field, f"{host[:80]!r} is not an IP address or host name") from None
    return host


def iotune(t: IoTune, field: str) -> None:
    if not GROUP_RE.fullmatch(t.group_name):
        raise InvalidArgument(f"{field}.group_name", "at most 64 characters of [A-Za-z0-9._-]")


def _identity(info: ConnectionInfo, field: str) -> None:
    if info.volume_id:
        volume_id(info.volume_id, f"{field}.volume_id")
    if not ATTACHMENT_ID_RE.fullmatch(info.attachment_id):
        raise InvalidArgument(f"{field}.attachment_id", "at most 128 characters of [A-Za-z0-9._-]")
    if info.wwn:
        text(info.wwn, f"{field}.wwn", 64)
        if not WWN_RE.fullmatch(normalize_wwn(info.wwn)):
            raise InvalidArgument(
                f"{field}.wwn", f"{info.wwn[:80]!r} is not an NAA/EUI WWN (16 or 32 hex digits)"
            )
    text(info.serial, f"{field}.serial")
    for name in ("logical_block_size", "physical_block_size"):
        v = getattr(info, name)
        if v and (v < 512 or v > 65536 or v & (v - 1)):
            raise InvalidArgument(f"{field}.{name}", "a power of two from 512 to 65536")
    iotune(info.qos, f"{field}.qos")


def iscsi(info: ConnectionInfo, t: IscsiConnection, field: str = "connection_info") -> None:
    _identity(info, field)
    f = f"{field}.iscsi"
    if len(t.paths) > 32:
        raise InvalidArgument(f"{f}.paths", "at most 32 paths")
    for i, p in enumerate(t.paths):
        host, _ = split_portal(p.portal, f"{f}.paths[{i}].portal")
        portal_host(host, f"{f}.paths[{i}].portal")
        iqn(p.target_iqn, f"{f}.paths[{i}].target_iqn")
        if p.lun > MAX_LUN:
            raise InvalidArgument(f"{f}.paths[{i}].lun", f"{p.lun} is larger than {MAX_LUN}")
    if t.initiator_iqn:
        iqn(t.initiator_iqn, f"{f}.initiator_iqn")
    for name, chap in (("chap", t.chap), ("mutual_chap", t.mutual_chap)):
        if chap is None:
            continue
        if chap.username and not CHAP_USER_RE.fullmatch(chap.username):
            raise InvalidArgument(f"{f}.{name}.username", "1-255 characters of [A-Za-z0-9._:-]")
        if not CHAP_SECRET_RE.fullmatch(chap.password.reveal()):
            raise InvalidArgument(f"{f}.{name}.password", "1-255 printable ASCII characters, no spaces")


def fc(info: ConnectionInfo, t: FcConnection, field: str = "connection_info") -> None:
    _identity(info, field)
    f = f"{field}.fc"
    if t.lun > MAX_LUN:
        raise InvalidArgument(f"{f}.lun", f"{t.lun} is larger than {MAX_LUN}")
    for i, w in enumerate(t.target_wwpns):
        if not WWPN_RE.fullmatch(wwpn(w)):
            raise InvalidArgument(f"{f}.target_wwpns[{i}]", f"{w[:80]!r} is not 16 hex digits")
    for k, targets in t.initiator_target_map.items():
        if not WWPN_RE.fullmatch(wwpn(k)) or not all(WWPN_RE.fullmatch(wwpn(w)) for w in targets):
            raise InvalidArgument(f"{f}.initiator_target_map", "keys and values are 16 hex digits")


def wwpn(value: str) -> str:
    """A WWPN in the FC connector's normal form ("0x50:01:..." -> "5001...")."""
    return value.strip().lower().removeprefix("0x").replace(":", "")


def local(info: ConnectionInfo, t: LocalConnection, field: str = "connection_info") -> None:
    """An absolute, normalized path: '/dev/../etc/shadow' is refused, not resolved."""
    _identity(info, field)
    f = f"{field}.local.path"
    path = t.path
    text(path, f, MAX_PATH)
    if not path or not os.path.isabs(path):
        raise InvalidArgument(f, f"{path[:80]!r} is not an absolute path")
    if os.path.normpath(path) != path or path.startswith("//"):
        raise InvalidArgument(f, f"{path[:80]!r} is not a normalized path (no '..', '.', '//')")
