"""The host's NVMe-oF state, read from sysfs, and the kernel's fabrics device (STYLE.md rule 2).

Layout (kernel 6.1, recorded in tests/data/recorded/sysfs_*nvme*):

* controllers: /sys/class/nvme/nvmeN (a link into /sys/devices/virtual/nvme-fabrics/ctl/nvmeN) with
  `subsysnqn`, `transport`, `address` ("traddr=...,trsvcid=...[,src_addr=...]"), `hostnqn`,
  `hostid`, `state` (new, live, resetting, connecting, deleting, deleting (no IO), dead), `cntlid`,
  and the write-only `delete_controller`, `rescan_controller`;
* subsystems: /sys/class/nvme-subsystem/nvme-subsysK with `subsysnqn`, a link per controller (nvmeN)
  and, with native multipath (/sys/module/nvme_core/parameters/multipath = Y), the namespace heads
  (nvmeKnM): one block device over every path, whose path devices (nvmeKcNnM, hidden) sit under each
  controller N; without native multipath each controller has
  its own namespace block device nvmeNnM;
* namespaces: /sys/block/<name> with `nsid`, `nguid` and `uuid` (in UUID notation; all zeros when
  the target announces none), `wwid` ("uuid.<uuid>", "eui.<nguid>", "nvme.<vid>-..."), `size` (512 B
  sectors); a path device has `ana_state`.

`DevFabrics` writes a connect's options to /dev/nvme-fabrics (what nvme-cli does; see
`hostagent.tools.nvme`): the only way this agent makes a controller.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hostagent.host.sysfs import Sysfs
from hostagent.tools.nvme import parse_address

log = logging.getLogger(__name__)

CONTROLLER_RE = re.compile(r"nvme\d+")
NAMESPACE_RE = re.compile(r"nvme\d+n\d+")  # a head, or a controller's namespace without native multipath
PATH_RE = re.compile(r"nvme\d+c\d+n\d+")  # a path device under a head (native multipath)
ZERO_ID = re.compile(r"[0\-]*")
FABRICS_DEVICE = "/dev/nvme-fabrics"


def normal_id(value: str) -> str:
    """An NGUID / UUID in one form to compare: lower-case hex without '-'; "" for none (all zeros)."""
    v = value.strip().lower().replace("-", "")
    for prefix in ("eui.", "uuid.", "0x"):
        if v.startswith(prefix):
            v = v[len(prefix) :]
    return "" if ZERO_ID.fullmatch(v) else v


@dataclass(frozen=True)
class Controller:
    name: str  # "nvme0"
    subsysnqn: str
    transport: str  # "tcp"
    traddr: str
    trsvcid: str
    hostnqn: str
    state: str  # "live", "connecting", "resetting", "deleting", ...
    subsystem: str = ""  # "nvme-subsys0", "" while not known

    @property
    def portal(self) -> tuple[str, str]:
        return self.traddr, self.trsvcid


@dataclass(frozen=True)
class Namespace:
    name: str  # "nvme0n1": the block device a consumer opens
    nsid: int
    nguid: str  # normal_id form, "" when none
    uuid: str  # normal_id form, "" when none
    wwid: str
    size_bytes: int
    paths: tuple[str, ...] = ()  # path devices ("nvme0c0n1") of a head, with native multipath

    def identities(self) -> set[str]:
        return {i for i in (self.nguid, self.uuid) if i}


class Fabrics(Protocol):
    """What the connector is given to make controllers: /dev/nvme-fabrics."""

    def connect(self, options: str) -> str:
        """Writes the options string; returns the kernel's answer ("instance=N,cntlid=M"). A refusal is
        OSError with the kernel's errno (EALREADY, ECONNREFUSED, EKEYREJECTED, ...)."""
        ...


class DevFabrics:
    """The real `Fabrics`: the kernel's fabrics device. The options (with any DH-HMAC-CHAP secret) go
    from this process's memory to the kernel: never on an argv, in an environment or in a file."""

    def __init__(self, path: str = FABRICS_DEVICE) -> None:
        self.path = path

    def connect(self, options: str) -> str:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            raise OSError(errno.ENODEV, f"{self.path} does not exist (is nvme-fabrics loaded?)") from None
        try:
            os.write(fd, options.encode())
            return os.read(fd, 4096).decode(errors="replace")
        finally:
            os.close(fd)


