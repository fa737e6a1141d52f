"""Starting and stopping the real host daemons the host tier needs: tgtd, libvirtd (+virtlogd), udevd.

Each `ensure_*` starts the daemon when it is not already running and returns a handle whose `stop()`
undoes exactly what was started. Waits are bounded and poll the daemon's own control socket.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

TGT_CONTROL_PORT = 7  # first control port tried: socket /var/run/tgtd/socket.N, never the system one (0)


class Missing(Exception):
    """A requirement of the host tier is missing; the message says which and how to get it."""


def _wait_for(what: str, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not ready():
        if time.monotonic() > deadline:
            raise Missing(f"{what} did not become ready within {timeout:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def _need(binary: str, package: str) -> str:
    places = (f"/usr/sbin/{binary}", f"/sbin/{binary}", f"/lib/systemd/{binary}")
    path = shutil.which(binary) or next((p for p in places if os.access(p, os.X_OK)), None)
    if path is None:
        raise Missing(f"{binary} not found: apt-get install {package} (scripts/test does this)")
    return path


def free_tgt_control_port(start: int = TGT_CONTROL_PORT) -> int:
    """A tgtd control port whose socket nobody holds, so parallel test runs never share a tgtd."""
    for n in range(start, start + 200):
        sock = Path(f"/var/run/tgtd/socket.{n}")
        if not sock.exists():
            return n
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(sock))
        except OSError:
            sock.unlink(missing_ok=True)  # stale socket of a dead tgtd
            return n
        finally:
            probe.close()
    raise Missing("no free tgtd control port")


def free_port(hosts: tuple[str, ...]) -> int:
    """A TCP port free on every one of `hosts` (loopback addresses) at the time of the call."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        try:
            for h in hosts[1:]:
                with socket.socket() as t:
                    t.bind((h, port))
        except OSError:
            continue
        return port
    raise Missing("no TCP port free on all of " + ", ".join(hosts))


def need_root() -> None:
    if os.geteuid() != 0:
        raise Missing("needs root (tgtd, libvirtd, udevd and loop devices)")


