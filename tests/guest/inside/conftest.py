"""Fixtures for tests that run inside the guest (BLOCKWIRE_IN_GUEST=1), as root on a real kernel.

Running when a test starts (tests/guest/test-init.sh): systemd-udevd, dbus, iscsid, multipathd
(/etc/multipath.conf: user_friendly_names yes, find_multipaths no), virtlogd, libvirtd (may still be
starting: use the `libvirtd` fixture). Not running: tgtd, which the `tgtd` fixture starts.
Helpers: tests/guest/inside/kernel.py.

Kernels: the image has two (tests/guest/image.py KERNELS) and each boot runs only the tests of the kernel
it booted (BLOCKWIRE_GUEST_KERNEL, from test-init.sh): a test marked
`@pytest.mark.guest_kernel("backports")` runs only on the bookworm-backports 6.12 boot, every other test
only on the default 6.1 boot. The others are deselected (not skipped), so no test is counted on both
boots; the summary names what was deselected and why.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from blockwire.client import HostAgentClient, StorageClient
from tests.ceph import CephCluster, CephMissing
from tests.guest.inside import kernel, nvmet
from tests.host.daemons import Missing, Started, Tgtd, ensure_libvirtd
from tests.rig import Daemon, domain_xml

_tids = itertools.count(1)

GUEST_KERNEL = os.environ.get("BLOCKWIRE_GUEST_KERNEL", "default")
_OTHER_KERNEL = pytest.StashKey[list[str]]()


def kernel_of(item: pytest.Item) -> str:
    """The guest kernel a test runs on: its `guest_kernel` marker's name, else "default"."""
    marker = item.get_closest_marker("guest_kernel")
    return str(marker.args[0]) if marker and marker.args else "default"


def split_by_kernel(items: Sequence[pytest.Item], kernel: str) -> tuple[list[pytest.Item], list[pytest.Item]]:
    """(the tests that run on `kernel`'s boot, the others)."""
    return [i for i in items if kernel_of(i) == kernel], [i for i in items if kernel_of(i) != kernel]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keeps the tests of the kernel this boot runs (GUEST_KERNEL); deselects the others."""
    keep, other = split_by_kernel(items, GUEST_KERNEL)
    if other:
        config.hook.pytest_deselected(items=other)
        items[:] = keep
    config.stash[_OTHER_KERNEL] = [f"{item.nodeid} (kernel {kernel_of(item)})" for item in other]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    other = config.stash.get(_OTHER_KERNEL, [])
    if not other:
        return
    terminalreporter.write_sep("-", f"not on this boot (kernel {GUEST_KERNEL}, {os.uname().release})")
    terminalreporter.write_line(f"{len(other)} tests deselected: each runs on the boot of its own kernel")
    if len(other) <= 10:
        for nodeid in other:
            terminalreporter.write_line(f"deselected: {nodeid}")


@pytest.fixture(scope="session")
def tgtd() -> Iterator[Tgtd]:
    """Our tgtd on both loopback portals (kernel.PORTALS); control socket /var/run/tgtd/socket.7."""
    daemon = Tgtd(portals=kernel.PORTALS)
    try:
        daemon.start()
    except Missing as exc:
        daemon.stop()
        pytest.fail(f"tgtd does not start in the guest: {exc}", pytrace=False)
    yield daemon
    daemon.stop()


def new_tid() -> int:
    """A target id not used before in this run (targets of earlier tests may still be being deleted)."""
    return next(_tids)


@pytest.fixture
def lun(clean_host: None, tgtd: Tgtd, tmp_path: Path) -> Iterator[kernel.Lun]:
    """A 64 MiB LUN on both portals, with its own announced identity (scsi_id, scsi_sn; `lun.naa` is what
    the kernel reads). Uses
    `clean_host`: the test fails if it leaves sessions, node records, disks, maps or links behind."""
    tid = new_tid()
    made = kernel.make_target(
        tgtd,
        tid,
        f"iqn.2024-01.test.blockwire:lun{tid}",
        tmp_path / f"lun{tid}.img",
        scsi_id=f"b10c{tid:020x}",  # 24 hex digits: the kernel reads them unchanged (kernel.tgt_naa)
        scsi_sn=f"BWSN{tid:04d}",
    )
    yield made
    kernel.delete_target(tgtd, tid)


@pytest.fixture
def clean_host() -> Iterator[None]:
    """Asserts the host has no iSCSI/SCSI/multipath state before and after the test (cleans up after a
    failure so the next test starts clean)."""
    kernel.assert_nothing_left()
    yield
    left = kernel.leftovers()
    if left:
        kernel.force_cleanup()
        pytest.fail(f"the test left behind: {left}", pytrace=False)


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    """A throwaway Ceph cluster (tests/ceph.py: mon + one 512 MiB MemStore OSD on loopback) with rbd.ko
    loaded, shared by the session's RBD tests: under TCG it takes minutes to start."""
    kernel.run(["modprobe", "rbd"])
    try:
        c = CephCluster(osds=1, objectstore="memstore", osd_bytes=512 * kernel.MiB, start_timeout=300).start()
    except CephMissing as exc:
        pytest.fail(f"no Ceph cluster in the guest: {exc}", pytrace=False)
    yield c
    c.stop()


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[None]:
    """libvirtd answering on qemu:///system (test-init starts it in the background)."""
    started = Started()
    try:
        ensure_libvirtd(started)
    except Missing as exc:
        pytest.fail(f"libvirtd is not available in the guest: {exc}", pytrace=False)
    yield
    started.stop()