# Identify, CNS 03h (namespace identification descriptor list) through the controller's character device:
# struct nvme_passthru_cmd (linux/nvme_ioctl.h), NVME_IOCTL_ADMIN_CMD = _IOWR('N', 0x41, 72 bytes).
NVME_IOCTL_ADMIN_CMD = 0xC0484E41
NVME_ADMIN_IDENTIFY = 0x06
CNS_NS_DESCRIPTORS = 0x03
# opcode flags rsvd nsid cdw2 cdw3 metadata addr metadata_len data_len cdw10-15 timeout_ms result
_PASSTHRU = struct.Struct("=BBHIIIQQII6III")
NIDT_NGUID, NIDT_UUID = 2, 3

Identify = Callable[[str, int], "dict[str, str] | None"]


def parse_ns_descriptors(data: bytes) -> dict[str, str]:
    """The namespace identification descriptor list (NVMe base spec, Identify CNS 03h): NIDT (1 byte),
    NIDL (1), 2 reserved, NIDL bytes of id -> {"nguid": hex, "uuid": hex} (normal_id form)."""
    out: dict[str, str] = {}
    i = 0
    while i + 4 <= len(data):
        nidt, nidl = data[i], data[i + 1]
        if nidt == 0 or nidl == 0:
            break
        value = data[i + 4 : i + 4 + nidl].hex()
        if nidt == NIDT_NGUID:
            out["nguid"] = normal_id(value)
        elif nidt == NIDT_UUID:
            out["uuid"] = normal_id(value)
        i += 4 + nidl
    return out


def identify_ns_ioctl(device: str, nsid: int) -> dict[str, str] | None:
    """The identity the controller /dev/<device> reports for namespace `nsid` (one admin command, no
    process): known before, and whether or not, the kernel makes a block device for it (it makes none
    for a namespace whose NGUID another subsystem's namespace on this host has). None when it cannot be
    asked."""
    buf = ctypes.create_string_buffer(4096)
    # fmt: off
    fields = (
        NVME_ADMIN_IDENTIFY, 0, 0, nsid, 0, 0, 0, ctypes.addressof(buf), 0, 4096,
        CNS_NS_DESCRIPTORS, 0, 0, 0, 0, 0, 5000, 0,
    )
    # fmt: on
    cmd = bytearray(_PASSTHRU.pack(*fields))
    try:
        fd = os.open(f"/dev/{device}", os.O_RDONLY)
    except OSError as exc:
        log.debug("cannot open /dev/%s to identify namespace %d: %s", device, nsid, exc.strerror)
        return None
    try:
        fcntl.ioctl(fd, NVME_IOCTL_ADMIN_CMD, cmd)
    except OSError as exc:
        log.debug("identify of namespace %d on /dev/%s failed: %s", nsid, device, exc.strerror)
        return None
    finally:
        os.close(fd)
    return parse_ns_descriptors(buf.raw)


