"""What every tier's rigs share (STYLE.md rule 15): blockwire's daemons as subprocesses, their gRPC
health, one bounded wait, and the XML of the no-OS test domain.

Imported by tests/host, by tests/guest/inside (in the guest, from the shared checkout) and by bench/.
Needs grpc, grpc_health and lxml; never libvirt (the guest drives its domains with virsh).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lxml import etree
from lxml.builder import E

from blockwire.runtime.failpoints import ENV as FAILPOINTS_ENV

ROOT = Path(__file__).resolve().parents[1]
KILLED = -signal.SIGKILL  # Popen's return code of a process killed by SIGKILL (kill -9, a failpoint's kill)
STORAGE = "storagesvc.rpc.server"
AGENT = "hostagent.rpc.server"
EMULATOR = "/usr/bin/qemu-system-x86_64"

T = TypeVar("T")


def wait_until(what: str, ready: Callable[[], T | None], timeout: float = 60, every: float = 0.1) -> T:
    """Polls `ready` until it returns something truthy, and returns that; AssertionError when `timeout`
    seconds have passed. Polls at once, then every 10 ms, doubling up to `every` seconds."""
    deadline = time.monotonic() + timeout
    delay = min(0.01, every)
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(delay)
        delay = min(delay * 2, every)


def healthy(address: str, service: str = "", timeout: float = 2) -> bool:
    """Whether the gRPC server at `address` answers SERVING for `service` ("": the server as a whole)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass
class Daemon:
    """One of blockwire's daemons as a subprocess, `python -m MODULE --config CONFIG` in the checkout,
    serving on the unix socket `socket` (which CONFIG names). stdout and stderr go to CONFIG's `.log`,
    appended, a header line per start. It can be started again after a stop or a kill."""

    name: str  # "blockwire-storage": in messages and in the log's header lines
    module: str  # STORAGE or AGENT
    config: Path
    socket: Path
    start_timeout: float = 60.0  # until health says SERVING (under the guest's TCG: 120)
    stop_timeout: float = 20.0  # from SIGTERM to exit; then SIGKILL
    # stop() asserts that SIGTERM ended the daemon with exit code 0 (a daemon that had already exited,
    # a failpoint killed it, is not checked)
    clean_exit: bool = False
    health_service: str = ""  # the health check's service name ("": the server as a whole)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    started_in: float = field(default=0.0, init=False)  # seconds from spawn to SERVING, last start
    _channel: grpc.Channel | None = field(default=None, init=False, repr=False)

    @classmethod
    def storage(cls, config: Path, socket: Path, **kw: Any) -> Daemon:
        """blockwire-storage (keyword arguments: the fields after `socket`)."""
        return cls("blockwire-storage", STORAGE, config, socket, **kw)

    @classmethod
    def agent(cls, config: Path, socket: Path, **kw: Any) -> Daemon:
        """blockwire-agent (keyword arguments: the fields after `socket`)."""
        return cls("blockwire-agent", AGENT, config, socket, **kw)

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log(self) -> Path:
        return self.config.with_suffix(".log")

    @property
    def channel(self) -> grpc.Channel:
        """A channel to the daemon of this start (closed by stop and kill)."""
        if self._channel is None:
            raise AssertionError(f"{self.name} is not started")
        return self._channel

    def start(self, failpoints: str = "") -> Daemon:
        """Spawns the daemon and waits until it serves; kills it when it does not within start_timeout.
        `failpoints` ("agent.attach.after_hotplug=kill") arms blockwire.runtime.failpoints for this run
        only (the variable is never inherited)."""
        env = {k: v for k, v in os.environ.items() if k != FAILPOINTS_ENV}
        if failpoints:
            env[FAILPOINTS_ENV] = failpoints
        with self.log.open("ab") as out:
            out.write(f"\n===== start {self.name} failpoints={failpoints!r} =====\n".encode())
            out.flush()
            proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )
        self.proc = proc
        began = time.monotonic()

        def serving() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {proc.returncode}:\n{self.tail()}")
            return healthy(self.address, self.health_service)

        try:
            wait_until(f"{self.name} SERVING", serving, self.start_timeout, 0.2)
        except BaseException:
            self.kill()
            raise
        self.started_in = time.monotonic() - began
        print(f"{self.name} serving after {self.started_in:.1f}s")
        self._channel = grpc.insecure_channel(self.address)
        return self

    def stop(self) -> int | None:
        """SIGTERM, and SIGKILL when it has not exited after stop_timeout; its exit code (None: never
        started). See `clean_exit`."""
        self._close()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.terminate()
        try:
            rc = proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            if self.clean_exit:
                message = f"{self.name} ignored SIGTERM for {self.stop_timeout:g}s; killed"
                raise AssertionError(message) from None
            return proc.returncode
        if self.clean_exit:
            assert rc == 0, f"{self.name} exited with {rc}:\n{self.tail()}"
        return rc

    def kill(self) -> None:
        """kill -9 (when it runs) and reap it."""
        self._close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def died(self, timeout: float = 30) -> int:
        """Waits for the process to end by itself (a failpoint killed it); its return code."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def _close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    # -- probes

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def tail(self, chars: int = 4000) -> str:
        """The end of the log."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def domain_xml(
    name: str,
    *,
    virt_type: str = "kvm",
    machine: str = "q35",
    memory_mib: int = 64,
    scsi_controllers: int = 1,
    pci_root_ports: int = 0,
    acpi: bool = False,
) -> str:
    """A no-OS x86_64 test domain: one vCPU, `scsi_controllers` virtio-scsi controllers (a bus='scsi'
    disk unplugs without a guest OS; libvirt puts seven disks on a controller by target name), and with
    `pci_root_ports` (q35 only) a pcie-root with that many free root ports, so that a virtio (PCI) disk
    can be hot-plugged (and, with no guest OS, is never acknowledged unplugged). `virt_type` is 'kvm' on
    the host, 'qemu' (TCG) in the guest, which has no KVM."""
    if pci_root_ports and machine != "q35":
        raise ValueError("PCIe root ports need machine='q35'")
    devices = E.devices(E.emulator(EMULATOR))
    for i in range(scsi_controllers):
        devices.append(E.controller(type="scsi", index=str(i), model="virtio-scsi"))
    if pci_root_ports:
        devices.append(E.controller(type="pci", index="0", model="pcie-root"))
        for i in range(1, pci_root_ports + 1):
            devices.append(E.controller(type="pci", index=str(i), model="pcie-root-port"))
    domain = E.domain(
        E.name(name),
        E.memory(str(memory_mib), unit="MiB"),
        E.vcpu("1"),
        E.os(E.type("hvm", arch="x86_64", machine=machine)),
        type=virt_type,
    )
    if acpi:
        domain.append(E.features(E.acpi()))
    domain.append(devices)
    return etree.tostring(domain, encoding="unicode", pretty_print=True)


