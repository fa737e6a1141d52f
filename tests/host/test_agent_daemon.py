"""Host tier, all real: blockwire-agent and blockwire-storage daemons (subprocesses over unix sockets),
tgtd, libvirtd + QEMU (a no-OS kvm domain with a virtio-scsi controller), udevd and loop devices.

(a) AttachVolume by volume id with QEMU's iSCSI initiator and CHAP: QEMU reads the LUN; DetachVolume
    removes the disk, the export and the libvirt secret. Repeats are idempotent.
(b) A local loop device that does not exist yet when AttachVolume is called: udev's add event (and the
    change event when it gets its backing file) completes the attach.
(c) Unknown domain, wrong CHAP, malformed connection info: precise codes, and nothing left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import libvirt
import pytest
from lxml import etree

from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import hostagent_pb2_grpc, storage_pb2_grpc
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import types_pb2 as pb
from tests.conftest import tier_unavailable
from tests.fakes.daemon_rig import Rig, define_domain, remove_domain
from tests.host.daemons import Started, Tgtd
from tests.rig import wait_until

ROOT = Path(__file__).resolve().parents[2]
LOOP_CTL_ADD = 0x4C80
LOOP_CTL_REMOVE = 0x4C81
MIB = 1 << 20


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agent")


@pytest.fixture(scope="module")
def rig(host_daemons: Started, tgtd: Tgtd, work: Path, virt: libvirt.virConnect) -> Iterator[Rig]:
    """Both daemons (tests/fakes/daemon_rig.py), logging at DEBUG into `work`."""
    if not (ROOT / "storagesvc" / "rpc" / "server.py").exists():
        tier_unavailable("host", "storagesvc daemon missing")
    with Rig(work=work, tgtd=tgtd, virt=virt).running() as r:
        yield r


@pytest.fixture(scope="module")
def storage(rig: Rig) -> storage_pb2_grpc.StorageServiceStub:
    return rig.storage


@pytest.fixture(scope="module")
def agent(rig: Rig) -> hostagent_pb2_grpc.HostAgentServiceStub:
    return rig.agent


@pytest.fixture(scope="module")
def virt(host_daemons: Started) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open("qemu:///system")
    yield conn
    conn.close()


@pytest.fixture
def domain(virt: libvirt.virConnect) -> Iterator[str]:
    name = define_domain(virt, "bw-agent")
    try:
        yield name
    finally:
        remove_domain(virt, name)


def live_disks(virt: libvirt.virConnect, domain: str) -> list[etree._Element]:
    root = etree.fromstring(virt.lookupByName(domain).XMLDesc(0).encode())
    return root.findall("devices/disk")


_FOUND_AT_START: set[str] = set()


def _all_blockwire_secrets(virt: libvirt.virConnect) -> set[str]:
    return {u for u in (s.usageID() for s in virt.listAllSecrets()) if u and u.startswith("blockwire/")}


@pytest.fixture(scope="module", autouse=True)
def _secrets_at_start(virt: libvirt.virConnect) -> None:
    """libvirtd is shared with whatever else ran on this machine: its secrets are not this module's."""
    _FOUND_AT_START.update(_all_blockwire_secrets(virt))


def blockwire_secrets(virt: libvirt.virConnect) -> list[str]:
    """The blockwire secrets this module's attachments made (and left)."""
    return sorted(_all_blockwire_secrets(virt) - _FOUND_AT_START)


def journal_records(work: Path) -> list[str]:
    return sorted(p.name for p in (work / "agent-state" / "attachments").glob("*.json"))


def targets(tgtd: Tgtd) -> str:
    return tgtd.adm("--op", "show", "--mode", "target").stdout


@pytest.fixture
def volume(storage: storage_pb2_grpc.StorageServiceStub) -> Iterator[spb.CreateVolumeResponse]:
    v = storage.CreateVolume(
        spb.CreateVolumeRequest(name=f"vol-{uuid.uuid4().hex[:8]}", size_bytes=16 * MIB, backend="file"),
        timeout=60,
    ).volume
    for _ in range(600):  # bounded: CREATING -> AVAILABLE
        if v.state == pb.VOLUME_STATE_AVAILABLE:
            break
        time.sleep(0.05)
        v = storage.GetVolume(spb.GetVolumeRequest(volume_id=v.id), timeout=10).volume
    yield v
    for a in storage.ListAttachments(spb.ListAttachmentsRequest(volume_id=v.id), timeout=10).attachments:
        storage.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=a.id), timeout=30)
    storage.DeleteVolume(spb.DeleteVolumeRequest(volume_id=v.id), timeout=30)