# --- blockwire's own daemons, end to end (tests/guest/inside/test_e2e_*.py) -------------------------

# How the daemons run under TCG: python + grpc imports take seconds (a hung start fails at 120 s);
# SIGTERM drains, and stop() fails the test unless it ended the daemon with 0 within 60 s.
GUEST_DAEMON: dict[str, Any] = {"start_timeout": 120.0, "stop_timeout": 60.0, "clean_exit": True}


@dataclass
class Stack:
    """blockwire-storage and blockwire-agent (iscsi_mode = "kernel"), and SDK clients of both."""

    workdir: Path
    prefix: str  # the storage service's iqn_prefix: its targets are "<prefix>:<volume id>"
    storage_daemon: Daemon
    agent_daemon: Daemon
    storage: StorageClient = field(init=False)
    agent: HostAgentClient = field(init=False)

    def __post_init__(self) -> None:
        self.storage = StorageClient(f"unix://{self.storage_daemon.socket}")
        self.agent = HostAgentClient(f"unix://{self.agent_daemon.socket}")

    def volume_file(self, volume_id: str) -> Path:
        """The `file` backend's file of a volume (tgt_stack)."""
        return self.workdir / "backend" / "volumes" / f"{volume_id}.raw"

    def restart_agent(self) -> None:
        """Stop and start the agent (it reconciles its journal against the host on start)."""
        self.agent.close()
        self.agent_daemon.stop()
        self.agent_daemon.start()
        self.agent = HostAgentClient(f"unix://{self.agent_daemon.socket}")

    def stop(self) -> None:
        self.agent.close()
        self.storage.close()
        try:
            self.agent_daemon.stop()
        finally:
            self.storage_daemon.stop()
            for daemon in (self.agent_daemon, self.storage_daemon):
                kernel.keep_log(daemon.log, f"{self.workdir.name}-{daemon.name}.log")