def hmp_qemu_io(domain: str, target_dev: str, command: str, timeout: float = 60) -> str:
    """Runs a qemu-io command on the domain's disk (HMP, on the disk's qdev); the lines QEMU logged.

    QEMU 7.2's qemu-io prints to QEMU's stdout, which reaches the domain's log through virtlogd some time
    after the monitor command returned, while libvirt's own lines (the first HMP command's "tainted:
    custom-monitor") may arrive first: waits, bounded, for a line that is not libvirt's."""
    xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", domain], capture_output=True,
                         text=True, check=True, timeout=30).stdout  # fmt: skip
    alias = xml.split(f"<target dev='{target_dev}'")[1].split("<alias name='")[1].split("'")[0]
    log = Path(f"/var/log/libvirt/qemu/{domain}.log")
    size = log.stat().st_size
    reply = subprocess.run(
        ["virsh", "-c", "qemu:///system", "qemu-monitor-command", domain, "--hmp",
         f'qemu-io -d {alias} "{command}"'],
        capture_output=True, text=True, timeout=timeout, check=True,
    ).stdout  # fmt: skip

    def logged() -> str:
        with open(log, "rb") as f:
            f.seek(size)
            return f.read().decode(errors="replace")

    def from_qemu_io(text: str) -> bool:
        return any(line and not _LIBVIRT_LOG_LINE.match(line) for line in text.splitlines())

    deadline = time.monotonic() + 10
    text = logged()
    while not from_qemu_io(reply + text) and time.monotonic() < deadline:
        time.sleep(0.05)
        text = logged()
    return reply + text


# libvirt's own lines in a domain log start with a timestamp: "2026-11-30 10:05:24.799+0000: ..."
_LIBVIRT_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+\+\d{4}: ")
