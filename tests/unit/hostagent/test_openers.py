"""ProcOpeners on a /proc and a /sys built under tmp_path: who holds a block device open (a process's
descriptor, found by device number; a mount), and who is no user (multipathd's path checker, udev's
workers and the programs its rules run)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hostagent.host.openers import ProcOpeners, parse_mountinfo, parse_stat
from hostagent.host.sysfs import Sysfs

DM0 = os.makedev(253, 0)
SDC = os.makedev(8, 32)


def _blk(rdev: int) -> os.stat_result:
    return os.stat_result((stat.S_IFBLK | 0o660, 0, 0, 0, 0, 0, 0, 0, 0, 0), {"st_rdev": rdev})


class Proc:
    """A /proc tree: processes with a parent and descriptors; `stat` answers for the descriptors."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.devices: dict[str, int] = {}  # "/proc/PID/fd/N" -> device number of a block device

    def process(self, pid: int, comm: str, ppid: int = 1, fds: dict[int, int] | None = None) -> None:
        d = self.root / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 1 0 0 0\n")
        for fd, rdev in (fds or {}).items():
            (d / "fd" / str(fd)).write_text("")
            self.devices[str(d / "fd" / str(fd))] = rdev

    def stat(self, path: str) -> os.stat_result:
        if path in self.devices:
            return _blk(self.devices[path])
        return os.stat(path)  # a regular file: a pipe, a log, not a block device


def _openers(tmp_path: Path) -> tuple[ProcOpeners, Proc]:
    sys_root = tmp_path / "sys"
    for dev, number in (("dm-0", "253:0"), ("sdc", "8:32"), ("sdd", "8:48")):
        (sys_root / "block" / dev).mkdir(parents=True)
        (sys_root / "block" / dev / "dev").write_text(number + "\n")
    proc = Proc(tmp_path / "proc")
    (proc.root / "self").mkdir(parents=True)
    (proc.root / "self/mountinfo").write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        "98 22 8:48 / /mnt/my\\040data rw,relatime - ext4 /dev/sdd rw\n"
    )
    return ProcOpeners(Sysfs(sys_root), proc.root, stat_fn=proc.stat), proc


def test_processes_holding_a_device_open_and_mounts_are_named(tmp_path: Path) -> None:
    openers, proc = _openers(tmp_path)
    proc.process(4242, "sleep", fds={0: 0, 3: DM0})
    proc.process(3141, "qemu-system-x86", fds={17: DM0, 18: SDC})
    proc.process(99, "bash", fds={1: 0})
    assert openers.users(["dm-0", "sdc", "sdd", "sdz"]) == {
        "dm-0": ["process 3141 (qemu-system-x86) holds it open", "process 4242 (sleep) holds it open"],
        "sdc": ["process 3141 (qemu-system-x86) holds it open"],
        "sdd": ["mounted at /mnt/my data"],
    }


def test_multipathd_and_udev_with_the_programs_its_rules_run_are_no_users(tmp_path: Path) -> None:
    openers, proc = _openers(tmp_path)
    proc.process(200, "multipathd", fds={5: SDC})  # its path checker's descriptor
    proc.process(300, "systemd-udevd")
    proc.process(301, "(udev-worker)", ppid=300, fds={9: DM0})  # the blkid builtin after a close
    proc.process(302, "kpartx", ppid=301, fds={3: DM0})  # a program a udev rule runs
    assert openers.users(["dm-0", "sdc"]) == {}


def test_parsers() -> None:
    assert parse_stat("1234 (qemu (x) y) S 77 1234 1234 0\n") == ("qemu (x) y", 77)
    assert parse_mountinfo("36 35 253:0 / /srv rw - xfs /dev/dm-0 rw\n") == [("253:0", "/srv")]
