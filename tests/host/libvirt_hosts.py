"""Two (or more) libvirt hosts on one machine, for live migration: each a system-mode libvirtd (and its
virtlogd) in a private mount namespace, /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt
and /var/log/libvirt bind-mounted from the host's own directory, with a distinct host UUID and
migration port range (LAB.md "Two libvirt hosts": the measured recipe and its pitfalls). Started and
stopped by the test, by pid; the machine's own libvirtd is never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from tests.host.daemons import Missing
from tests.rig import wait_until

_BIND = (
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
    ("etc", "/etc/libvirt"),
)


@dataclass
class LibvirtHost:
    """One private libvirtd. `uri` reaches it from outside its namespace (its socket is in `root`/run)."""

    root: Path
    host_uuid: str
    migration_ports: tuple[int, int]
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def socket(self) -> Path:
        return self.root / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    def _pid(self, name: str) -> int | None:
        try:
            return int((self.root / "run" / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def start(self, timeout: float = 60) -> None:
        for binary in ("libvirtd", "virtlogd", "unshare"):
            if shutil.which(binary) is None:
                raise Missing(f"{binary} is not installed (apt-get install libvirt-daemon-system util-linux)")
        if len(str(self.socket)) >= 100:
            raise Missing(f"{self.socket} is too long for a unix socket; use a shorter work directory")
        for sub, _ in _BIND:
            if sub != "etc":
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc"
        if not etc.exists():
            shutil.copytree("/etc/libvirt", etc, symlinks=True)
            for p in (etc / "qemu").glob("*.xml"):
                p.unlink()  # no copied domains
            for p in (etc / "qemu" / "networks" / "autostart").glob("*.xml"):
                p.unlink()
            shutil.rmtree(etc / "storage", ignore_errors=True)
            shutil.rmtree(etc / "secrets", ignore_errors=True)
            with (etc / "libvirtd.conf").open("a") as f:
                f.write(f'\nhost_uuid = "{self.host_uuid}"\n')
            low, high = self.migration_ports
            with (etc / "qemu.conf").open("a") as f:
                f.write(
                    f"\nmigration_port_min = {low}\nmigration_port_max = {high}\ncgroup_controllers = [ ]\n"
                )
            cache = Path("/var/cache/libvirt/qemu")
            if cache.is_dir():  # QEMU's capabilities, so that libvirtd starts in well under a second
                shutil.copytree(cache, self.root / "cache" / "qemu", dirs_exist_ok=True)
        mounts = "; ".join(f"mount --bind {self.root / sub} {target}" for sub, target in _BIND)
        script = (
            f"set -e; {mounts}; virtlogd -d -p /run/libvirt/virtlogd.pid; "
            "exec libvirtd -p /run/libvirt/libvirtd.pid"
        )
        log = (self.root / "libvirtd.out").open("ab")
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "bash", "-c", script],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                out = (self.root / "libvirtd.out").read_text(errors="replace")[-2000:]
                raise AssertionError(f"libvirtd of {self.root} exited with {self.proc.returncode}: {out}")
            if not self.socket.exists():
                return False
            try:
                libvirt.open(self.uri).close()
            except libvirt.libvirtError:
                return False
            return True

        wait_until(f"libvirtd at {self.socket}", answers, timeout, 0.1)

    def open(self) -> libvirt.virConnect:
        return libvirt.open(self.uri)

    def stop(self) -> None:
        """Destroys the domains it runs, then stops libvirtd and virtlogd by their pids."""
        with contextlib.suppress(libvirt.libvirtError):
            conn = self.open()
            for dom in conn.listAllDomains(0):
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefine()
            conn.close()
        for name in ("libvirtd", "virtlogd"):
            pid = self._pid(name)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            self.proc = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (our own child not yet reaped) counts as gone
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


def two_hosts(root: Path) -> tuple[LibvirtHost, LibvirtHost]:
    """Host A and host B under `root` (not started)."""
    return (
        LibvirtHost(root / "A", "11111111-1111-4111-8111-111111111111", (49500, 49509)),
        LibvirtHost(root / "B", "22222222-2222-4222-8222-222222222222", (49510, 49519)),
    )
