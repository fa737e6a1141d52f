"""Host tier, all real: the scheduler inside the blockwire-storage daemon with three file backends on one
tgtd (tests/fakes/daemon_rig.py), and the agent attaching what it placed.

Volumes that name no backend spread over the backends as the weigher says (most room, then fewest
volumes, then name); a volume type's extra specs (a capability from the config, an availability zone)
steer them; a type no backend meets is FAILED_PRECONDITION naming why; a volume the scheduler placed on
another backend than the first attaches to a running domain and detaches, leaving nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import libvirt
import pytest

from blockwire.v1 import storage_pb2 as spb
from blockwire.v1 import types_pb2 as pb
from tests.fakes.daemon_rig import Rig, define_domain, force_cleanup, remove_domain
from tests.host.daemons import Started, Tgtd

MIB = 1 << 20


@pytest.fixture(scope="module")
def virt(host_daemons: Started) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open("qemu:///system")
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def rig(
    host_daemons: Started, tgtd: Tgtd, tmp_path_factory: pytest.TempPathFactory, virt: libvirt.virConnect
) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("sched")
    extra = "".join(
        f'\n[[backends]]\nname = "{name}"\nkind = "file"\nexporter = "tgt"\npath = "{work / name}"\n'
        f'availability_zone = "{zone}"\ncapabilities = {{ disk_type = "{disk}" }}\n'
        for name, zone, disk in (("b2", "az2", "ssd"), ("b3", "az3", "hdd"))
    )
    with Rig(work=work, tgtd=tgtd, virt=virt, storage_config=extra).running() as r:
        yield r


@pytest.fixture
def domain(rig: Rig, virt: libvirt.virConnect) -> Iterator[str]:
    name = define_domain(virt, "bw-sched")
    try:
        yield name
    finally:
        force_cleanup(rig, name)
        remove_domain(virt, name)


def create(rig: Rig, **kw: object) -> pb.Volume:
    v = rig.storage.CreateVolume(
        spb.CreateVolumeRequest(name=f"s-{uuid.uuid4().hex[:8]}", size_bytes=8 * MIB, **kw),
        timeout=60,  # type: ignore[arg-type]
    ).volume
    rig.volume_ids.add(v.id)
    return v


def test_the_daemon_spreads_and_steers_volumes_and_the_agent_attaches_them(rig: Rig, domain: str) -> None:
    placed = [create(rig) for _ in range(6)]
    # one filesystem, equal room and count at first: by name, then the emptiest (thin: provisioned)
    assert [v.backend for v in placed] == ["b2", "b3", "file", "b2", "b3", "file"]

    storage = rig.storage
    storage.CreateVolumeType(
        spb.CreateVolumeTypeRequest(name="ssd", extra_specs={"disk_type": "ssd"}), timeout=10
    )
    storage.CreateVolumeType(
        spb.CreateVolumeTypeRequest(name="az3", extra_specs={"availability_zone": "az3"}), timeout=10
    )
    storage.CreateVolumeType(
        spb.CreateVolumeTypeRequest(name="nvme", extra_specs={"disk_type": "nvme"}), timeout=10
    )
    assert {create(rig, volume_type="ssd").backend for _ in range(2)} == {"b2"}
    assert create(rig, volume_type="az3").backend == "b3"
    with pytest.raises(grpc.RpcError) as err:
        create(rig, volume_type="nvme")
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    # b2 and b3 have another disk_type, file none at all
    assert err.value.details() == "no backend can take the volume: 3 without disk_type='nvme' (b2, b3, file)"

    on_b3 = placed[1]
    a = rig.attach(domain, on_b3.id)
    assert a.state == pb.ATTACHMENT_STATE_ATTACHED
    assert on_b3.id in a.connection_info.iscsi.paths[0].target_iqn
    rig.detach(domain, on_b3.id)
    assert rig.nothing_left(domain, on_b3.id) == {}
    for v in storage.ListVolumes(spb.ListVolumesRequest(), timeout=10).volumes:
        rig.delete_volume(v.id)
