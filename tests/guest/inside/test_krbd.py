"""Inside the guest (its kernel has rbd.ko): blockwire-agent with rbd_mode = "kernel" on a throwaway Ceph
cluster started here (tests/ceph.py: mon + MemStore OSD on loopback).

AttachVolume maps the image (`rbd device map`, the key in a 0600 keyfile, never on argv), checks the
identity the kernel reports in /sys/bus/rbd/devices/N/image_id, and hot-plugs /dev/rbdN as a block disk
into a running no-OS domain; data written to the device is what `rbd export` reads; after `rbd resize`
ExtendVolume reaches the domain (domblkinfo); DetachVolume unmaps
and leaves no mapping, record or keyfile. An image re-created under the same name is mapped, found to
have another id, unmapped, and refused.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from blockwire.v1 import hostagent_pb2 as hpb
from tests.ceph import CephCluster
from tests.guest.inside import kernel
from tests.guest.inside.conftest import GUEST_DAEMON
from tests.guest.inside.kernel import MiB
from tests.host.rbd_rig import RbdAgent, create_image, rbd_info, to_pb

RBD_DEVICES = Path("/sys/bus/rbd/devices")


@pytest.fixture(scope="module")
def cluster(ceph_cluster: CephCluster) -> CephCluster:
    return ceph_cluster


@pytest.fixture(scope="module")
def agent(
    cluster: CephCluster, libvirtd: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RbdAgent]:
    a = RbdAgent(
        tmp_path_factory.mktemp("krbd"),
        rbd_timeout=60.0,
        mode="kernel",
        detach_timeout=60.0,
        extra="device_timeout = 90.0\n",
        daemon=GUEST_DAEMON,
    )
    a.start()
    yield a
    a.stop()
    if a.proc is None:
        kernel.keep_log(a.work / "agent.log", "krbd-blockwire-agent.log")


def mappings() -> list[str]:
    return sorted(p.name for p in RBD_DEVICES.iterdir()) if RBD_DEVICES.exists() else []


def test_krbd_map_hotplug_data_unmap(cluster: CephCluster, agent: RbdAgent, domain: str) -> None:
    user = cluster.create_user("guest-host")
    name = f"vol-{uuid.uuid4().hex[:8]}"
    iid = create_image(cluster, name, 64)
    began = time.monotonic()
    a = agent.attach(domain, to_pb(rbd_info(cluster, user, name, name, image_id_=iid)), timeout=300)
    print(f"krbd AttachVolume took {time.monotonic() - began:.2f}s")
    assert a.host_device.startswith("/dev/rbd"), a
    dev_id = a.host_device.removeprefix("/dev/rbd")
    assert (RBD_DEVICES / dev_id / "image_id").read_text().strip() == iid
    assert (RBD_DEVICES / dev_id / "name").read_text().strip() == name
    disks = {d.target: d for d in kernel.domain_disks(domain)}
    assert a.target_dev in disks
    assert kernel.domblk_capacity(domain, a.target_dev) == 64 * MiB
    # a repeat returns the attachment and maps nothing more
    assert agent.attach(domain, to_pb(rbd_info(cluster, user, name, name, image_id_=iid))).host_device == (
        a.host_device
    )
    assert mappings() == [dev_id]

    pattern = kernel.write_pattern(a.host_device, 3)
    out = agent.work / "export.raw"
    cluster.cli("rbd", "export", f"{cluster.pool}/{name}", str(out), timeout=120)
    assert kernel.read_at(out, 3) == pattern

    # extend while attached: the kernel follows `rbd resize` (it watches the image header), then
    # ExtendVolume reads the new size and resizes the domain's disk
    cluster.cli("rbd", "resize", f"{cluster.pool}/{name}", "--size", "96M")
    block_size = Path(f"/sys/block/rbd{dev_id}/size")
    deadline = time.monotonic() + 60
    while int(block_size.read_text()) * 512 != 96 * MiB:
        assert time.monotonic() < deadline, "the kernel did not see the resize within 60s"
        time.sleep(0.2)
    req = hpb.HostAgentServiceExtendVolumeRequest(volume_id=name, new_size_bytes=96 * MiB)
    assert agent.stub.ExtendVolume(req, timeout=120).size_bytes == 96 * MiB
    assert kernel.domblk_capacity(domain, a.target_dev) == 96 * MiB
    assert kernel.read_at(a.host_device, 3) == pattern

    agent.detach(domain, name, timeout=300)
    agent.detach(domain, name)  # a repeat is OK
    assert mappings() == []
    assert not Path(a.host_device).exists()
    assert agent.journal() == []
    assert list((agent.state / "rbd-keys").glob("*")) == []
    assert user.key not in (agent.work / "agent.log").read_text()


def test_krbd_recreated_image_is_unmapped_and_refused(
    cluster: CephCluster, agent: RbdAgent, domain: str
) -> None:
    user = cluster.create_user("guest-host-2")
    name = f"vol-{uuid.uuid4().hex[:8]}"
    old = create_image(cluster, name, 16)
    cluster.cli("rbd", "rm", f"{cluster.pool}/{name}")
    create_image(cluster, name, 16)
    with pytest.raises(grpc.RpcError) as err:
        agent.attach(domain, to_pb(rbd_info(cluster, user, name, name, image_id_=old)), timeout=300)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    assert mappings() == []
    assert agent.journal() == []
    assert all("rbd" not in d.source for d in kernel.domain_disks(domain))
