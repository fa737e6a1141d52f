"""libiscsi's userspace tools (iscsi-inq, iscsi-readcapacity16): probe a LUN without a kernel initiator.

The QEMU-native connector uses a `LunReader` to check a LUN's identity (VPD page 0x83) and the CHAP
credentials before handing the LUN to QEMU. Two implement it: `Libiscsi` here runs the tools (the CHAP
password goes to the tool through LIBISCSI_CHAP_PASSWORD in its environment, never in argv), and
`hostagent.host.libiscsi.InprocLibiscsi` asks libiscsi itself, in this process, without a process per
read. Run and parse are apart: `parse_*` are pure, on the tools' text or on the raw SCSI data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from blockwire.errors import BlockwireError, NotFound, PermissionDenied, Unavailable
from blockwire.model import Chap
from blockwire.runtime.executor import Arg, CommandFailed, Runner

ISCSI_INQ = "iscsi-inq"
READCAPACITY16 = "iscsi-readcapacity16"
EXIT_LOGIN_FAILED = 10  # libiscsi tools: login (auth, unknown target) or connect failed


@dataclass(frozen=True)
class Designator:
    """One VPD 0x83 designator as iscsi-inq prints it."""

    type: str  # "NAA", "T10_VENDORT_ID", "EUI_64", ...
    code_set: str  # "BINARY" or "ASCII"
    value: str


_DESIGNATOR = re.compile(
    r"Code Set:\(\d+\) (?P<code>\w+).*?"
    r"Designator Type:\(\d+\) (?P<type>\w+)\s*\nDesignator:\[(?P<value>.*?)\]",
    re.S,
)


def parse_vpd83(text: str) -> list[Designator]:
    """`iscsi-inq -e 1 -c 131` output -> designators. Binary ones are kept only when printed as hex."""
    found = []
    for m in _DESIGNATOR.finditer(text):
        value = m.group("value").strip()
        found.append(Designator(m.group("type"), m.group("code"), value))
    return found


def identities(designators: list[Designator]) -> list[str]:
    """The hex identities a designator list carries (NAA/EUI in hex, T10 vendor ids that are hex)."""
    out = []
    for d in designators:
        v = d.value.lower().removeprefix("0x")
        if v and re.fullmatch(r"[0-9a-f]{16,32}", v):
            out.append(v)
    return out


def parse_vpd80(text: str) -> str:
    """`iscsi-inq -e 1 -c 128` output -> the unit serial number ("Unit Serial Number:[   SERIAL1]")."""
    m = re.search(r"Unit Serial Number:\[(.*?)\]", text)
    return m.group(1).strip() if m else ""


def parse_readcapacity16(text: str) -> int:
    """`iscsi-readcapacity16` output -> size in bytes ("Total size:16777216")."""
    m = re.search(r"Total size:\s*(\d+)", text)
    if m is None:
        raise Unavailable("iscsi-readcapacity16 printed no size")
    return int(m.group(1))


def login_error(exc: CommandFailed, where: str) -> BlockwireError:
    return classify(exc.stderr, where, exc.message)


_NO_LUN = "LOGICAL_UNIT_NOT_SUPPORTED"  # the target is there, the LUN is not (sense 05/2500)


def classify(text: str, where: str, detail: str = "") -> BlockwireError:
    """What libiscsi said (a tool's stderr, or iscsi_get_error in process) -> the error: a refused CHAP login
    is PermissionDenied, an unknown target or LUN NotFound (libiscsi's "Target not found(515)" at login, or
    the LUN's "LOGICAL_UNIT_NOT_SUPPORTED" sense when the login's TEST UNIT READY finds no such LUN),
    anything else Unavailable."""
    if "Authentication failure" in text or "(513)" in text:
        return PermissionDenied(f"{where}: the target refused the CHAP credentials (Authentication failure)")
    if "Target not found" in text or "(515)" in text or "Not found" in text or _NO_LUN in text:
        return NotFound(f"{where}: the target or LUN is not exported to this initiator")
    return Unavailable(f"{where}: {detail or text}")


# -- the raw SCSI data (what the in-process reader gets): SPC-4 and SBC-3 layouts

CODE_SET_BINARY, CODE_SET_ASCII, CODE_SET_UTF8 = 1, 2, 3
ASSOCIATION_LUN = 0  # the designator names the logical unit (1: the target port, 2: the target device)
DESIGNATOR_TYPES = {
    0: "VENDOR_SPECIFIC",
    1: "T10_VENDOR_ID",
    2: "EUI_64",
    3: "NAA",
    4: "RELATIVE_TARGET_PORT",
    5: "TARGET_PORT_GROUP",
    6: "LOGICAL_UNIT_GROUP",
    7: "MD5_LOGICAL_UNIT",
    8: "SCSI_NAME_STRING",
    9: "PROTOCOL_SPECIFIC_PORT",
    10: "UUID",
}
PQ_NOT_SUPPORTED = 3  # INQUIRY's peripheral qualifier: "not capable of supporting a device on this LUN"


@dataclass(frozen=True)
class RawDesignator:
    """One designation descriptor of VPD page 0x83 (SPC-4 7.8.6): its value as sent, bytes."""

    type: int
    code_set: int
    association: int
    value: bytes

    @property
    def type_name(self) -> str:
        return DESIGNATOR_TYPES.get(self.type, f"TYPE_{self.type}")


class BadPage(ValueError):
    """The LUN answered something that is not the page asked for."""


def _page(data: bytes, code: int) -> bytes:
    """The page's payload after its 4-byte header, checked: the page code, and the length it says it has
    (a payload longer than the buffer is cut to it, and said so by the caller asking again)."""
    if len(data) < 4:
        raise BadPage(f"VPD page 0x{code:02x}: {len(data)} bytes, shorter than its header")
    if data[0] >> 5 == PQ_NOT_SUPPORTED:
        raise BadPage(f"VPD page 0x{code:02x}: the LUN is not there (peripheral qualifier 3)")
    if data[1] != code:
        raise BadPage(f"asked for VPD page 0x{code:02x}, the LUN answered page 0x{data[1]:02x}")
    length = int.from_bytes(data[2:4], "big")
    return data[4 : 4 + length]


def page_length(data: bytes) -> int:
    """The whole page's length (header included) a VPD page says it has: ask again when the buffer was
    smaller."""
    return 4 + int.from_bytes(data[2:4], "big") if len(data) >= 4 else 0


def parse_vpd83_raw(data: bytes) -> list[RawDesignator]:
    """VPD page 0x83 as sent (header + designation descriptors) -> its designators, in order. A descriptor
    that runs past the page's end is dropped (the page was cut), never read past."""
    payload = _page(data, 0x83)
    out = []
    i = 0
    while i + 4 <= len(payload):
        code_set = payload[i] & 0x0F
        association = (payload[i + 1] >> 4) & 0x03
        dtype = payload[i + 1] & 0x0F
        n = payload[i + 3]
        if i + 4 + n > len(payload):
            break
        out.append(RawDesignator(dtype, code_set, association, bytes(payload[i + 4 : i + 4 + n])))
        i += 4 + n
    return out


_HEX_ID = re.compile(r"[0-9a-f]{16,32}")


def raw_identities(designators: list[RawDesignator]) -> list[str]:
    """The hex identities of the logical unit (association 0) a designator list carries: binary NAA and
    EUI-64 designators in hex, as Linux shows them (wwid `naa.<hex>`); textual ones (T10 vendor id, its
    SCSI name string "naa.<hex>") when the whole text is hex, as the tools' `identities` takes them."""
    out: list[str] = []
    for d in designators:
        if d.association != ASSOCIATION_LUN:
            continue
        if d.code_set == CODE_SET_BINARY:
            if d.type in (2, 3) and d.value and d.value.hex() not in out:  # EUI-64, NAA
                out.append(d.value.hex())
            continue
        text = d.value.split(b"\0", 1)[0].decode("ascii", errors="replace").strip().lower()
        text = text.removeprefix("naa.").removeprefix("eui.").removeprefix("0x")
        if _HEX_ID.fullmatch(text) and text not in out:
            out.append(text)
    return out


def parse_vpd80_raw(data: bytes) -> str:
    """VPD page 0x80 as sent -> the unit serial number (ASCII, space padded as the target sends it)."""
    return _page(data, 0x80).split(b"\0", 1)[0].decode("ascii", errors="replace").strip()


def parse_readcapacity16_raw(data: bytes) -> int:
    """READ CAPACITY (16) parameter data (SBC-3 5.16.2) -> size in bytes: (last LBA + 1) x block length."""
    if len(data) < 12:
        raise BadPage(f"READ CAPACITY (16): {len(data)} bytes, fewer than 12")
    last_lba = int.from_bytes(data[0:8], "big")
    block = int.from_bytes(data[8:12], "big")
    if block == 0:
        raise BadPage("READ CAPACITY (16): block length 0")
    return (last_lba + 1) * block


@dataclass(frozen=True)
class Lun:
    """Where a LUN is: portal address and port, target, LUN number."""

    host: str
    port: int
    target_iqn: str
    lun: int


class LunReader(Protocol):
    """Reads a LUN's identity and size with the initiator's name and CHAP credentials, logging in for each
    read. A refused CHAP login raises PermissionDenied, an unknown target or LUN NotFound, anything else
    (no answer within the timeout, a dropped connection) Unavailable."""

    def identities(self, lun: Lun, chap: Chap | None, initiator: str) -> list[str]: ...

    def serial(self, lun: Lun, chap: Chap | None, initiator: str) -> str: ...

    def size(self, lun: Lun, chap: Chap | None, initiator: str) -> int: ...


class Libiscsi:
    """The LunReader that runs libiscsi's tools: a process per read (7-11 ms each here)."""

    def __init__(self, runner: Runner, *, timeout: float = 15.0) -> None:
        self.runner = runner
        self.timeout = timeout

    @staticmethod
    def url(lun: Lun, chap: Chap | None) -> str:
        user = f"{chap.username}@" if chap is not None else ""
        address = f"[{lun.host}]" if ":" in lun.host else lun.host
        return f"iscsi://{user}{address}:{lun.port}/{lun.target_iqn}/{lun.lun}"

    def _run(self, tool: str, args: list[str], lun: Lun, chap: Chap | None, initiator: str) -> str:
        url = self.url(lun, chap)
        env: dict[str, Arg] = {"LIBISCSI_CHAP_PASSWORD": chap.password} if chap is not None else {}
        argv = [tool, *args]
        if initiator:
            argv += ["-i", initiator]
        try:
            return self.runner.run([*argv, url], env=env, timeout=self.timeout).stdout
        except CommandFailed as exc:
            if exc.returncode == EXIT_LOGIN_FAILED:
                raise login_error(exc, url) from exc
            raise

    def identities(self, lun: Lun, chap: Chap | None, initiator: str) -> list[str]:
        """The LUN's hex identities from VPD page 0x83."""
        return identities(parse_vpd83(self._run(ISCSI_INQ, ["-e", "1", "-c", "131"], lun, chap, initiator)))

    def serial(self, lun: Lun, chap: Chap | None, initiator: str) -> str:
        """The LUN's unit serial number from VPD page 0x80."""
        return parse_vpd80(self._run(ISCSI_INQ, ["-e", "1", "-c", "128"], lun, chap, initiator))

    def size(self, lun: Lun, chap: Chap | None, initiator: str) -> int:
        return parse_readcapacity16(self._run(READCAPACITY16, [], lun, chap, initiator))
