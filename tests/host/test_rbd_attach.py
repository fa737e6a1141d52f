"""Host tier, real Ceph: RBD volumes attached by blockwire-agent (rbd_mode "qemu") into running no-OS
domains through libvirt and QEMU's librbd, over gRPC.

* data QEMU writes (HMP qemu-io) is what librbd reads back; ExtendVolume after an `rbd resize` shows
  in domblkinfo; a detach leaves no libvirt secret and no journal record; repeats are idempotent;
* an image re-created under the same name (another image id) is refused, nothing attached;
* a wrong cephx key is PERMISSION_DENIED, nothing attached;
* the monitor down during an attach is UNAVAILABLE within the agent's rbd_timeout, not a hang;
* an OSD (BlueStore) killed and restarted while attached: I/O issued meanwhile completes, data kept.

The connection info is built here from the cluster (what storage's rbd backend announces).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import libvirt
import pytest

from blockwire.v1 import hostagent_pb2 as hpb
from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import storage_pb2_grpc
from blockwire.v1 import types_pb2 as pb
from hostagent import api
from tests.ceph import CephCluster, CephMissing, CephUser
from tests.conftest import tier_unavailable
from tests.host.daemons import Started
from tests.host.rbd_rig import (
    AGENT_TIMEOUT,
    RbdAgent,
    ceph_secrets,
    create_image,
    disk_size,
    librbd_read,
    rbd_info,
    running_domain,
    to_pb,
)
from tests.host.test_rbd_storage import running, write_config
from tests.rig import KILLED, Daemon, hmp_qemu_io

MIB = 1 << 20
WRONG_KEY = "AQBUDCtnAAAAABAAd2GrbV3R1lXo7h9SWzr3iA=="


@pytest.fixture(scope="module")
def virt(host_daemons: Started) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open("qemu:///system")
    yield conn
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, host_daemons: Started) -> Iterator[RbdAgent]:
    a = RbdAgent(tmp_path_factory.mktemp("rbd-agent"))
    a.start()
    yield a
    a.stop()


@pytest.fixture(scope="module")
def user(ceph_cluster: CephCluster) -> CephUser:
    return ceph_cluster.create_user(f"host-{uuid.uuid4().hex[:6]}")


def nothing_left(agent: RbdAgent, virt: libvirt.virConnect, domain: str, volume_id: str) -> None:
    assert ceph_secrets(virt, volume_id) == []
    assert agent.journal() == []
    assert "protocol='rbd'" not in virt.lookupByName(domain).XMLDesc(0)


def test_attach_write_read_extend_detach(
    agent: RbdAgent, ceph_cluster: CephCluster, user: CephUser, virt: libvirt.virConnect
) -> None:
    vid = f"vol-{uuid.uuid4().hex[:8]}"
    iid = create_image(ceph_cluster, vid, 16)
    info = to_pb(rbd_info(ceph_cluster, user, vid, vid, image_id_=iid))
    with running_domain(virt) as dom:
        a = agent.attach(dom, info)
        assert a.target_dev
        assert a.host_device == ""
        live = virt.lookupByName(dom).XMLDesc(0)
        assert f"protocol='rbd' name='{ceph_cluster.pool}/{vid}'" in live
        assert ceph_secrets(virt, vid) != []
        assert user.key not in live
        # a repeat returns the attachment
        assert agent.attach(dom, info).target_dev == a.target_dev

        out = hmp_qemu_io(dom, a.target_dev, "write -P 0xa7 64k 64k")
        assert "wrote 65536/65536 bytes" in out, out
        assert librbd_read(ceph_cluster, ceph_cluster.pool, vid, 64 * 1024, 64 * 1024) == b"\xa7" * 65536

        assert disk_size(virt, dom, a.target_dev) == 16 * MIB
        ceph_cluster.cli("rbd", "resize", f"{ceph_cluster.pool}/{vid}", "--size", "32M")
        got = agent.stub.ExtendVolume(
            hpb.HostAgentServiceExtendVolumeRequest(volume_id=vid, new_size_bytes=32 * MIB), timeout=30
        )
        assert got.size_bytes == 32 * MIB
        assert disk_size(virt, dom, a.target_dev) == 32 * MIB

        agent.detach(dom, vid)
        agent.detach(dom, vid)  # a repeat is OK
        nothing_left(agent, virt, dom, vid)
        log = agent.proc.log.read_text() if agent.proc else ""
        assert user.key not in log


def test_a_recreated_image_is_refused(
    agent: RbdAgent, ceph_cluster: CephCluster, user: CephUser, virt: libvirt.virConnect
) -> None:
    vid = f"vol-{uuid.uuid4().hex[:8]}"
    old = create_image(ceph_cluster, vid, 8)
    ceph_cluster.cli("rbd", "rm", f"{ceph_cluster.pool}/{vid}")
    new = create_image(ceph_cluster, vid, 8)
    assert new != old
    with running_domain(virt) as dom:
        with pytest.raises(grpc.RpcError) as err:
            agent.attach(dom, to_pb(rbd_info(ceph_cluster, user, vid, vid, image_id_=old)))
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert new in (err.value.details() or "")
        assert "re-created" in (err.value.details() or "")
        nothing_left(agent, virt, dom, vid)


def test_a_wrong_key_is_permission_denied(
    agent: RbdAgent, ceph_cluster: CephCluster, user: CephUser, virt: libvirt.virConnect
) -> None:
    vid = f"vol-{uuid.uuid4().hex[:8]}"
    iid = create_image(ceph_cluster, vid, 8)
    with running_domain(virt) as dom:
        with pytest.raises(grpc.RpcError) as err:
            agent.attach(dom, to_pb(rbd_info(ceph_cluster, user, vid, vid, image_id_=iid, key=WRONG_KEY)))
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert WRONG_KEY not in (err.value.details() or "")
        nothing_left(agent, virt, dom, vid)


def test_the_monitor_down_is_unavailable_within_the_bound(
    agent: RbdAgent, ceph_cluster: CephCluster, user: CephUser, virt: libvirt.virConnect
) -> None:
    vid = f"vol-{uuid.uuid4().hex[:8]}"
    iid = create_image(ceph_cluster, vid, 8)
    info = to_pb(rbd_info(ceph_cluster, user, vid, vid, image_id_=iid))
    with running_domain(virt) as dom:
        ceph_cluster.stop_mon()
        try:
            began = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                agent.attach(dom, info, timeout=60)
            took = time.monotonic() - began
        finally:
            ceph_cluster.start_mon()
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert took < 2 * AGENT_TIMEOUT + 4, f"UNAVAILABLE after {took:.1f}s"
        nothing_left(agent, virt, dom, vid)
        # and once the monitor is back, the same attach works
        ceph_cluster.wait_writable(timeout=30)
        a = agent.attach(dom, info)
        assert a.target_dev
        agent.detach(dom, vid)
        nothing_left(agent, virt, dom, vid)


@pytest.fixture(scope="module")
def bluestore(host_daemons: Started) -> Iterator[CephCluster]:
    try:
        cluster = CephCluster(osds=1, objectstore="bluestore").start()
    except CephMissing as exc:
        tier_unavailable("host", f"Ceph BlueStore cluster: {exc}")
    yield cluster
    cluster.stop()


def test_io_resumes_after_an_osd_restart(
    agent: RbdAgent, bluestore: CephCluster, virt: libvirt.virConnect
) -> None:
    user = bluestore.create_user("host-bs")
    vid = f"vol-{uuid.uuid4().hex[:8]}"
    iid = create_image(bluestore, vid, 8)
    with running_domain(virt) as dom:
        a = agent.attach(dom, to_pb(rbd_info(bluestore, user, vid, vid, image_id_=iid)))
        assert "wrote" in hmp_qemu_io(dom, a.target_dev, "write -P 0x5a 0 64k")
        bluestore.kill_osd(0)
        done: list[str] = []
        # issued while the OSD is down: it waits in QEMU's librbd and completes once the OSD is back
        writer = threading.Thread(
            target=lambda: done.append(hmp_qemu_io(dom, a.target_dev, "write -P 0x6b 1M 64k", timeout=120))
        )
        writer.start()
        bluestore.start_osd(0)
        writer.join(120)
        assert not writer.is_alive(), "the write did not complete after the OSD came back"
        assert done, "the write gave no output"
        assert "wrote 65536/65536 bytes" in done[0], done
        assert librbd_read(bluestore, bluestore.pool, vid, 0, 65536) == b"\x5a" * 65536  # kept
        assert librbd_read(bluestore, bluestore.pool, vid, MIB, 65536) == b"\x6b" * 65536  # resumed
        agent.detach(dom, vid)
        nothing_left(agent, virt, dom, vid)


@pytest.mark.parametrize(
    ("failpoint", "finished"),
    [(api.FP_ATTACH_AFTER_CONNECT, False), (api.FP_ATTACH_AFTER_HOTPLUG, True)],
    ids=["after_connect", "after_hotplug"],
)
def test_agent_killed_during_an_rbd_attach_recovers(
    tmp_path: Path,
    host_daemons: Started,
    ceph_cluster: CephCluster,
    user: CephUser,
    virt: libvirt.virConnect,
    failpoint: str,
    finished: bool,
) -> None:
    """kill -9 after the secret was defined (rolled back on restart: no secret, no record) or after the
    hot-plug (rolled forward: ATTACHED with the live disk, then detaches like any other)."""
    vid = f"vol-{uuid.uuid4().hex[:8]}"
    info = to_pb(rbd_info(ceph_cluster, user, vid, vid, image_id_=create_image(ceph_cluster, vid, 8)))
    crashing = RbdAgent(tmp_path)
    with running_domain(virt) as dom:
        try:
            proc = crashing.start(failpoints=f"{failpoint}=kill")
            with pytest.raises(grpc.RpcError):
                crashing.attach(dom, info)
            assert proc.died() == KILLED, f"{failpoint} was not reached"
            assert ceph_secrets(virt, vid) != []  # the secret was defined before the crash
            crashing.proc = None
            crashing.start()  # reconciles before it serves
            if finished:
                (a,) = crashing.stub.ListAttachments(
                    hpb.HostAgentServiceListAttachmentsRequest(domain=dom)
                ).attachments
                assert a.volume_id == vid
                assert a.target_dev
                assert "protocol='rbd'" in virt.lookupByName(dom).XMLDesc(0)
                crashing.detach(dom, vid)
            nothing_left(crashing, virt, dom, vid)
        finally:
            crashing.stop()


# -- through both daemons: blockwire-storage's rbd backend announces the connection info ------------------
@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, host_daemons: Started, ceph_cluster: CephCluster
) -> Iterator[tuple[Daemon, RbdAgent, str]]:
    """blockwire-storage (rbd backend on a pool of its own, a cephx user limited to it) and
    blockwire-agent (rbd_mode qemu) that asks it for attachments."""
    pool = f"bw-{uuid.uuid4().hex[:8]}"
    ceph_cluster.create_pool(pool)
    storage_user = ceph_cluster.create_user(f"storage-{pool}", pool)
    tmp = tmp_path_factory.mktemp("rbd-e2e")
    with running(write_config(tmp, ceph_cluster, storage_user, pool=pool)) as storage:
        agent = RbdAgent(tmp / "agent", extra=f'storage_address = "unix://{tmp}/storage.sock"')
        agent.work.mkdir()
        agent.start()
        try:
            yield storage, agent, pool
        finally:
            agent.stop()


def test_attach_by_volume_id_through_both_daemons(
    stack: tuple[Daemon, RbdAgent, str], ceph_cluster: CephCluster, virt: libvirt.virConnect
) -> None:
    storage, agent, pool = stack
    s = storage_pb2_grpc.StorageServiceStub(storage.channel)
    announced = agent.stub.GetConnector(hpb.GetConnectorRequest(), timeout=10).connector.transports
    assert pb.TRANSPORT_RBD in announced  # the agent says it can, so storage answers with RbdConnection
    vol = s.CreateVolume(spb.CreateVolumeRequest(name="e2e", size_bytes=16 * MIB), timeout=60).volume
    with running_domain(virt) as dom:
        req = hpb.AttachVolumeRequest(domain=dom, volume_id=vol.id)
        a = agent.stub.AttachVolume(req, timeout=60).attachment
        assert a.connection_info.WhichOneof("transport") == "rbd"
        assert agent.stub.AttachVolume(req, timeout=60).attachment.target_dev == a.target_dev  # a repeat
        (sa,) = s.ListAttachments(spb.ListAttachmentsRequest(volume_id=vol.id), timeout=10).attachments
        assert sa.state == pb.ATTACHMENT_STATE_ATTACHED

        assert "wrote 65536/65536 bytes" in hmp_qemu_io(dom, a.target_dev, "write -P 0xc3 0 64k")
        image = a.connection_info.rbd.image
        assert librbd_read(ceph_cluster, pool, image, 0, 65536) == b"\xc3" * 65536

        s.ExtendVolume(spb.ExtendVolumeRequest(volume_id=vol.id, new_size_bytes=32 * MIB), timeout=60)
        got = agent.stub.ExtendVolume(
            hpb.HostAgentServiceExtendVolumeRequest(volume_id=vol.id, new_size_bytes=32 * MIB), timeout=30
        )
        assert got.size_bytes == 32 * MIB
        assert disk_size(virt, dom, a.target_dev) == 32 * MIB

        agent.detach(dom, vol.id)
        agent.detach(dom, vol.id)  # a repeat is OK
        nothing_left(agent, virt, dom, vol.id)
        assert (
            list(s.ListAttachments(spb.ListAttachmentsRequest(volume_id=vol.id), timeout=10).attachments)
            == []
        )
    s.DeleteVolume(spb.DeleteVolumeRequest(volume_id=vol.id), timeout=60)