def start_stack(workdir: Path, storage_sections: str) -> Stack:
    """Writes both daemons' configs into `workdir` and starts them. `storage_sections`: the storage
    service's [[backends]] and [exporters.*] tables."""
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = f"iqn.2026-01.io.blockwire.e{uuid.uuid4().hex[:8]}"
    storage_toml = workdir / "storage.toml"
    storage_toml.write_text(
        f'[server]\nunix_socket = "{workdir}/storage.sock"\nlog_format = "kv"\nlog_level = "DEBUG"\n'
        f'[service]\ncatalog_path = "{workdir}/catalog.db"\niqn_prefix = "{prefix}"\n{storage_sections}'
    )
    agent_toml = workdir / "agent.toml"
    agent_toml.write_text(
        f'state_dir = "{workdir}/agent-state"\nstorage_address = "unix://{workdir}/storage.sock"\n'
        f'iscsi_mode = "kernel"\nlisten_unix = "{workdir}/agent.sock"\nlog_level = "DEBUG"\n'
        # TCG: logins take 0.5 s, udev settles in 2-4 s; eight parallel attaches need headroom.
        "device_timeout = 90.0\ndetach_timeout = 60.0\nlogin_timeout = 60.0\n"
    )
    storage = Daemon.storage(storage_toml, workdir / "storage.sock", **GUEST_DAEMON)
    agent = Daemon.agent(agent_toml, workdir / "agent.sock", **GUEST_DAEMON)
    storage.start()
    try:
        agent.start()
    except BaseException:
        storage.stop()
        kernel.keep_log(storage.log, f"{workdir.name}-blockwire-storage.log")
        kernel.keep_log(agent.log, f"{workdir.name}-blockwire-agent.log")
        raise
    return Stack(workdir, prefix, storage, agent)


def tgt_sections(workdir: Path, tgtd: Tgtd, service: str = "") -> str:
    """Storage's config for the `file` backend exported by the `tgt` exporter (our tgtd, both portals);
    `service`: more keys of its [service] table."""
    portals = ", ".join(f'"{p}"' for p in kernel.PORTALS)
    return (
        service
        + f'[[backends]]\nname = "file"\nkind = "file"\npath = "{workdir}/backend"\nexporter = "tgt"\n'
        + f'[exporters.tgt]\nkind = "tgt"\nportals = [{portals}]\ncontrol_port = {tgtd.control_port}\n'
    )


