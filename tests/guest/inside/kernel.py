"""Helpers for tests that run inside the guest: commands with deadlines, tgt targets, and the kernel's
iSCSI / SCSI / multipath state (what exists, and making sure nothing is left).

Raw tools only (iscsiadm, tgtadm, multipath, udevadm, sysfs): scenarios use them to set up and to check
what blockwire's own code did.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hostagent.connectors.scsi import IN_USE_MARKERS
from tests.host.daemons import Tgtd
from tests.rig import wait_until  # scenarios call it as kernel.wait_until too

# open-iscsi exit codes seen in practice (iscsi_err.h)
ISCSI_ERR_SESS_EXISTS = 15
ISCSI_ERR_NO_OBJS_FOUND = 21

PORTALS = ("127.0.0.1:3260", "127.0.0.2:3260")
BY_PATH = Path("/dev/disk/by-path")
BY_ID = Path("/dev/disk/by-id")
SYS_BLOCK = Path("/sys/block")
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ENODEV, errno.ENXIO)


def attr(path: Path) -> str | None:
    """A sysfs attribute's text, None when its object is gone: the kernel removes controllers, sessions
    and devices while a test walks them (a disconnect in flight), so a walk must not fail on a vanished
    entry."""
    try:
        return path.read_text().strip()
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise


def entries(directory: Path) -> list[Path]:
    """A sysfs directory's entries, [] when it is gone (see `attr`)."""
    try:
        return sorted(directory.iterdir())
    except OSError as exc:
        if exc.errno in _GONE:
            return []
        raise


def run(
    argv: Sequence[str], *, ok: Sequence[int] = (0,), timeout: float = 60, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs argv (no shell); fails the test with the output unless the exit code is in `ok`."""
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, input=input
    )
    if proc.returncode not in ok:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode} (expected {tuple(ok)}):\n{proc.stdout}{proc.stderr}"
        )
    return proc


def keep_log(path: Path, name: str) -> None:
    """Copies a daemon's log into the run's results (BLOCKWIRE_GUEST_RESULTS/logs/NAME), which the host
    keeps with the last runs (/var/tmp/blockwire-guest/run-*/results/logs/)."""
    results = os.environ.get("BLOCKWIRE_GUEST_RESULTS")
    if not results or not path.exists():
        return
    logs = Path(results, "logs")
    logs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, logs / name)


def settle(timeout: int = 60) -> None:
    run(["udevadm", "settle", f"--timeout={timeout}"], timeout=timeout + 10)


# --- tgt ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lun:
    tid: int
    iqn: str
    lun: int
    backing: Path
    scsi_id: str | None = None
    scsi_sn: str | None = None

    @property
    def naa(self) -> str:
        """The NAA the kernel reads for this LUN (wwid `naa.<naa>`, ID_SERIAL and multipath `3<naa>`)."""
        assert self.scsi_id is not None, "tgt's default identity depends on tid and LUN only"
        return tgt_naa(self.scsi_id)


def tgt_naa(scsi_id: str) -> str:
    """tgt's NAA 6 designator for `--params scsi_id=ID` (tests/data/recorded/README.md): each character's
    hex value (0 unless a hex digit), right-aligned in 32 digits, the first digit replaced by 6."""
    digits = "".join(c.lower() if c in "0123456789abcdefABCDEF" else "0" for c in scsi_id)
    return "6" + digits.rjust(32, "0")[-31:]


def make_target(
    tgtd: Tgtd,
    tid: int,
    iqn: str,
    backing: Path,
    *,
    size_mb: int = 64,
    scsi_id: str | None = None,
    scsi_sn: str | None = None,
    initiators: str = "ALL",
) -> Lun:
    """A tgt target `iqn` with LUN 1 on a sparse file; scsi_id/scsi_sn set the identity it announces."""
    with backing.open("wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    tgtd.adm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn)
    tgtd.adm("--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", "1", "-b", str(backing))
    params = ",".join(
        p for p in (f"scsi_id={scsi_id}" if scsi_id else "", f"scsi_sn={scsi_sn}" if scsi_sn else "") if p
    )
    if params:
        tgtd.adm(
            "--op", "update", "--mode", "logicalunit", "--tid", str(tid), "--lun", "1", "--params", params
        )
    tgtd.adm("--op", "bind", "--mode", "target", "--tid", str(tid), "-I", initiators)
    return Lun(tid=tid, iqn=iqn, lun=1, backing=backing, scsi_id=scsi_id, scsi_sn=scsi_sn)


def delete_target(tgtd: Tgtd, tid: int) -> None:
    tgtd.adm("--op", "delete", "--mode", "target", "--tid", str(tid), "--force", check=False)


# --- open-iscsi ----------------------------------------------------------------------------------------


def node_new(iqn: str, portal: str) -> None:
    run(["iscsiadm", "-m", "node", "-o", "new", "-T", iqn, "-p", portal])


def login(iqn: str, portal: str, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    return run(["iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--login"], ok=ok, timeout=120)


def logout(iqn: str, portal: str, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    return run(["iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--logout"], ok=ok, timeout=120)


def sessions() -> list[str]:
    """`iscsiadm -m session` lines ([] when there are none: exit 21)."""
    proc = run(["iscsiadm", "-m", "session"], ok=(0, ISCSI_ERR_NO_OBJS_FOUND))
    return [line for line in proc.stdout.splitlines() if line.strip()]


def nodes() -> list[str]:
    proc = run(["iscsiadm", "-m", "node"], ok=(0, ISCSI_ERR_NO_OBJS_FOUND))
    return [line for line in proc.stdout.splitlines() if line.strip()]


def by_path_link(portal: str, iqn: str, lun: int = 1) -> Path:
    return BY_PATH / f"ip-{portal}-iscsi-{iqn}-lun-{lun}"


def disk_for(portal: str, iqn: str, lun: int = 1, timeout: float = 60) -> str:
    """Waits for udev's by-path link of the LUN behind `portal` and returns its kernel name (sdX)."""
    link = by_path_link(portal, iqn, lun)
    wait_until(f"{link}", link.exists, timeout)
    return link.resolve().name


# --- multipath ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapPath:
    dev: str
    wwid: str
    dm_state: str  # active / failed
    checker: str  # ready / faulty / ...


def map_paths() -> list[MapPath]:
    proc = run(["multipathd", "show", "paths", "raw", "format", "%d %w %t %T"])
    result = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] != "dev":
            result.append(MapPath(*parts))
    return result


