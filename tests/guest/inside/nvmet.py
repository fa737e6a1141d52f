"""A Linux NVMe target (nvmet, nvmet-tcp) set up by a test through configfs, and the host's NVMe state.

The test's own target, independent of blockwire's storage service: subsystems with one namespace each
(a file, its NGUID and UUID chosen by the test), TCP ports on loopback addresses, allowed hosts with
DH-HMAC-CHAP keys. Everything made is removed by `Nvmet.close` (ports unlinked first: the host's
controllers drop, then namespaces, subsystems, hosts, ports). `host_leftovers` says what NVMe-oF state
the host has (controllers, subsystems, namespace heads); {} on a clean host.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import subprocess
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

CONFIGFS = Path("/sys/kernel/config/nvmet")
SYS_NVME = Path("/sys/class/nvme")
SYS_SUBSYS = Path("/sys/class/nvme-subsystem")
ADDRESSES = ("127.0.0.1", "127.0.0.2")


def available() -> str:
    """ "" when the guest has the NVMe/TCP target and initiator, else why not."""
    if not CONFIGFS.is_dir():
        return "no /sys/kernel/config/nvmet (nvmet not loaded, or configfs not mounted)"
    if not Path("/dev/nvme-fabrics").exists():
        return "no /dev/nvme-fabrics (nvme-fabrics / nvme-tcp not loaded)"
    return ""


def target_auth() -> str:
    """Empty when nvmet can demand DH-HMAC-CHAP (CONFIG_NVME_TARGET_AUTH: hosts/<nqn>/dhchap_key),
    else why not."""
    probe = CONFIGFS / "hosts" / "nqn.2014-08.io.blockwire:probe"
    probe.mkdir(exist_ok=True)
    try:
        has = (probe / "dhchap_key").exists()
        entries = sorted(p.name for p in probe.iterdir())
    finally:
        probe.rmdir()
    return "" if has else f"the guest kernel's nvmet has no DH-HMAC-CHAP (hosts/<nqn>/ has {entries})"


def dhchap_key(length: int = 32) -> str:
    """A DH-HMAC-CHAP secret as nvme-cli's gen-dhchap-key writes it: DHHC-1:00:base64(key + crc32le):"""
    key = secrets.token_bytes(length)
    crc = zlib.crc32(key).to_bytes(4, "little")
    return f"DHHC-1:00:{base64.b64encode(key + crc).decode()}:"


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass
class Namespace:
    subsystem: str
    nsid: int
    path: Path
    nguid: str  # 32 hex
    uuid: str


@dataclass
class Nvmet:
    """What this test made on the target side; `close()` removes it."""

    ports: dict[str, int] = field(default_factory=dict)  # address -> port id
    subsystems: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    links: list[Path] = field(default_factory=list)
    trsvcid: int = 4420

    def port(self, address: str) -> int:
        if address in self.ports:
            return self.ports[address]
        pid = 100 + len(self.ports) + int.from_bytes(os.urandom(1), "big") * 4
        d = CONFIGFS / "ports" / str(pid)
        d.mkdir()
        _write(d / "addr_trtype", "tcp")
        _write(d / "addr_adrfam", "ipv4")
        _write(d / "addr_traddr", address)
        _write(d / "addr_trsvcid", str(self.trsvcid))
        self.ports[address] = pid
        return pid

    def host(self, hostnqn: str, key: str = "", ctrl_key: str = "") -> None:
        d = CONFIGFS / "hosts" / hostnqn
        if not d.exists():
            d.mkdir()
            self.hosts.append(hostnqn)
        if key:
            _write(d / "dhchap_hash", "hmac(sha256)")
            _write(d / "dhchap_key", key)
        if ctrl_key:
            _write(d / "dhchap_ctrl_key", ctrl_key)

    def subsystem(self, nqn: str, hostnqn: str, addresses: tuple[str, ...] = ADDRESSES) -> None:
        d = CONFIGFS / "subsystems" / nqn
        d.mkdir()
        self.subsystems.append(nqn)
        _write(d / "attr_allow_any_host", "0")
        self.host(hostnqn)
        link = d / "allowed_hosts" / hostnqn
        link.symlink_to(CONFIGFS / "hosts" / hostnqn)
        for a in addresses:
            self.expose(nqn, a)

    def expose(self, nqn: str, address: str) -> None:
        link = CONFIGFS / "ports" / str(self.port(address)) / "subsystems" / nqn
        if not link.exists():
            link.symlink_to(CONFIGFS / "subsystems" / nqn)
            self.links.append(link)

    def hide(self, nqn: str, address: str) -> None:
        """The port stops offering the subsystem: its controllers there are gone (a path down)."""
        link = CONFIGFS / "ports" / str(self.ports[address]) / "subsystems" / nqn
        if link.is_symlink():
            link.unlink()

    def namespace(
        self, nqn: str, nsid: int, path: Path, size: int, *, nguid: str = "", ns_uuid: str = ""
    ) -> Namespace:
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(size)
        nguid = nguid or uuid.uuid4().hex
        ns_uuid = ns_uuid or str(uuid.uuid4())
        d = CONFIGFS / "subsystems" / nqn / "namespaces" / str(nsid)
        d.mkdir()
        _write(d / "device_path", str(path))
        # buffered: the file backend opens with O_DIRECT otherwise, which tmpfs (the tests' /tmp) refuses
        _write(d / "buffered_io", "1")
        _write(d / "device_nguid", nguid)
        _write(d / "device_uuid", ns_uuid)
        _write(d / "enable", "1")
        return Namespace(nqn, nsid, path, nguid, ns_uuid)

    def remove_namespace(self, nqn: str, nsid: int) -> None:
        d = CONFIGFS / "subsystems" / nqn / "namespaces" / str(nsid)
        if d.exists():
            with contextlib.suppress(OSError):
                _write(d / "enable", "0")
            d.rmdir()

    def grow(self, ns: Namespace, size: int) -> None:
        with open(ns.path, "r+b") as f:
            f.truncate(size)
        _write(CONFIGFS / "subsystems" / ns.subsystem / "namespaces" / str(ns.nsid) / "revalidate_size", "1")

    def close(self) -> None:
        for link in CONFIGFS.glob("ports/*/subsystems/*"):
            if link.name in self.subsystems:
                link.unlink()
        for nqn in self.subsystems:
            d = CONFIGFS / "subsystems" / nqn
            for ns in d.glob("namespaces/*"):
                self.remove_namespace(nqn, int(ns.name))
            for h in d.glob("allowed_hosts/*"):
                h.unlink()
            d.rmdir()
        for pid in self.ports.values():
            d = CONFIGFS / "ports" / str(pid)
            if not any(d.glob("subsystems/*")):
                d.rmdir()
        for h in self.hosts:
            with contextlib.suppress(OSError):
                (CONFIGFS / "hosts" / h).rmdir()
        self.subsystems.clear()
        self.ports.clear()
        self.hosts.clear()


