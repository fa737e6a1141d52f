"""Host tier, real daemons: faults around the agent and the storage service.

* tgtd restarts while a volume is attached (QEMU-native iSCSI): blockwire-storage, not restarted, has
  the export back within a few export checks (same target, ACL, CHAP account, LUN identity), counted
  as "export_repair"; QEMU's iSCSI driver reconnects and reads again, detach works;
* libvirtd restarts while the agent runs: the agent's connection recovers, a disk attached before the
  restart detaches, a new attach works;
* a udev event consumed before the agent starts waiting (real loop device, settled): found at once;
* the file backend's filesystem fills up (a 32 MiB tmpfs): RESOURCE_EXHAUSTED, no file, no catalog row.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import libvirt
import pytest

from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import types_pb2 as pb
from tests.fakes.daemon_rig import (
    MIB,
    Rig,
    define_domain,
    force_cleanup,
    loop_device,
    remove_domain,
)
from tests.host.daemons import Started, Tgtd
from tests.rig import hmp_qemu_io, wait_until


@pytest.fixture
def virt(host_daemons: Started) -> Iterator[libvirt.virConnect]:
    """Per test: the libvirtd restart test kills the connections of its time."""
    conn = libvirt.open("qemu:///system")
    yield conn
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


@pytest.fixture
def rig(tmp_path: Path, tgtd: Tgtd, virt: libvirt.virConnect) -> Iterator[Rig]:
    with Rig(work=tmp_path, tgtd=tgtd, virt=virt).running() as r:
        yield r


@pytest.fixture
def domain(rig: Rig) -> Iterator[str]:
    name = define_domain(rig.lv(), "bw-fault")
    try:
        yield name
    finally:
        force_cleanup(rig, name)
        remove_domain(rig.lv(), name)


def qemu_read(domain: str, target_dev: str) -> str:
    """QEMU reads 64 KiB of the disk through its block layer: the lines qemu-io logged."""
    return hmp_qemu_io(domain, target_dev, "read 0 64k")


def _lun_identity(rig: Rig, iqn: str) -> list[str]:
    """The SCSI ID and serial tgtd reports for LUN 1 (the volume) of target `iqn`."""
    out = rig.tgtd.adm("--op", "show", "--mode", "target").stdout
    target = out.split(f": {iqn}\n", 1)[1].split("\nTarget ", 1)[0] if f": {iqn}\n" in out else ""
    lun = target.split("LUN: 1\n", 1)[1].split("LUN: ", 1)[0] if "LUN: 1\n" in target else ""
    return [line.strip() for line in lun.splitlines() if line.strip().startswith(("SCSI ID:", "SCSI SN:"))]


def _export_repairs(rig: Rig) -> int:
    ops = rig.storage.GetBackendStats(spb.GetBackendStatsRequest(), timeout=10).operations
    return sum(o.count for o in ops if o.operation == "export_repair")


def test_tgtd_restart_storage_reexports_without_a_restart_and_qemu_reconnects(rig: Rig, domain: str) -> None:
    v = rig.create_volume()
    try:
        a = rig.attach(domain, v.id)
        assert "read 65536/65536 bytes" in qemu_read(domain, a.target_dev)
        before = rig.targets()
        (iqn,) = before
        identity = _lun_identity(rig, iqn)
        assert any(v.wwn in line for line in identity), identity
        accounts = rig.accounts()
        assert rig.storage_proc is not None
        pid = rig.storage_proc.proc.pid
        assert _export_repairs(rig) == 0
        rig.tgtd.restart()  # a crash of tgtd: every target is forgotten; storage is not restarted
        # The export supervisor (export_check_interval 2 s) has it back within a few checks.
        wait_until("the export is back", lambda: rig.targets() == before, 20)
        assert _lun_identity(rig, iqn) == identity
        assert rig.accounts() == accounts
        assert rig.storage_proc.proc.pid == pid
        assert rig.storage_proc.proc.poll() is None
        assert _export_repairs(rig) >= 1
        # QEMU's iSCSI driver reconnects (same portal, IQN, CHAP) and reads again
        wait_until(
            "QEMU reads after the reconnect",
            lambda: "read 65536/65536" in qemu_read(domain, a.target_dev),
            60,
        )
        assert rig.complete(domain, v.id) == {}
        rig.detach(domain, v.id)
        assert rig.nothing_left(domain, v.id) == {}
    finally:
        force_cleanup(rig, domain)
        rig.delete_volume(v.id)


def _restart_libvirtd() -> None:
    pid = int(Path("/run/libvirtd.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    wait_until("libvirtd to exit", lambda: not Path(f"/proc/{pid}").exists(), 30)
    subprocess.run(["libvirtd", "-d"], check=True, timeout=30)
    wait_until(
        "libvirtd",
        lambda: subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True,
                               check=False, timeout=30).returncode == 0,
        60,
    )  # fmt: skip


def test_libvirtd_restart_agent_recovers(rig: Rig, domain: str, tmp_path: Path) -> None:
    v1, v2 = rig.create_volume(), rig.create_volume()
    try:
        rig.attach(domain, v1.id)
        _restart_libvirtd()
        assert len(rig.live_disks(domain)) == 1  # the domain and its disk survived
        # the agent's connection recovers: a new attach works, the earlier disk detaches (its
        # DEVICE_REMOVED event arrives on the new connection)
        rig.attach(domain, v2.id)
        assert len(rig.live_disks(domain)) == 2
        rig.detach(domain, v1.id)
        rig.detach(domain, v2.id)
        assert rig.live_disks(domain) == []
        assert rig.secrets() == []
        assert rig.journal() == []
        assert rig.targets() == {}
    finally:
        force_cleanup(rig, domain)
        rig.delete_volume(v1.id)
        rig.delete_volume(v2.id)


def test_udev_event_consumed_before_the_wait_starts(rig: Rig, domain: str, tmp_path: Path) -> None:
    with loop_device(tmp_path / "backing.img") as path:
        subprocess.run(["udevadm", "settle", "-t", "30"], check=True, timeout=60)  # its events are gone
        info = pb.ConnectionInfo(local=pb.LocalConnection(path=path), volume_id=f"loc-{uuid.uuid4().hex[:6]}")
        rig.volume_ids.add(info.volume_id)
        t0 = time.monotonic()
        rig.agent.AttachVolume(hpb.AttachVolumeRequest(domain=domain, connection_info=info), timeout=30)
        took = time.monotonic() - t0
        assert took < 5, f"the attach waited {took:.1f}s for an event that had already come"
        rig.detach(domain, info.volume_id)
        assert rig.nothing_left(domain, "") == {}


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mnt)], check=True, timeout=30
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def test_file_backend_full_disk_is_resource_exhausted_and_leaves_nothing(
    tmp_path: Path, tgtd: Tgtd, virt: libvirt.virConnect, small_fs: Path
) -> None:
    rig = Rig(work=tmp_path / "full", tgtd=tgtd, virt=virt, backend_dir=small_fs, oversubscription=4.0)
    rig.work.mkdir()
    rig.start_storage()
    try:
        stub = rig.storage

        def files() -> list[str]:
            return sorted(str(p.relative_to(small_fs)) for p in small_fs.rglob("*.raw"))

        # 1. more than the filesystem can ever hold: refused before anything is made
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateVolume(
                spb.CreateVolumeRequest(name="huge", size_bytes=1024 * MIB, backend="file"), timeout=30
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "can take at most" in (refused.value.details() or "")
        assert list(stub.ListVolumes(spb.ListVolumesRequest(), timeout=10).volumes) == []
        assert files() == []

        # 2. the write itself runs out of space (a snapshot copies 20 MiB of data into ~10 MiB free)
        v = rig.create_volume(size=20 * MIB)
        (vol_file,) = files()
        with open(small_fs / vol_file, "r+b") as f:
            f.write(os.urandom(20 * MIB))
        with open(small_fs / "filler", "wb") as f:  # what else lives on the filesystem
            f.write(b"\0" * (2 * MIB))
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateSnapshot(spb.CreateSnapshotRequest(volume_id=v.id, name="snap"), timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "out of space while taking a snapshot" in (info.value.details() or "")  # ENOSPC, mapped
        assert files() == [vol_file]  # the half-written copy is gone
        assert list(stub.ListSnapshots(spb.ListSnapshotsRequest(volume_id=v.id), timeout=10).snapshots) == []
        assert rig.volume(v.id).state == pb.VOLUME_STATE_AVAILABLE
        rig.delete_volume(v.id)
        assert files() == []
    finally:
        rig.stop()