class NvmeHost:
    """Reads controllers, subsystems and namespaces from sysfs; deletes and rescans controllers; asks a
    controller for a namespace's identity (`identify`, injectable: tests give a fake)."""

    def __init__(self, sysfs: Sysfs, identify: Identify = identify_ns_ioctl) -> None:
        self.sysfs = sysfs
        self.identify = identify

    def available(self) -> bool:
        """The host can connect NVMe/TCP (nvme-tcp loaded or built in)."""
        return self.sysfs.exists("module/nvme_tcp")

    def native_multipath(self) -> bool:
        return (self.sysfs.read("module/nvme_core/parameters/multipath") or "N").upper().startswith("Y")

    def _attr(self, rel: str) -> str:
        return self.sysfs.read(rel) or ""

    def controller(self, name: str) -> Controller | None:
        base = f"class/nvme/{name}"
        nqn = self.sysfs.read(f"{base}/subsysnqn")
        if nqn is None:
            return None
        addr = parse_address(self._attr(f"{base}/address"))
        return Controller(
            name=name,
            subsysnqn=nqn,
            transport=self._attr(f"{base}/transport"),
            traddr=addr.get("traddr", ""),
            trsvcid=addr.get("trsvcid", ""),
            hostnqn=self._attr(f"{base}/hostnqn"),
            state=self._attr(f"{base}/state"),
            subsystem=self.subsystem_of_controller(name),
        )

    def controllers(self, subsysnqn: str = "") -> list[Controller]:
        """Every controller (of `subsysnqn` when given), fabrics and PCI alike."""
        found = []
        for name in self.sysfs.listdir("class/nvme"):
            if not CONTROLLER_RE.fullmatch(name):
                continue
            if subsysnqn and self.sysfs.read(f"class/nvme/{name}/subsysnqn") != subsysnqn:
                continue  # another subsystem's: not read further (many volumes: many controllers)
            c = self.controller(name)
            if c is not None and (not subsysnqn or c.subsysnqn == subsysnqn):
                found.append(c)
        return found

    def subsystem_of_controller(self, controller: str) -> str:
        for s in self.sysfs.listdir("class/nvme-subsystem"):
            if controller in self.sysfs.listdir(f"class/nvme-subsystem/{s}"):
                return s
        return ""

    def subsystem_controllers(self, subsystem: str) -> list[str]:
        return [
            n for n in self.sysfs.listdir(f"class/nvme-subsystem/{subsystem}") if CONTROLLER_RE.fullmatch(n)
        ]

    def namespace(self, name: str) -> Namespace | None:
        base = f"block/{name}"
        nsid = self.sysfs.read(f"{base}/nsid")
        if nsid is None or not nsid.isdigit():
            return None
        size = self.sysfs.read(f"{base}/size") or "0"
        return Namespace(
            name=name,
            nsid=int(nsid),
            nguid=normal_id(self._attr(f"{base}/nguid")),
            uuid=normal_id(self._attr(f"{base}/uuid")),
            wwid=self._attr(f"{base}/wwid"),
            size_bytes=int(size) * 512 if size.isdigit() else 0,
            paths=self._paths_of(name),
        )

    def _paths_of(self, head: str) -> tuple[str, ...]:
        """The path devices of a head nvmeKnM: nvmeKcNnM under each controller N of its subsystem (6.1's
        head has no multipath/ directory)."""
        m = re.fullmatch(r"nvme(\d+)n(\d+)", head)
        if not m or not self.sysfs.exists(f"class/nvme-subsystem/nvme-subsys{m[1]}/{head}"):
            return ()
        found = []
        for c in self.subsystem_controllers(f"nvme-subsys{m[1]}"):
            for p in self.sysfs.listdir(f"class/nvme/{c}"):
                pm = PATH_RE.fullmatch(p) and re.fullmatch(r"nvme(\d+)c\d+n(\d+)", p)
                if pm and pm[1] == m[1] and pm[2] == m[2]:
                    found.append(p)
        return tuple(sorted(found))

    def controller_namespaces(self, controller: str) -> list[str]:
        """The namespace block devices of one controller (nvmeNnM under class/nvme/nvmeN): there only
        without native multipath, where each controller has its own (path devices nvmeKcNnM do not
        match)."""
        return sorted(n for n in self.sysfs.listdir(f"class/nvme/{controller}") if NAMESPACE_RE.fullmatch(n))

    def namespaces(self, subsystem: str) -> list[Namespace]:
        """The namespaces a consumer opens of one subsystem: its heads (native multipath), or else the
        namespace devices of each of its controllers."""
        names = [
            n for n in self.sysfs.listdir(f"class/nvme-subsystem/{subsystem}") if NAMESPACE_RE.fullmatch(n)
        ]
        if not names:
            for c in self.subsystem_controllers(subsystem):
                names += self.controller_namespaces(c)
        found = [self.namespace(n) for n in sorted(set(names))]
        return [ns for ns in found if ns is not None]

    def subsystem_of_namespace(self, name: str) -> str:
        """The subsystem a namespace block device belongs to ("" when it is not an NVMe namespace)."""
        for s in self.sysfs.listdir("class/nvme-subsystem"):
            if name in self.sysfs.listdir(f"class/nvme-subsystem/{s}"):
                return s
            for c in self.subsystem_controllers(s):
                if name in self.sysfs.listdir(f"class/nvme/{c}"):
                    return s
        return ""

    def ana_state(self, path_device: str) -> str:
        return self._attr(f"block/{path_device}/ana_state")

    def ana_state_via(self, controller: str, nsid: int) -> str:
        """The ANA state of namespace `nsid` over one controller: its path device's (nvmeKcNnM under
        class/nvme/nvmeN; the M of the name is the head's instance, not the nsid, so the nsid attribute
        decides). "" without native multipath, without ANA, or while the path has no device."""
        for p in self.sysfs.listdir(f"class/nvme/{controller}"):
            if PATH_RE.fullmatch(p) and self._attr(f"class/nvme/{controller}/{p}/nsid") == str(nsid):
                return self._attr(f"class/nvme/{controller}/{p}/ana_state")
        return ""

    def delete_controller(self, name: str) -> None:
        """Disconnects one controller (synchronous in the kernel: gone from sysfs when this returns). A
        controller already gone is fine."""
        if not self.sysfs.exists(f"class/nvme/{name}/delete_controller"):
            return
        self.sysfs.write(f"class/nvme/{name}/delete_controller", "1")

    def rescan(self, name: str) -> None:
        self.sysfs.write(f"class/nvme/{name}/rescan_controller", "1")
