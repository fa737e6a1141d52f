"""Who holds a block device open: processes with a file descriptor on it, and mounts of it (STYLE.md
rule 2: /proc is read only here, /sys only through Sysfs).

A disconnect asks before it removes a device (a multipath map, an sd disk): deleting an sd disk the
kernel lets go even while a process has it open (its I/O then fails), so "is it open" must be looked
up, not left to the kernel. Kernel holders (a dm map, LVM or dm-crypt built on the device) are in
sysfs (`/sys/block/X/holders`) and are the caller's to judge (a map it flushes itself is no user).

How: the device's number (`/sys/block/X/dev`, "253:0") is compared with `st_rdev` of every
`/proc/PID/fd/N` (stat follows the magic link to the inode whatever its path: QEMU under libvirt sees
the device through a private /dev, so link *names* do not tell), and with the "major:minor" field of
`/proc/self/mountinfo`. Not users, and never reported:

* multipathd: its path checker keeps a descriptor on every path disk for as long as the path exists;
* udev's workers and the programs its rules run (blkid, kpartx, `multipath -U`, found by their parent
  chain): they open a device for a moment after each of its events (the "map in use" race of a flush,
  which the flush retries on its own).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Protocol

from hostagent.host.sysfs import Sysfs

log = logging.getLogger(__name__)

NOT_USERS = frozenset({"multipathd"})  # comm of daemons whose descriptors on a device are no use of it
UDEV = frozenset({"systemd-udevd", "(udev-worker)", "udevd"})  # comm of udev's daemon and its workers
_ANCESTORS = 8  # how far up the parent chain a process is looked for udev


class Openers(Protocol):
    """What connectors are given to learn who holds devices open."""

    def users(self, devs: Collection[str]) -> dict[str, list[str]]:
        """Block devices of `devs` ("sdc", "dm-0") that something holds open -> who, each as a phrase
        ("process 1234 (qemu-system-x86) holds it open", "mounted at /mnt"). Devices nobody holds are
        not in the result."""
        ...


def parse_stat(text: str) -> tuple[str, int]:
    """(comm, ppid) of a /proc/PID/stat line; comm may hold spaces and parentheses."""
    head, _, rest = text.rpartition(")")
    comm = head.partition("(")[2]
    fields = rest.split()
    return comm, int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """("major:minor", mount point) of each /proc/PID/mountinfo line."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5:
            found.append((fields[2], fields[4].replace("\\040", " ")))
    return found


class ProcOpeners:
    """The real Openers: /proc (root injectable) and Sysfs; `stat` is os.stat unless a test gives one."""

    def __init__(
        self,
        sysfs: Sysfs,
        proc_root: str | Path = "/proc",
        *,
        stat_fn: Callable[[str], os.stat_result] = os.stat,
    ) -> None:
        self.sysfs = sysfs
        self.proc = Path(proc_root)
        self._stat = stat_fn

    def _read(self, rel: str) -> str | None:
        try:
            return (self.proc / rel).read_text(errors="replace")
        except OSError:
            return None  # the process went away meanwhile, or is not ours to read

    def _comm_ppid(self, pid: int) -> tuple[str, int]:
        text = self._read(f"{pid}/stat")
        return parse_stat(text) if text else ("", 0)

    def _transient(self, pid: int) -> bool:
        """Whether `pid` is multipathd, or udev's or a program a udev rule runs (parent chain)."""
        comm, ppid = self._comm_ppid(pid)
        if comm in NOT_USERS:
            return True
        for _ in range(_ANCESTORS):
            if comm in UDEV:
                return True
            if ppid <= 1:
                return False
            comm, ppid = self._comm_ppid(ppid)
        return False

    def _pids(self) -> Iterable[int]:
        try:
            names = os.listdir(self.proc)
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def _fd_rdevs(self, pid: int) -> set[int]:
        """Device numbers of the block devices the process has open."""
        fd_dir = self.proc / str(pid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            return set()
        found = set()
        for fd in fds:
            try:
                st = self._stat(str(fd_dir / fd))
            except OSError:
                continue  # closed meanwhile, or a link that leads nowhere
            if stat.S_ISBLK(st.st_mode):
                found.add(st.st_rdev)
        return found

    def users(self, devs: Collection[str]) -> dict[str, list[str]]:
        numbers: dict[int, str] = {}
        for dev in devs:
            text = self.sysfs.read(f"block/{dev}/dev") or ""
            major, sep, minor = text.partition(":")
            if sep and major.isdigit() and minor.isdigit():
                numbers[os.makedev(int(major), int(minor))] = dev
        found: dict[str, list[str]] = {}
        if not numbers:
            return found
        for pid in self._pids():
            held = self._fd_rdevs(pid) & numbers.keys()
            if not held or self._transient(pid):
                continue
            comm, _ = self._comm_ppid(pid)
            for rdev in sorted(held):
                found.setdefault(numbers[rdev], []).append(f"process {pid} ({comm}) holds it open")
        by_text = {f"{os.major(n)}:{os.minor(n)}": dev for n, dev in numbers.items()}
        for number, mount_point in parse_mountinfo(self._read("self/mountinfo") or ""):
            if number in by_text:
                found.setdefault(by_text[number], []).append(f"mounted at {mount_point}")
        return found