def controllers() -> dict[str, dict[str, str]]:
    """nvmeN -> its sysfs attributes (subsysnqn, address, state, hostnqn, transport)."""
    out = {}
    for c in sorted(SYS_NVME.glob("nvme*")):
        attrs = {}
        for a in ("subsysnqn", "address", "state", "hostnqn", "transport", "cntlid"):
            with contextlib.suppress(OSError):
                attrs[a] = (c / a).read_text().strip()
        out[c.name] = attrs
    return out


def heads() -> list[str]:
    """Namespace block devices (nvmeXnY heads and nvmeXcYnZ paths) in /sys/block."""
    return sorted(p.name for p in Path("/sys/block").glob("nvme*"))


def host_leftovers() -> dict[str, list[str]]:
    found = {
        "nvme controllers": sorted(controllers()),
        "nvme subsystems": sorted(p.name for p in SYS_SUBSYS.glob("nvme-subsys*")),
        "nvme namespaces": heads(),
    }
    return {k: v for k, v in found.items() if v}


def disconnect_all() -> None:
    """Best effort, after a failed test: every fabrics controller deleted."""
    for c in SYS_NVME.glob("nvme*"):
        with contextlib.suppress(OSError):
            _write(c / "delete_controller", "1")


MULTIPATH_PARAM = Path("/sys/module/nvme_core/parameters/multipath")
HOST_MODULES = ("nvme_tcp", "nvme_fabrics", "nvme", "nvme_core")


def native_multipath() -> bool:
    return MULTIPATH_PARAM.read_text().strip().upper().startswith("Y")


def root_on_nvme() -> str:
    """The NVMe block device the guest's root (or any mount) lives on, "" when none: reloading nvme_core
    would take it away."""
    out = subprocess.run(["findmnt", "-rn", "-o", "SOURCE"], capture_output=True, text=True, check=False)
    return next((s for s in out.stdout.split() if s.startswith("/dev/nvme")), "")


def reload_host_driver(multipath: bool) -> str:
    """Unloads the host's NVMe driver (nvme_tcp, nvme_fabrics, nvme, nvme_core) and loads it again with
    nvme_core multipath=Y/N. Refuses (returns why) while any NVMe controller exists or a mount is on an
    NVMe device. "" when done and the parameter is what was asked."""
    if root := root_on_nvme():
        return f"{root} is mounted: nvme_core cannot be reloaded"
    if SYS_NVME.is_dir() and any(SYS_NVME.glob("nvme*")):
        return f"NVMe controllers exist: {sorted(p.name for p in SYS_NVME.glob('nvme*'))}"
    if MULTIPATH_PARAM.exists() and native_multipath() == multipath:
        return ""
    for m in HOST_MODULES:
        subprocess.run(["modprobe", "-r", m], capture_output=True, text=True, check=False, timeout=60)
    flag = "Y" if multipath else "N"
    proc = subprocess.run(
        ["modprobe", "nvme_core", f"multipath={flag}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        return f"modprobe nvme_core multipath={flag}: {proc.stderr.strip()}"
    subprocess.run(["modprobe", "-a", "nvme_fabrics", "nvme_tcp"], check=False, timeout=60)
    if not MULTIPATH_PARAM.exists() or native_multipath() != multipath:
        return f"nvme_core multipath is {MULTIPATH_PARAM.read_text().strip()} after the reload (built in?)"
    if not Path("/dev/nvme-fabrics").exists():
        return "no /dev/nvme-fabrics after the reload"
    return ""