def maps() -> dict[str, str]:
    """name -> WWID of every multipath map multipathd knows."""
    proc = run(["multipathd", "show", "maps", "raw", "format", "%n %w"])
    return dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2)


def flush_map(name: str, timeout: float = 30) -> None:
    """`multipath -f NAME` once udev is done with the map. Closing a map opened for writing makes udev
    probe it (blkid) and `multipath -f` says "map in use" (or its remove ioctl gets EBUSY) meanwhile:
    settle, then retry to a deadline."""
    settle()

    def flushed() -> bool:
        proc = run(["multipath", "-f", name], ok=(0, 1))
        if proc.returncode == 0:
            return True
        said = proc.stdout + proc.stderr
        assert any(marker in said for marker in IN_USE_MARKERS), said
        return False

    wait_until(f"multipath -f {name} (map in use)", flushed, timeout, every=0.5)


def dm_maps() -> list[str]:
    """Multipath maps (the initiator's; LVM's thin pools and volumes on the storage side are not ours)."""
    proc = run(["dmsetup", "ls", "--target", "multipath"])
    if "No devices found" in proc.stdout:
        return []
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def map_for(wwid: str) -> str | None:
    return next((name for name, w in maps().items() if w == wwid), None)


class Steps:
    """How long each step of a scenario took, from the end of the step before (seconds, to 10 ms):
    `took("attach")` after each step, `timings` printed or returned by the test."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._mark = time.monotonic()

    def took(self, step: str) -> None:
        now = time.monotonic()
        self.timings[step] = round(now - self._mark, 2)
        self._mark = now


# --- SCSI --------------------------------------------------------------------------------------------


def scsi_disks() -> list[str]:
    return sorted(p.name for p in SYS_BLOCK.glob("sd*"))


def sysfs_wwid(dev: str) -> str:
    return (SYS_BLOCK / dev / "device" / "wwid").read_text().strip()


def udev_properties(name: str) -> dict[str, str]:
    proc = run(["udevadm", "info", "--query=property", f"--name={name}"])
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def iscsi_links() -> list[str]:
    return sorted(p.name for p in BY_PATH.glob("*-iscsi-*")) if BY_PATH.exists() else []


# --- the state a clean host is in ----------------------------------------------------------------------


def leftovers() -> dict[str, list[str]]:
    """What iSCSI/SCSI/multipath state exists; {} on a clean host."""
    found = {
        "scsi disks": scsi_disks(),
        "dm maps": dm_maps(),
        "iscsi sessions": sessions(),
        "iscsi node records": nodes(),
        "by-path links": iscsi_links(),
    }
    return {k: v for k, v in found.items() if v}


def assert_nothing_left() -> None:
    settle()
    left = leftovers()
    assert not left, f"left behind: {left}"


def force_cleanup() -> None:
    """Best effort: flush maps, log out every session, delete every node record (after a failed test)."""
    with contextlib.suppress(Exception):
        settle()
        run(["multipath", "-F"], ok=(0, 1))
    with contextlib.suppress(Exception):
        run(["iscsiadm", "-m", "node", "--logoutall=all"], ok=(0, ISCSI_ERR_NO_OBJS_FOUND), timeout=120)
    with contextlib.suppress(Exception):
        run(["iscsiadm", "-m", "node", "-o", "delete"], ok=(0, ISCSI_ERR_NO_OBJS_FOUND))
    with contextlib.suppress(Exception):
        settle()


def dm_device(map_name: str) -> str:
    """Map name -> dm-N, from sysfs (/dev/mapper/NAME may still be a plain node before udev links it)."""
    for dm in SYS_BLOCK.glob("dm-*"):
        if attr(dm / "dm" / "name") == map_name:
            return dm.name
    raise AssertionError(f"no dm device is named {map_name}")


# --- libvirt (virsh) and data ---------------------------------------------------------------------------

MiB = 1024 * 1024


def virsh(*args: str, ok: Sequence[int] = (0,), timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run(["virsh", "-q", "-c", "qemu:///system", *args], ok=ok, timeout=timeout)


@dataclass(frozen=True)
class DomainDisk:
    target: str  # "sda"
    bus: str
    source: str  # the block device (source dev=) or "" for network disks
    serial: str


def domain_disks(domain: str) -> list[DomainDisk]:
    """The disks of the domain's live XML."""
    import xml.etree.ElementTree as ET  # noqa: PLC0415

    root = ET.fromstring(virsh("dumpxml", domain).stdout)
    disks = []
    for disk in root.findall("devices/disk"):
        target = disk.find("target")
        source = disk.find("source")
        serial = disk.find("serial")
        disks.append(
            DomainDisk(
                target=target.get("dev", "") if target is not None else "",
                bus=target.get("bus", "") if target is not None else "",
                source=source.get("dev", "") if source is not None else "",
                serial=serial.text or "" if serial is not None else "",
            )
        )
    return disks


