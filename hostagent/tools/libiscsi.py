"""libiscsi's userspace tools (iscsi-inq, iscsi-readcapacity16): probe a LUN without a kernel initiator.

The QEMU-native connector uses them to check a LUN's identity (VPD page 0x83) and the CHAP credentials
before handing the LUN to QEMU. The CHAP password goes to the tool through LIBISCSI_CHAP_PASSWORD in
its environment, never in argv. Run and parse are apart: `parse_*` are pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
    text = exc.stderr
    if "Authentication failure" in text or "(513)" in text:
        return PermissionDenied(f"{where}: the target refused the CHAP credentials (Authentication failure)")
    if "Target not found" in text or "(515)" in text or "Not found" in text:
        return NotFound(f"{where}: the target or LUN is not exported to this initiator")
    return Unavailable(f"{where}: {exc.message}")


@dataclass(frozen=True)
class Lun:
    """Where a LUN is: portal address and port, target, LUN number."""

    host: str
    port: int
    target_iqn: str
    lun: int


class Libiscsi:
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