@pytest.fixture(scope="session")
def tgt_stack(tgtd: Tgtd, libvirtd: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The daemons with the `file` backend exported by the `tgt` exporter (our tgtd, both portals)."""
    workdir = tmp_path_factory.mktemp("stack-tgt")
    stack = start_stack(workdir, tgt_sections(workdir, tgtd))
    yield stack
    stack.stop()


@contextlib.contextmanager
def running_domain(prefix: str) -> Iterator[str]:
    """A running no-OS `type='qemu'` domain (TCG: the guest has no KVM) with two virtio-scsi controllers
    (bus='scsi' disks unplug without a guest OS; libvirt addresses 7 disks per controller by target name,
    sda-sdg on the first, and would otherwise hot-plug a new controller on the PCI bus for sdh), on the
    'pc' machine with ACPI. Destroyed and undefined afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    xml = Path(f"/tmp/{name}.xml")
    xml.write_text(
        domain_xml(name, virt_type="qemu", machine="pc", memory_mib=32, scsi_controllers=2, acpi=True)
    )
    kernel.virsh("define", str(xml))
    xml.unlink()
    try:
        kernel.virsh("start", name, timeout=120)
        yield name
    finally:
        kernel.virsh("destroy", name, ok=(0, 1))
        kernel.virsh("undefine", name, ok=(0, 1))


@pytest.fixture
def domain(libvirtd: None) -> Iterator[str]:
    """A running no-OS domain for one test (`running_domain`)."""
    with running_domain("bw-e2e") as name:
        yield name


def two_paths_scenario(
    s: Stack, domain: str, *, backend: str, backing: Callable[[str], Path], portals: Sequence[str]
) -> tuple[str, dict[str, float]]:
    """AttachVolume of a new volume over two portals -> checks on the host (sessions, map, WWN) and in
    the domain (live XML) -> data through the map is in `backing(volume_id)` -> one session killed
    (`iscsiadm -m session -r SID -u`), I/O goes on -> the agent restarted: its reconcile logs the path
    in again -> DetachVolume -> nothing left on the host -> DeleteVolume. Returns the target IQN and
    the time of each step."""
    steps = kernel.Steps()
    took, timings = steps.took, steps.timings

    vol = s.storage.create_volume(f"e2e-mp-{uuid.uuid4().hex[:6]}", 64 * kernel.MiB, backend=backend)
    vol = s.storage.wait_volume(vol.id, timeout=120)
    attached = False
    try:
        att = s.agent.attach_volume(domain, volume_id=vol.id)
        attached = True
        took("attach")
        ci = att.connection_info
        iqn = ci.iscsi.paths[0].target_iqn
        assert sorted(p.portal for p in ci.iscsi.paths) == sorted(portals)
        wwid = f"3{ci.wwn}"

        # The host: a session per portal, a map over two active paths, each with the announced WWN.
        assert sorted(kernel.session_ids(iqn)) == sorted(portals)
        name = kernel.map_for(wwid)
        assert name, f"no multipath map for {wwid}: {kernel.maps()}"
        kernel.wait_until("two active paths", lambda: len(kernel.active_paths(wwid)) == 2)
        for dev in kernel.active_paths(wwid):
            assert kernel.sysfs_wwid(dev) == f"naa.{ci.wwn}"
        assert att.host_device == f"/dev/{kernel.dm_device(name)}"

        # The domain: the map, hot-plugged on the SCSI bus.
        disk = next(d for d in kernel.domain_disks(domain) if d.target == att.target_dev)
        assert (disk.bus, disk.source) == ("scsi", att.host_device)

        # Data written through the map is in the volume's backing store.
        pattern = kernel.write_pattern(att.host_device, 5)
        assert kernel.read_at(backing(vol.id), 5) == pattern
        took("checks + I/O")

        # One path lost: its session killed. The map keeps the other path and I/O goes on.
        lost = portals[1]
        sid = kernel.session_ids(iqn)[lost]
        kernel.run(["iscsiadm", "-m", "session", "-r", str(sid), "-u"], timeout=120)
        kernel.wait_until("the map down to one active path", lambda: len(kernel.active_paths(wwid)) == 1, 60)
        assert not kernel.by_path_link(lost, iqn, ci.iscsi.paths[0].lun).exists()
        pattern = kernel.write_pattern(att.host_device, 9)
        assert kernel.read_at(backing(vol.id), 9) == pattern
        assert kernel.read_at(att.host_device, 5) == kernel.read_at(backing(vol.id), 5)
        took("path lost, I/O")

        # The path comes back: the restarted agent finds the attachment with one of its two paths and
        # logs in again (reconcile); multipath takes the new disk into the same map.
        s.restart_agent()
        kernel.wait_until("two active paths again", lambda: len(kernel.active_paths(wwid)) == 2, 90)
        assert sorted(kernel.session_ids(iqn)) == sorted(portals)
        assert kernel.map_for(wwid) == name
        pattern = kernel.write_pattern(att.host_device, 13)
        assert kernel.read_at(backing(vol.id), 13) == pattern
        took("path back (agent restart)")

        s.agent.detach_volume(domain, vol.id)
        attached = False
        took("detach")
        assert not [d for d in kernel.domain_disks(domain) if d.target == att.target_dev]
        kernel.settle()
        assert kernel.leftovers() == {}
    finally:
        if attached:
            s.agent.detach_volume(domain, vol.id, force=True)
        s.storage.delete_volume(vol.id)
    assert vol.id not in {v.id for v in s.storage.list_volumes()}
    took("delete")
    return iqn, timings


@pytest.fixture
def clean_nvme() -> Iterator[None]:
    """No NVMe-oF state on the host before and after the test."""
    kernel.settle()
    assert nvmet.host_leftovers() == {}
    yield
    kernel.settle()
    left = nvmet.host_leftovers()
    if left:
        nvmet.disconnect_all()
        pytest.fail(f"the test left behind: {left}", pytrace=False)
