"""Argument checks: every function raises `InvalidArgument` naming the field, and changes nothing."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping

from blockwire.errors import InvalidArgument
from blockwire.model import Connector, Transport
from storagesvc.model import MIB

# Every pattern is applied with fullmatch: "$" alone would also accept a trailing newline.
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,62}")
LABEL_KEY_RE = re.compile(r"[a-z0-9._/-]{1,63}")
# RFC 3720 3.2.6.3: iqn.yyyy-mm.reversed-domain[:id], or eui. + 16 hex digits. The id part is held to the
# characters initiators really use ([A-Za-z0-9._:-]): IQNs reach tgtadm's and iscsiadm's command lines.
IQN_RE = re.compile(
    r"iqn\.\d{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*"
    r"(:[A-Za-z0-9._:-]+)?"
)
EUI_RE = re.compile(r"eui\.[0-9A-Fa-f]{16}")
ID_RE = re.compile(r"[0-9a-f]{32}")
HEX_RE = re.compile(r"[0-9a-f]+")
# Host names: RFC 1123 labels, plus '_' (seen in the wild); no spaces, no shell or XML metacharacters.
HOST_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*)(\.[A-Za-z0-9_]([A-Za-z0-9_-]*))*\.?")
WWPN_RE = re.compile(r"[0-9a-f]{16}")
MAX_IQN = 223
MAX_TEXT = 255  # informational strings (domain names, device names) are kept, never interpreted
MAX_PATH = 4096
MAX_SIZE = 1 << 60  # 1 EiB: anything larger is a typo
MAX_PAGE = 1000
DEFAULT_PAGE = 100


def name(value: str, field: str = "name") -> str:
    if not value:
        raise InvalidArgument(field, "required; 1-63 characters of [A-Za-z0-9._-]")
    if not NAME_RE.fullmatch(value):
        raise InvalidArgument(
            field,
            f"{value[:80]!r} is not 1-63 characters of [A-Za-z0-9._-] starting with a letter, digit or '_'",
        )
    return value


def object_id(value: str, field: str) -> str:
    """Ids are server-assigned; an empty one is a malformed request, an unknown one is NOT_FOUND."""
    if not value:
        raise InvalidArgument(field, "required")
    if len(value) > 128 or not value.isprintable():
        raise InvalidArgument(field, "not an id this service issues")
    return value


def size(value: int, field: str = "size_bytes", *, allow_zero: bool = False) -> int:
    if value == 0 and allow_zero:
        return 0
    if value <= 0:
        raise InvalidArgument(field, "must be a positive multiple of 1 MiB (1048576)")
    if value % MIB:
        raise InvalidArgument(field, f"{value} is not a multiple of 1 MiB (1048576)")
    if value > MAX_SIZE:
        raise InvalidArgument(field, f"{value} is larger than 1 EiB")
    return value


def labels(value: Mapping[str, str], field: str = "labels") -> dict[str, str]:
    if len(value) > 64:
        raise InvalidArgument(field, "at most 64 labels")
    for k, v in value.items():
        if not LABEL_KEY_RE.fullmatch(k):
            raise InvalidArgument(f"{field}[{k[:80]!r}]", "keys are 1-63 characters of [a-z0-9._/-]")
        if len(v) > 255:
            raise InvalidArgument(f"{field}[{k!r}]", "values are at most 255 characters")
        if not v.isprintable():
            raise InvalidArgument(f"{field}[{k!r}]", "values must be printable (no control characters)")
    return dict(value)


def iqn(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(
            field, "required: an iSCSI name (iqn.YYYY-MM.reverse.domain[:id] or eui.<16 hex>)"
        )
    if len(value) > MAX_IQN or not (IQN_RE.fullmatch(value) or EUI_RE.fullmatch(value)):
        raise InvalidArgument(
            field,
            f"{value[:80]!r} is not an iSCSI name "
            "(lower-case iqn.YYYY-MM.reverse.domain[:id], or eui.<16 hex>)",
        )
    return value


def portal(value: str, field: str = "portal") -> str:
    """'address:port' with an IPv4 address or a bracketed IPv6 one; returned unchanged."""
    host, sep, port = value.rpartition(":")
    if len(value) > 64 or not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise InvalidArgument(field, f"{value[:80]!r} is not address:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        version = 6
    else:
        version = 4
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidArgument(field, f"{value!r}: {host!r} is not an IP address") from None
    if addr.version != version:
        raise InvalidArgument(field, f"{value!r}: IPv6 addresses go in brackets ([::1]:3260)")
    return value


def page_size(value: int, field: str = "page_size") -> int:
    if value == 0:
        return DEFAULT_PAGE
    if not 1 <= value <= MAX_PAGE:
        raise InvalidArgument(field, f"{value} is not in 1-{MAX_PAGE} (0 means {DEFAULT_PAGE})")
    return value


def iscsi_connector(c: Connector, field: str = "connector") -> Connector:
    """A connector an iSCSI export can be made for."""
    if not c.host:
        raise InvalidArgument(f"{field}.host", "required")
    if not name_like_host(c.host):
        raise InvalidArgument(f"{field}.host", f"{c.host[:80]!r} is not a host name")
    if c.transports and Transport.ISCSI not in c.transports:
        raise InvalidArgument(
            f"{field}.transports", "this service exports over iSCSI only; the host does not list it"
        )
    iqn(c.initiator_iqn, f"{field}.initiator_iqn")
    _connector_extras(c, field)
    return c


def _connector_extras(c: Connector, field: str) -> None:
    """The fields an iSCSI export does not use are still stored and returned: keep them sane."""
    if len(c.ips) > 64:
        raise InvalidArgument(f"{field}.ips", "at most 64 addresses")
    for i, ip in enumerate(c.ips):
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise InvalidArgument(f"{field}.ips[{i}]", f"{ip[:80]!r} is not an IP address") from None
    for name, values in (("wwpns", c.wwpns), ("wwnns", c.wwnns)):
        if len(values) > 64:
            raise InvalidArgument(f"{field}.{name}", "at most 64 port names")
        for i, w in enumerate(values):
            if not WWPN_RE.fullmatch(w):
                raise InvalidArgument(f"{field}.{name}[{i}]", f"{w[:80]!r} is not 16 lower-case hex digits")
    for name, value in (
        ("nvme_host_nqn", c.nvme_host_nqn),
        ("nvme_host_id", c.nvme_host_id),
        ("platform", c.platform),
    ):
        text(value, f"{field}.{name}")


def name_like_host(value: str) -> bool:
    return 0 < len(value) <= 253 and HOST_RE.fullmatch(value) is not None


def host(value: str, field: str = "host") -> str:
    """A compute host's name (RFC 1123)."""
    if not name_like_host(value):
        raise InvalidArgument(field, f"{value[:80]!r} is not a host name (RFC 1123, at most 253 characters)")
    return value


def text(value: str, field: str, max_len: int = MAX_TEXT) -> str:
    """An informational string (a domain name, a device name): stored and returned, never interpreted.
    At most `max_len` characters, printable (no NUL, newline or other control characters)."""
    if len(value) > max_len:
        raise InvalidArgument(field, f"at most {max_len} characters")
    if not value.isprintable():
        raise InvalidArgument(field, "must be printable (no control characters)")
    return value


def image_path(value: str, field: str = "source_image.path") -> str:
    """An absolute, normalized path on the storage host: no '..', no '//', no control characters."""
    if not value:
        raise InvalidArgument(field, "required")
    text(value, field, MAX_PATH)
    if not os.path.isabs(value):
        raise InvalidArgument(field, "must be an absolute path on the storage host")
    if os.path.normpath(value) != value or "/../" in f"{value}/" or value.startswith("//"):
        raise InvalidArgument(field, f"{value[:80]!r} is not a normalized path (no '..', '.', '//')")
    return value


def naa_oui(value: str, field: str = "naa_oui") -> str:
    if len(value) != 6 or not HEX_RE.fullmatch(value):
        raise InvalidArgument(field, f"{value!r} is not 6 lower-case hex digits (an IEEE company id)")
    return value