@dataclass
class Tgtd:
    """A tgtd instance of our own, on the portals given."""

    portals: tuple[str, ...]
    control_port: int = TGT_CONTROL_PORT
    proc: subprocess.Popen[bytes] | None = None
    tgtadm: str = "tgtadm"
    log: IO[bytes] | None = None

    def adm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.tgtadm, "-C", str(self.control_port), "--lld", "iscsi", *args],
            check=check,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def start(self) -> None:
        tgtd = _need("tgtd", "tgt")
        self.tgtadm = _need("tgtadm", "tgt")
        Path("/var/run/tgtd").mkdir(parents=True, exist_ok=True)
        first, *rest = self.portals
        # tgtd logs a few lines per LUN on stderr: a file, never a pipe nobody reads (once the pipe's
        # 64 KiB are full, tgtd blocks in write(2) and stops answering tgtadm and initiators).
        log = self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [tgtd, "-f", "-C", str(self.control_port), "--iscsi", f"portal={first}"],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                log.seek(0)
                err = log.read().decode(errors="replace")
                raise Missing(f"tgtd exited with {self.proc.returncode}: {err.strip()[:300]}")
            return self.adm("--op", "show", "--mode", "target", check=False).returncode == 0

        _wait_for("tgtd", ready, 10)
        for portal in rest:
            self._add_portal(portal)

    def _add_portal(self, portal: str) -> None:
        """Adds a listening portal. Right after a restart tgtd may refuse it for a moment (exit 22 was
        seen once: the old process's listener not yet gone), so it is retried until a deadline, and the
        last refusal is reported with tgtadm's own words."""
        last: list[str] = []

        def added() -> bool:
            r = self.adm("--op", "new", "--mode", "portal", "--param", f"portal={portal}", check=False)
            if r.returncode == 0:
                return True
            shown = self.adm("--op", "show", "--mode", "portal", check=False).stdout
            if f"Portal: {portal}," in shown:
                return True  # an earlier refused attempt took effect after all
            last[:] = [f"exit {r.returncode}: {r.stderr.strip()}"]
            return False

        try:
            _wait_for(f"tgtd portal {portal}", added, 10)
        except Missing as exc:
            raise Missing(f"{exc}; tgtadm said {last[0] if last else '-'}") from exc

    def stop(self) -> None:
        """tgtd ignores SIGTERM: take it offline and delete the system, then reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        subprocess.run(
            [
                self.tgtadm,
                "-C",
                str(self.control_port),
                "--op",
                "update",
                "--mode",
                "sys",
                "--name",
                "State",
                "-v",
                "offline",
            ],
            capture_output=True,
            timeout=10,
            check=False,
        )
        subprocess.run(
            [self.tgtadm, "-C", str(self.control_port), "--op", "delete", "--mode", "system"],
            capture_output=True,
            timeout=10,
            check=False,
        )
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        finally:
            if self.log is not None:
                self.log.close()
                self.log = None

    def restart(self) -> None:
        """Stop and start again: the new tgtd has forgotten every target (what a crash does)."""
        self.stop()
        self.start()


@dataclass
class Started:
    """Daemons this process started, to be stopped in reverse order."""

    stops: list[Callable[[], None]] = field(default_factory=list)

    def stop(self) -> None:
        while self.stops:
            self.stops.pop()()


def _pid_of(pidfile: str) -> int:
    try:
        return int(Path(pidfile).read_text().strip())
    except (OSError, ValueError):
        return 0


def _pid_alive(pidfile: str) -> bool:
    try:
        pid = int(Path(pidfile).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def ensure_libvirtd(started: Started) -> None:
    """Starts virtlogd and libvirtd (no systemd here) unless running; waits until virsh answers."""
    libvirtd = _need("libvirtd", "libvirt-daemon-system")
    virtlogd = _need("virtlogd", "libvirt-daemon-system")
    _need("qemu-system-x86_64", "qemu-system-x86")
    virsh = _need("virsh", "libvirt-clients")

    def answers() -> bool:
        # a libvirtd still starting (under the guest's TCG on a loaded machine) may not answer within a
        # call's 30 s: not ready yet, asked again until the wait's deadline
        try:
            return (
                subprocess.run(
                    [virsh, "-c", "qemu:///system", "version"], capture_output=True, timeout=30, check=False
                ).returncode
                == 0
            )
        except subprocess.TimeoutExpired:
            return False

    if answers():
        return
    if not _pid_alive("/run/virtlogd.pid"):
        subprocess.run([virtlogd, "-d"], check=True, timeout=30)
    if not _pid_alive("/run/libvirtd.pid"):
        subprocess.run([libvirtd, "-d"], check=True, timeout=30)
        _wait_for("libvirtd", answers, 60)
        ours = _pid_of("/run/libvirtd.pid")

        def stop_libvirtd() -> None:
            # Only the libvirtd this session started, by the pid it had then: one that another run
            # restarted meanwhile (the pid file names another process) is that run's to stop.
            if ours and _pid_of("/run/libvirtd.pid") == ours:
                with contextlib.suppress(OSError):
                    os.kill(ours, signal.SIGTERM)

        started.stops.append(stop_libvirtd)
        return
    _wait_for("libvirtd", answers, 120)


def ensure_udevd(started: Started) -> None:
    """Starts systemd-udevd unless running."""
    udevd = _need("systemd-udevd", "udev")
    adm = _need("udevadm", "udev")
    if subprocess.run(["pgrep", "-x", "systemd-udevd"], capture_output=True, check=False).returncode == 0:
        return
    subprocess.run([udevd, "--daemon"], check=True, timeout=30)
    started.stops.append(lambda: subprocess.run([adm, "control", "--exit"], check=False, timeout=30))
    _wait_for(
        "udevd",
        lambda: (
            subprocess.run(
                [adm, "control", "--ping"], capture_output=True, check=False, timeout=10
            ).returncode
            == 0
        ),
        20,
    )