def domain_xml(domain: str) -> str:
    return virsh("dumpxml", domain).stdout


def domblk_capacity(domain: str, target: str) -> int:
    """What QEMU reports as the disk's size (`virsh domblkinfo`)."""
    out = virsh("domblkinfo", domain, target).stdout
    for line in out.splitlines():
        if line.startswith("Capacity:"):
            return int(line.split()[1])
    raise AssertionError(f"no Capacity in virsh domblkinfo {domain} {target}:\n{out}")


def write_pattern(device: Path | str, offset_mib: int, size_mib: int = 1) -> bytes:
    """Writes random data at `offset_mib` of `device` (O_DIRECT, fsync) and returns it."""
    pattern = os.urandom(size_mib * MiB)
    fd = os.open(str(device), os.O_WRONLY)
    try:
        os.pwrite(fd, pattern, offset_mib * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    return pattern


def read_at(path: Path | str, offset_mib: int, size_mib: int = 1) -> bytes:
    """Reads from a device with O_DIRECT (past the page cache) or from a file."""
    is_block = Path(path).resolve().is_block_device()
    if is_block:
        proc = subprocess.run(
            ["dd", f"if={path}", "bs=1M", f"count={size_mib}", f"skip={offset_mib}", "iflag=direct",
             "status=none"],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
        return proc.stdout
    with open(path, "rb") as f:
        f.seek(offset_mib * MiB)
        return f.read(size_mib * MiB)


def session_ids(iqn: str) -> dict[str, int]:
    """portal -> SID of the sessions to target `iqn`."""
    found = {}
    for line in sessions():
        # "tcp: [3] 127.0.0.1:3260,1 iqn... (non-flash)"
        parts = line.split()
        if len(parts) >= 4 and parts[3] == iqn:
            found[parts[2].rsplit(",", 1)[0]] = int(parts[1].strip("[]"))
    return found


def map_slaves(map_name: str) -> list[str]:
    return sorted(os.listdir(SYS_BLOCK / dm_device(map_name) / "slaves"))


def active_paths(wwid: str) -> list[str]:
    """sd devices of the map with this WWID that multipathd sees active and ready."""
    return sorted(
        p.dev for p in map_paths() if p.wwid == wwid and p.dm_state == "active" and p.checker == "ready"
    )