def test_a_qemu_native_iscsi_attach_detach_with_chap(
    agent: hostagent_pb2_grpc.HostAgentServiceStub,
    storage: storage_pb2_grpc.StorageServiceStub,
    virt: libvirt.virConnect,
    tgtd: Tgtd,
    domain: str,
    volume: pb.Volume,
    work: Path,
) -> None:
    t0 = time.monotonic()
    a = agent.AttachVolume(hpb.AttachVolumeRequest(domain=domain, volume_id=volume.id), timeout=60).attachment
    attach_s = time.monotonic() - t0
    assert a.state == pb.ATTACHMENT_STATE_ATTACHED
    assert a.target_dev.startswith("sd")
    assert a.connection_info.iscsi.chap.username  # CHAP was used ...
    assert not a.connection_info.iscsi.chap.password  # ... and the password is not returned
    (disk,) = live_disks(virt, domain)
    source = disk.find("source")
    assert source is not None
    assert source.get("protocol") == "iscsi"
    assert disk.find("source/auth/secret") is not None
    assert len(blockwire_secrets(virt)) == 1
    info = subprocess.run(
        ["virsh", "-c", "qemu:///system", "domblkinfo", domain, a.target_dev],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert f"Capacity:       {16 * MIB}" in info, info  # QEMU read the LUN through its initiator
    target_iqn = a.connection_info.iscsi.paths[0].target_iqn
    assert target_iqn in targets(tgtd)

    again = agent.AttachVolume(hpb.AttachVolumeRequest(domain=domain, volume_id=volume.id), timeout=60)
    assert again.attachment.target_dev == a.target_dev
    assert len(live_disks(virt, domain)) == 1

    got = agent.GetAttachment(hpb.HostAgentServiceGetAttachmentRequest(volume_id=volume.id), timeout=10)
    assert got.attachment.domain == domain

    t0 = time.monotonic()
    agent.DetachVolume(hpb.DetachVolumeRequest(domain=domain, volume_id=volume.id), timeout=60)
    detach_s = time.monotonic() - t0
    assert live_disks(virt, domain) == []
    assert target_iqn not in targets(tgtd)
    assert blockwire_secrets(virt) == []
    assert journal_records(work) == []
    agent.DetachVolume(hpb.DetachVolumeRequest(domain=domain, volume_id=volume.id), timeout=60)  # a repeat
    print(f"\nqemu-native iSCSI + CHAP: attach {attach_s * 1000:.0f} ms, detach {detach_s * 1000:.0f} ms")


@contextlib.contextmanager
def new_loop_device(backing: Path) -> Iterator[tuple[str, threading.Event]]:
    """A loop device number that does not exist yet; `go` creates it (udev add) and binds `backing`."""
    ctl = os.open("/dev/loop-control", os.O_RDWR)
    n = next(i for i in range(64, 512) if not os.path.exists(f"/sys/class/block/loop{i}"))
    path = f"/dev/loop{n}"
    go = threading.Event()
    created = threading.Event()

    def create() -> None:
        go.wait(30)
        fcntl.ioctl(ctl, LOOP_CTL_ADD, n)
        wait_until(path, lambda: os.path.exists(path), 10)
        subprocess.run(["losetup", path, str(backing)], check=True, timeout=30)
        created.set()

    t = threading.Thread(target=create)
    t.start()
    try:
        yield path, go
    finally:
        go.set()
        t.join(40)
        if created.is_set():
            subprocess.run(["losetup", "-d", path], check=False, timeout=30)
        with contextlib.suppress(OSError):
            fcntl.ioctl(ctl, LOOP_CTL_REMOVE, n)
        os.close(ctl)


def test_b_local_loop_device_attach_is_driven_by_udev(
    agent: hostagent_pb2_grpc.HostAgentServiceStub, virt: libvirt.virConnect, domain: str, work: Path
) -> None:
    backing = work / "loop-backing.img"
    with open(backing, "wb") as f:
        f.truncate(8 * MIB)
    with new_loop_device(backing) as (path, go), ThreadPoolExecutor(1) as pool:
        assert not os.path.exists(path)
        info = pb.ConnectionInfo(
            local=pb.LocalConnection(path=path), volume_id=f"local-{uuid.uuid4().hex[:6]}"
        )
        t0 = time.monotonic()
        pending: Future[hpb.AttachVolumeResponse] = pool.submit(
            agent.AttachVolume, hpb.AttachVolumeRequest(domain=domain, connection_info=info), timeout=30
        )
        time.sleep(0.2)  # the agent is waiting for the device now (not product code)
        assert not pending.done()
        go.set()
        a = pending.result(30).attachment
        attach_s = time.monotonic() - t0
        assert a.host_device == path
        (disk,) = live_disks(virt, domain)
        assert disk.get("type") == "block"
        assert disk.find("source").get("dev") == path  # type: ignore[union-attr]
        t0 = time.monotonic()
        agent.DetachVolume(hpb.DetachVolumeRequest(domain=domain, volume_id=info.volume_id), timeout=30)
        detach_s = time.monotonic() - t0
        assert live_disks(virt, domain) == []
        assert journal_records(work) == []
        agent.DetachVolume(hpb.DetachVolumeRequest(domain=domain, volume_id=info.volume_id), timeout=30)
    print(
        f"\nlocal loop (incl. the 0.2 s head start): attach {attach_s * 1000:.0f} ms, "
        f"detach {detach_s * 1000:.0f} ms"
    )


def test_b2_local_loop_device_already_present(
    agent: hostagent_pb2_grpc.HostAgentServiceStub, virt: libvirt.virConnect, domain: str, work: Path
) -> None:
    backing = work / "loop-backing2.img"
    with open(backing, "wb") as f:
        f.truncate(8 * MIB)
    with new_loop_device(backing) as (path, go):
        go.set()
        wait_until(
            "loop device with media",
            lambda: (
                os.path.exists(path)
                and subprocess.run(["losetup", path], capture_output=True, check=False).returncode == 0
            ),
            30,
        )
        info = pb.ConnectionInfo(
            local=pb.LocalConnection(path=path), volume_id=f"local-{uuid.uuid4().hex[:6]}"
        )
        t0 = time.monotonic()
        agent.AttachVolume(hpb.AttachVolumeRequest(domain=domain, connection_info=info), timeout=30)
        attach_s = time.monotonic() - t0
        t0 = time.monotonic()
        agent.DetachVolume(hpb.DetachVolumeRequest(domain=domain, volume_id=info.volume_id), timeout=30)
        detach_s = time.monotonic() - t0
        assert live_disks(virt, domain) == []
    print(f"\nlocal loop (present): attach {attach_s * 1000:.0f} ms, detach {detach_s * 1000:.0f} ms")


def _code(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_c_failures_have_precise_codes_and_leave_nothing(
    agent: hostagent_pb2_grpc.HostAgentServiceStub,
    storage: storage_pb2_grpc.StorageServiceStub,
    virt: libvirt.virConnect,
    tgtd: Tgtd,
    domain: str,
    volume: pb.Volume,
    work: Path,
) -> None:
    before = targets(tgtd)
    # unknown domain
    code = _code(
        lambda: agent.AttachVolume(
            hpb.AttachVolumeRequest(domain="no-such-domain", volume_id=volume.id), timeout=30
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert targets(tgtd) == before
    assert (
        storage.ListAttachments(spb.ListAttachmentsRequest(volume_id=volume.id), timeout=10).attachments == []
    )

    # wrong CHAP: a real export for this host, then connection info with a wrong password
    connector = agent.GetConnector(hpb.GetConnectorRequest(), timeout=10).connector
    sa = storage.CreateAttachment(
        spb.CreateAttachmentRequest(volume_id=volume.id, connector=connector, domain=domain), timeout=60
    ).attachment
    info = pb.ConnectionInfo()
    info.CopyFrom(sa.connection_info)
    assert info.iscsi.chap.username
    info.iscsi.chap.password = "wrong-password-1"
    code = _code(
        lambda: agent.AttachVolume(hpb.AttachVolumeRequest(domain=domain, connection_info=info), timeout=30)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert live_disks(virt, domain) == []
    assert blockwire_secrets(virt) == []
    assert journal_records(work) == []
    storage.DeleteAttachment(spb.DeleteAttachmentRequest(attachment_id=sa.id), timeout=30)
    assert sa.connection_info.iscsi.paths[0].target_iqn not in targets(tgtd)

    # malformed connection info
    for bad in (
        pb.ConnectionInfo(volume_id="x"),  # no transport
        pb.ConnectionInfo(volume_id="x", iscsi=pb.IscsiConnection()),  # no paths
        pb.ConnectionInfo(
            volume_id="x",
            iscsi=pb.IscsiConnection(paths=[pb.IscsiPath(portal="::1", target_iqn="iqn.x", lun=1)]),
        ),
        pb.ConnectionInfo(volume_id="x", local=pb.LocalConnection(path="relative/path")),
    ):
        request = hpb.AttachVolumeRequest(domain=domain, connection_info=bad)
        code = _code(lambda r=request: agent.AttachVolume(r, timeout=30))  # type: ignore[misc]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert live_disks(virt, domain) == []
    assert blockwire_secrets(virt) == []
    assert journal_records(work) == []
    assert targets(tgtd) == before
